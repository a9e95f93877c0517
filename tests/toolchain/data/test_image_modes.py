"""Images as stored: 16-bit colour PNGs read exactly, alpha and grayscale kept, what each format can store."""
from __future__ import annotations

import itertools
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolchain.data.image_modes import (
    Layout, png16_bytes, probe_layout, read_planes, storage_problem, to_samples, upscale_alpha, write_planes,
)
from toolchain.data.imresize import imresize
from toolchain.data.io import ImageError, WRITE_FORMATS
from toolchain.tolerances import JPEG_MEAN_ERROR

LAYOUTS = [Layout(gray, alpha, bits) for gray, alpha, bits in itertools.product((True, False), (False, True), (8, 16))]


def filtered_png(samples: np.ndarray, color_type: int, extra_chunks: bytes = b"") -> bytes:
    """A 16-bit PNG written by hand, rows filtered with types 0..4 in turn (None, Sub, Up, Average, Paeth).

    Independent of :func:`png16_bytes`; every filter needs the pixel size, which is what the decoder's
    raw-mode switch must keep right.
    """
    pixels = samples.reshape(*samples.shape[:2], -1)
    height, width, channels = pixels.shape
    step = channels * 2
    raw = pixels.astype(">u2").view(np.uint8).reshape(height, width * step).astype(np.int64)
    rows = []
    for y in range(height):
        line = raw[y]
        left = np.concatenate([np.zeros(step, np.int64), line[:-step]])
        up = raw[y - 1] if y else np.zeros_like(line)
        up_left = np.concatenate([np.zeros(step, np.int64), up[:-step]])
        kind = y % 5
        if kind == 0:
            predicted = np.zeros_like(line)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = up
        elif kind == 3:
            predicted = (left + up) // 2
        else:
            estimate = left + up - up_left
            distances = np.stack([np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)])
            predicted = np.choose(np.argmin(distances, axis=0), [left, up, up_left])  # ties: left, up, up-left
        rows.append(bytes([kind]) + ((line - predicted) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra_chunks
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def stored(planes) -> np.ndarray:
    """The samples a :class:`Planes` was read from, ``(H, W, C)`` uint16 (16-bit) or uint8."""
    return to_samples(planes.rgb, planes.alpha, planes.layout).reshape(*planes.rgb.shape[:2], -1)


def smooth_planes(layout: Layout, height: int = 12, width: int = 10):
    """Smooth float planes whose values sit exactly on the layout's sample grid."""
    levels = 65535 if layout.bits == 16 else 255
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / (width - 1), y / (height - 1), (x + y) / (width + height - 2)], axis=2)
    if layout.gray:
        rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    rgb = (np.round(rgb * levels) / levels).astype(np.float32)
    alpha = (np.round((1 - x / (width - 1) / 2) * levels) / levels).astype(np.float32) if layout.alpha else None
    return rgb, alpha


@pytest.mark.parametrize("color_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_16bit_png_read_exactly_through_every_filter(tmp_path: Path, color_type: int, channels: int) -> None:
    shape = (11, 7, channels) if channels > 1 else (11, 7)
    samples = np.random.default_rng(color_type).integers(0, 65536, shape).astype(np.uint16)
    path = tmp_path / f"t{color_type}.png"
    path.write_bytes(filtered_png(samples, color_type))
    planes = read_planes(path)
    assert planes.layout == Layout(gray=channels < 3, alpha=channels in (2, 4), bits=16) == probe_layout(path)
    assert planes.rgb.shape == (11, 7, 3) and planes.rgb.dtype == np.float32
    np.testing.assert_array_equal(stored(planes), samples.reshape(11, 7, -1))
    if planes.layout.gray:
        np.testing.assert_array_equal(planes.rgb[:, :, 0], planes.rgb[:, :, 2])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_png_round_trip_is_exact_in_every_layout(tmp_path: Path, layout: Layout) -> None:
    rgb, alpha = smooth_planes(layout)
    path = write_planes(tmp_path / "a.png", rgb, alpha, layout)
    planes = read_planes(path)
    assert planes.layout == layout
    np.testing.assert_array_equal(planes.rgb, rgb)
    if layout.alpha:
        np.testing.assert_array_equal(planes.alpha, alpha)
    with Image.open(path) as img:  # Pillow's own decoder: mode, and the high byte of 16-bit samples
        assert img.mode == {(True, False): "I;16" if layout.bits == 16 else "L", (True, True): "RGBA" if
                            layout.bits == 16 else "LA", (False, False): "RGB", (False, True): "RGBA"}[
                                (layout.gray, layout.alpha)]
        if layout.bits == 16 and img.mode != "I;16":
            high = (stored(planes) >> 8).astype(np.uint8)
            pillow = np.asarray(img)
            expected = high if not layout.gray else np.concatenate([np.repeat(high[:, :, :1], 3, axis=2),
                                                                    high[:, :, 1:]], axis=2)
            np.testing.assert_array_equal(pillow, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.parametrize("suffix", sorted(WRITE_FORMATS))
def test_storage_problem_tells_what_each_format_keeps(tmp_path: Path, suffix: str) -> None:
    """Every layout a format is said to store comes back as that layout; every other is refused unwritten."""
    for index, layout in enumerate(LAYOUTS):
        rgb, alpha = smooth_planes(layout, 24, 32)
        path = tmp_path / f"{index}{suffix}"
        problem = storage_problem(path, layout)
        if problem is None:
            planes = read_planes(write_planes(path, rgb, alpha, layout))
            assert planes.layout == layout, (suffix, layout)
            error = np.abs(planes.rgb - rgb).mean()
            assert error < JPEG_MEAN_ERROR if WRITE_FORMATS[suffix] == "JPEG" else error == 0
        else:
            assert layout.alpha or layout.bits == 16
            assert ".png" in problem and (str(layout) in problem)
            with pytest.raises(ValueError, match="cannot store"):
                write_planes(path, rgb, alpha, layout)
            assert not path.exists()
    assert storage_problem(tmp_path / "a.png", Layout(False, True, 16)) is None
    assert storage_problem(tmp_path / "a.tif", Layout(True, False, 16)) is None
    assert "alpha" in storage_problem(tmp_path / "a.jpg", Layout(False, True, 8))
    assert "16-bit" in storage_problem(tmp_path / "a.bmp", Layout(True, False, 16))
    assert "unknown image suffix" in storage_problem(tmp_path / "a.gif", Layout(False, False, 8))


def test_transparency_keys_become_alpha(tmp_path: Path) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray).save(tmp_path / "l.png", transparency=50)
    planes = read_planes(tmp_path / "l.png")
    assert planes.layout == Layout(gray=True, alpha=True, bits=8)
    np.testing.assert_array_equal(planes.alpha, np.where(gray == 50, 0.0, 1.0))

    gray16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1001)
    Image.fromarray(gray16).save(tmp_path / "i16.png", transparency=7007)
    planes = read_planes(tmp_path / "i16.png")
    assert planes.layout == Layout(gray=True, alpha=True, bits=16)
    np.testing.assert_array_equal(planes.alpha, np.where(gray16 == 7007, 0.0, 1.0))
    np.testing.assert_array_equal(planes.rgb[:, :, 1], gray16 / np.float32(65535))

    rgb16 = np.random.default_rng(3).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    key = rgb16[2, 3]
    trns = struct.pack(">HHH", *key.tolist())
    chunk = struct.pack(">I", 6) + b"tRNS" + trns + struct.pack(">I", zlib.crc32(b"tRNS" + trns))
    (tmp_path / "rgb16.png").write_bytes(filtered_png(rgb16, 2, extra_chunks=chunk))
    planes = read_planes(tmp_path / "rgb16.png")
    assert planes.layout == Layout(gray=False, alpha=True, bits=16)
    np.testing.assert_array_equal(planes.alpha, np.where((rgb16 == key).all(axis=2), 0.0, 1.0))
    np.testing.assert_array_equal(stored(planes)[:, :, :3], rgb16)


def test_palettes_become_rgb_or_rgba(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2, 0, 2, 1, 0, 1])
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "pt.png", transparency=1)
    opaque, keyed = read_planes(tmp_path / "p.png"), read_planes(tmp_path / "pt.png")
    assert opaque.layout == Layout(gray=False, alpha=False) and keyed.layout == Layout(gray=False, alpha=True)
    np.testing.assert_array_equal(opaque.rgb, keyed.rgb)
    np.testing.assert_array_equal(keyed.alpha.ravel(), [1, 0, 1, 1, 1, 0, 1, 0])


def test_upscale_alpha_is_clamped_bicubic() -> None:
    constant = upscale_alpha(np.full((5, 7), 128 / 255, np.float32), 3)
    assert constant.shape == (15, 21)
    np.testing.assert_allclose(constant * 255, 128.0, atol=1e-4)
    edge = np.zeros((8, 8), np.float32)
    edge[:, 4:] = 1.0
    up = upscale_alpha(edge, 2)
    bicubic = imresize(edge.astype(np.float64), 2)
    assert up.shape == (16, 16) and bicubic.min() < 0 and bicubic.max() > 1   # the kernel overshoots a hard edge
    np.testing.assert_allclose(up, np.clip(bicubic, 0, 1), atol=1e-7)
    assert up.min() == 0.0 and up.max() == 1.0
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        upscale_alpha(np.zeros((4, 4, 1), np.float32), 2)


def test_to_samples_takes_the_channel_mean_for_gray_and_rounds_16bit() -> None:
    rgb = np.array([[[0.1, 0.2, 0.3], [1.3, 1.2, 1.1]]], np.float32)
    np.testing.assert_array_equal(to_samples(rgb, None, Layout(True, False, 8)), [[51, 255]])
    np.testing.assert_array_equal(to_samples(rgb, None, Layout(True, False, 16)), [[13107, 65535]])
    rgba = to_samples(rgb, np.array([[0.5, -1.0]], np.float32), Layout(False, True, 16))
    assert rgba.dtype == np.uint16 and rgba.shape == (1, 2, 4)
    np.testing.assert_array_equal(rgba[0, :, 3], [32768, 0])  # 32767.5 rounds half to even
    with pytest.raises(ValueError, match="alpha plane"):
        to_samples(rgb, None, Layout(False, True, 8))
    with pytest.raises(ValueError, match="NaN"):
        to_samples(np.full((1, 1, 3), np.nan, np.float32), None, Layout(False, False, 16))
    with pytest.raises(TypeError):
        png16_bytes(np.zeros((2, 2), np.uint8))


def test_unreadable_images_raise_image_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="f.tif.*mode F"):
        probe_layout(tmp_path / "f.tif")
    whole = png16_bytes(np.random.default_rng(4).integers(0, 65536, (64, 64, 3)).astype(np.uint16))
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        read_planes(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_planes(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING):
        read_planes(write_planes(tmp_path / "ok.png", *smooth_planes(Layout(False, True, 16)),
                                 Layout(False, True, 16)))
    assert "8-bit precision" not in caplog.text
