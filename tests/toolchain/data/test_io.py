"""Reading and writing images: formats, modes, 16-bit data, alpha, corrupt files, rounding."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from toolchain.data.io import ImageError, read_image, to_uint8, write_image
from toolchain.tolerances import JPEG_MEAN_ERROR


def smooth_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    """A smooth uint8 RGB test image (compresses well, so JPEG stays close)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
                    axis=2).astype(np.uint8)


def png_bytes(samples: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    """A minimal non-interlaced PNG (filter 0 on every row), written by hand for 16-bit colour."""
    height, width = samples.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + samples[row].astype(dtype).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_png_round_trip_is_exact(tmp_path: Path) -> None:
    pixels = smooth_rgb()
    path = write_image(tmp_path / "a.png", pixels)
    img = read_image(path)
    assert img.dtype == np.float32 and img.shape == (24, 32, 3)
    np.testing.assert_array_equal(img, pixels.astype(np.float32) / np.float32(255))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


def test_float_write_uses_round_clip_convention(tmp_path: Path) -> None:
    values = np.random.default_rng(0).uniform(-0.2, 1.2, (5, 6, 3)).astype(np.float32)
    read = read_image(write_image(tmp_path / "f.png", values))
    expected = np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(read), expected)


def test_to_uint8_rounding() -> None:
    values = np.array([-0.1, 0.0, 0.5, 0.2, 1.0, 1.7], np.float32)
    # 0.5 * 255 = 127.5 rounds half to even; 0.2 * 255 = 51.000004 in float32 -> 51
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 128, 51, 255, 255])
    same = np.arange(256, dtype=np.uint8)
    assert to_uint8(same) is same
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([np.nan], np.float32))
    with pytest.raises(TypeError):
        to_uint8(np.array([1, 2], np.int32))


def test_bmp_and_tiff_exact_jpeg_close(tmp_path: Path) -> None:
    pixels = smooth_rgb()
    for suffix in (".bmp", ".tif", ".tiff"):
        np.testing.assert_array_equal(to_uint8(read_image(write_image(tmp_path / f"a{suffix}", pixels))), pixels)
    jpeg = read_image(write_image(tmp_path / "a.jpg", pixels))
    assert np.abs(jpeg - pixels / 255.0).mean() < JPEG_MEAN_ERROR


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = smooth_rgb()[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (24, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], gray / np.float32(255))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_divides_by_65535(tmp_path: Path, suffix: str) -> None:
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5957 + 3).astype(np.uint16)
    values[0, 0], values[-1, -1] = 0, 65535
    Image.fromarray(values).save(tmp_path / f"g16{suffix}")
    assert Image.open(tmp_path / f"g16{suffix}").mode.startswith("I;16")
    img = read_image(tmp_path / f"g16{suffix}")
    expected = values.astype(np.float32) / np.float32(65535)
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], expected)
    assert img[0, 0, 0] == 0.0 and img[-1, -1, 0] == 1.0


def test_16bit_colour_png_within_one_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = np.random.default_rng(1).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_bytes(samples, color_type=2, bit_depth=16))
    with caplog.at_level(logging.WARNING):
        img = read_image(path)
    assert np.abs(img - samples / 65535.0).max() <= 1.0 / 255.0
    assert "rgb48.png" in caplog.text and "16-bit" in caplog.text


def test_alpha_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rgba = np.concatenate([smooth_rgb(), np.full((24, 32, 1), 17, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    with caplog.at_level(logging.WARNING):
        img = read_image(tmp_path / "alpha.png")
    np.testing.assert_array_equal(to_uint8(img), rgba[:, :, :3])
    assert "alpha.png" in caplog.text and "alpha" in caplog.text


def test_palette_image_expanded(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2, 0, 2, 1, 0, 1])
    palette.save(tmp_path / "p.png")
    img = to_uint8(read_image(tmp_path / "p.png"))
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(img.reshape(-1, 3), colours[[0, 1, 2, 0, 2, 1, 0, 1]])


def test_corrupt_files_raise_image_error_naming_the_file(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    for suffix in (".png", ".jpg"):
        whole = write_image(tmp_path / f"whole{suffix}", pixels).read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(ImageError, match=f"cut{suffix}"):
            read_image(cut)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        read_image(text)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match="folder.png"):
        read_image(tmp_path / "folder.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global Pillow state untouched


def test_write_image_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown image suffix"):
        write_image(tmp_path / "a.gif", smooth_rgb())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "a.png", np.full((4, 4, 3), np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []
