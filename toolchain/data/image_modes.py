"""Images as stored: grayscale or colour, with or without alpha, 8 or 16 bits per sample.

:func:`read_image` hands the SR code plain RGB; an upscaler that must give back what the image had
(``2dq-upscale``) reads it here instead. :func:`read_planes` splits an image into the ``(H, W, 3)``
float32 RGB in [0, 1] every SR model takes (grayscale replicated to three channels) and the alpha
plane ``(H, W)`` apart, together with its :class:`Layout`; :func:`write_planes` writes an upscaled
result back in a layout: one channel for grayscale, alpha re-attached, 16-bit samples as
``round(clip(x, 0, 1) * 65535)``.

Pillow gives 16-bit colour PNGs (48-bit RGB, 64-bit RGBA, 32-bit gray+alpha) at 8 bits and has no
mode to write them. We read them with Pillow's own PNG decoder told to unpack other bytes of the
same pixels (:func:`_png16_samples`) and write them with a small PNG encoder
(:func:`png16_bytes`). 16-bit colour in other formats (TIFF) is still read at 8 bits, with a warning.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_path
from .imresize import imresize
from .io import JPEG_QUALITY, WRITE_FORMATS, ImageError, opened_image, to_uint8

log = logging.getLogger(__name__)

_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Pillow's raw modes for 16-bit colour PNGs -> (gray, alpha, raw modes whose unpacked bytes make the samples)
_PNG16_COLOUR = {
    "RGB;16B": (False, False, ("RGB;16B", "RGB;16L")),    # high bytes, then low bytes (same 48-bit pixels)
    "RGBA;16B": (False, True, ("RGBA;16B", "RGBA;16L")),
    "LA;16B": (True, True, ("RGBA",)),                     # 4 bytes a pixel, unpacked as they are
}
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Layout:
    """What an image holds: one channel or three, an alpha plane or not, 8 or 16 bits per sample."""

    gray: bool
    alpha: bool
    bits: int = 8

    def __str__(self) -> str:
        return f"{self.bits}-bit {'grayscale' if self.gray else 'RGB'}{' with alpha' if self.alpha else ''}"


@dataclass(frozen=True)
class Planes:
    """An image split for SR: ``rgb`` ``(H, W, 3)`` float32 in [0, 1], ``alpha`` ``(H, W)`` or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    layout: Layout


def probe_layout(path: str | os.PathLike) -> Layout:
    """The :class:`Layout` of an image file, from its header (nothing is decoded).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(Path(folder) / "logo.png")
    ...     probe_layout(Path(folder) / "logo.png")
    Layout(gray=False, alpha=True, bits=8)
    """
    with opened_image(path) as img:
        return _layout_of(img)


def read_planes(path: str | os.PathLike) -> Planes:
    """Read an image file as :class:`Planes`, keeping alpha and 16-bit precision.

    Grayscale (``1``, ``L``, ``LA``, 16-bit) is replicated to three equal channels; palettes and
    other colour modes are converted to RGB(A) by Pillow; tRNS transparency becomes an alpha plane
    (0 where a pixel equals the transparent colour). Samples are divided by 255 or 65535.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageError: the file is not a readable image, or its values have no 8/16-bit range.
    """
    path = Path(path)
    with opened_image(path) as img:
        layout = _layout_of(img)
        rawmode = _rawmode(img)
        transparency = img.info.get("transparency")
        if rawmode in _PNG16_COLOUR and img.format == "PNG":
            samples = _png16_samples(path, _PNG16_COLOUR[rawmode][2], key=transparency)
        elif img.mode in _SIXTEEN_BIT_GRAY:
            img.load()  # decode everything now: a truncated file must fail here
            samples = _gray16_samples(img, path, key=transparency if layout.alpha else None)
        else:
            img.load()
            target = ("LA" if layout.alpha else "L") if layout.gray else ("RGBA" if layout.alpha else "RGB")
            samples = np.asarray(img if img.mode == target else img.convert(target))
    if _rawmode_is_16bit_colour(rawmode) and layout.bits == 8:
        log.warning("%s: 16-bit colour samples read at 8-bit precision (Pillow keeps the high byte)", path)
    values = samples.astype(np.float32) / np.float32(65535.0 if layout.bits == 16 else 255.0)
    values = values.reshape(*values.shape[:2], -1)  # (H, W, C), C = colour channels + alpha
    colour, alpha = (values[:, :, :-1], values[:, :, -1]) if layout.alpha else (values, None)
    rgb = np.repeat(colour, 3, axis=2) if layout.gray else colour
    return Planes(np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha), layout)


def _rawmode(img: Image.Image) -> str | None:
    """The raw mode of the first tile Pillow will decode (the file's sample layout), if it says one."""
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        return rawmode if isinstance(rawmode, str) else None
    return None


def _rawmode_is_16bit_colour(rawmode: str | None) -> bool:
    return rawmode is not None and rawmode.startswith(("RGB;16", "RGBA;16", "LA;16"))


def _layout_of(img: Image.Image) -> Layout:
    """Layout of an opened (not yet decoded) Pillow image."""
    mode, rawmode = img.mode, _rawmode(img)
    keyed = "transparency" in img.info
    if mode == "F":
        raise ImageError(f"{img.filename}: floating-point image (mode F) has no defined range; "
                         "expected 8- or 16-bit data")
    if img.format == "PNG" and rawmode in _PNG16_COLOUR:
        gray, alpha, _ = _PNG16_COLOUR[rawmode]
        return Layout(gray, alpha or keyed, 16)
    if mode in _SIXTEEN_BIT_GRAY:
        return Layout(True, keyed, 16)
    if mode in ("1", "L", "LA", "La"):
        return Layout(True, keyed or mode in ("LA", "La"), 8)
    # RGB, RGBA, palettes (converted to RGB(A) as in read_image), CMYK, YCbCr, LAB, ...
    return Layout(False, keyed or mode in ("RGBA", "RGBa", "PA"), 8)


def _gray16_samples(img: Image.Image, path: Path, key: int | None) -> np.ndarray:
    """Decoded 16-bit grayscale -> ``(H, W)`` or, with a tRNS ``key``, ``(H, W, 2)`` (gray, alpha) int64."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535 "
                         f"({values.min()}..{values.max()}); expected 8- or 16-bit data")
    if key is None:
        return values
    return np.stack([values, np.where(values == key, 0, 65535)], axis=2)


def _png16_samples(path: Path, rawmodes: tuple[str, ...], key: tuple[int, ...] | None) -> np.ndarray:
    """The 16-bit samples ``(H, W, C)`` uint16 of a 16-bit colour PNG, decoded by Pillow.

    Pillow's PNG decoder undoes the row filters for the file's pixel size and then unpacks each pixel
    by a raw mode. A raw mode of the same pixel size that picks other bytes sees the same
    (unfiltered) pixels: ``RGB;16L`` keeps the second byte of each big-endian sample, i.e. the low
    byte that ``RGB;16B`` drops; ``RGBA`` copies a 4-byte gray+alpha pixel as it is.
    """
    decoded = []
    for rawmode in rawmodes:
        with Image.open(path, formats=("PNG",)) as img:
            img.tile = [tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode)
                        for tile in img.tile]
            img.load()
            decoded.append(np.asarray(img).astype(np.uint16))
    if len(decoded) == 2:
        samples = (decoded[0] << 8) | decoded[1]                          # (H, W, C)
    else:
        samples = (decoded[0][:, :, 0::2] << 8) | decoded[0][:, :, 1::2]  # (H, W, 2): gray, alpha
    if key is not None and samples.shape[2] == 3:  # tRNS: one 16-bit RGB colour is transparent
        opaque = np.any(samples != np.asarray(key, np.uint16), axis=2)
        samples = np.concatenate([samples, np.where(opaque, 65535, 0).astype(np.uint16)[:, :, None]], axis=2)
    return samples


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Alpha plane ``(H, W)`` in [0, 1] -> ``(scale*H, scale*W)`` by bicubic ``imresize``, clamped to [0, 1].

    The SR models are trained on colour only, so alpha is interpolated, not super-resolved; the
    clamp removes the bicubic kernel's overshoot at sharp edges.

    >>> upscale_alpha(np.full((4, 4), 0.5, np.float32), 2).shape
    (8, 8)
    """
    if alpha.ndim != 2:
        raise ValueError(f"upscale_alpha expects an (H, W) alpha plane, got shape {alpha.shape}")
    return np.clip(imresize(alpha.astype(np.float64), scale), 0.0, 1.0).astype(np.float32)


def storage_problem(path: str | os.PathLike, layout: Layout) -> str | None:
    """Why ``path``'s format (from its suffix) cannot store an image of ``layout``, or None if it can.

    PNG stores every layout; TIFF 8-bit gray/RGB with or without alpha and 16-bit grayscale; BMP and
    JPEG 8-bit gray or RGB only (Pillow reads a 32-bit BMP's fourth byte back as padding).
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        return f"unknown image suffix {path.suffix!r}; expected one of {', '.join(WRITE_FORMATS)}"
    missing = _unstorable(fmt, layout)
    if not missing:
        return None
    fits = [suffix for suffix, other in WRITE_FORMATS.items() if not _unstorable(other, layout)]
    return (f"{fmt} cannot store {' and '.join(missing)} (the image is {layout}); expected a suffix that can: "
            f"{', '.join(fits)}")


def _unstorable(fmt: str, layout: Layout) -> list[str]:
    """What of ``layout`` the format ``fmt`` would lose (empty when nothing)."""
    if fmt == "PNG":
        return []
    if fmt == "TIFF":
        return ["16-bit colour or alpha"] if layout.bits == 16 and (layout.alpha or not layout.gray) else []
    return [what for what, present in (("an alpha channel", layout.alpha), ("16-bit samples", layout.bits == 16))
            if present]


def to_samples(rgb: np.ndarray, alpha: np.ndarray | None, layout: Layout) -> np.ndarray:
    """Float planes -> the stored samples of ``layout``: ``(H, W)`` or ``(H, W, C)`` uint8 / uint16.

    ``rgb`` ``(H, W, 3)`` (any float range; clipped to [0, 1]); ``alpha`` ``(H, W)`` when
    ``layout.alpha``. 8 bits: :func:`to_uint8`; 16 bits: ``round(clip(x, 0, 1) * 65535)``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    if layout.alpha != (alpha is not None) or (alpha is not None and alpha.shape != rgb.shape[:2]):
        raise ValueError(f"a {layout} image needs an alpha plane of shape {rgb.shape[:2]}, "
                         f"got {None if alpha is None else alpha.shape}")
    # the model saw three equal channels; what differs between its outputs is error, not colour, so
    # the plain mean (each channel an equal estimate) rather than a luma weighting favouring green
    colour = rgb.mean(axis=2, keepdims=True, dtype=np.float32) if layout.gray else rgb
    planes = colour if alpha is None else np.concatenate([colour, alpha[:, :, None].astype(colour.dtype)], axis=2)
    if layout.bits == 16:
        if np.isnan(planes).any():
            raise ValueError("image contains NaN values")
        samples = np.round(np.clip(planes.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
    else:
        samples = to_uint8(planes)
    return samples[:, :, 0] if samples.shape[2] == 1 else samples


def write_planes(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None, layout: Layout) -> Path:
    """Write float planes as an image of ``layout``, atomically (format from the suffix).

    Raises ``ValueError`` (naming ``path``) when the format cannot store ``layout``
    (:func:`storage_problem`); nothing is left under ``path`` if writing fails.

    A grayscale image with alpha, upscaled x4 (nearest-neighbour stands in for the SR model here):

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.new("LA", (8, 8), (200, 128)).save(Path(folder) / "logo.png")
    ...     planes = read_planes(Path(folder) / "logo.png")
    ...     sr = planes.rgb.repeat(4, axis=0).repeat(4, axis=1)   # (32, 32, 3)
    ...     out = write_planes(Path(folder) / "logo_x4.png", sr, upscale_alpha(planes.alpha, 4), planes.layout)
    ...     with Image.open(out) as img:
    ...         img.mode, img.size, img.getpixel((5, 5))
    ('LA', (32, 32), (200, 128))
    """
    path = Path(path)
    problem = storage_problem(path, layout)
    if problem:
        raise ValueError(f"{path}: {problem}")
    samples = np.ascontiguousarray(to_samples(rgb, alpha, layout))
    fmt = WRITE_FORMATS[path.suffix.lower()]
    with atomic_path(path) as tmp:
        if fmt == "PNG" and layout.bits == 16:
            tmp.write_bytes(png16_bytes(samples))
        else:  # Pillow picks L / LA / RGB / RGBA / I;16 from the array's shape and dtype
            Image.fromarray(samples).save(tmp, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return path


def png16_bytes(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``(H, W)`` or ``(H, W, C)`` uint16 samples, C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA.

    Rows use the Sub filter (each byte minus the byte one pixel to its left), which lets zlib
    compress smooth images several times better than raw rows, and is one vectorized subtraction.
    """
    if samples.dtype != np.uint16:
        raise TypeError(f"png16_bytes expects uint16 samples, got {samples.dtype}")
    pixels = samples.reshape(*samples.shape[:2], -1)
    height, width, channels = pixels.shape
    if channels not in _PNG_COLOUR_TYPE or not (height and width):
        raise ValueError(f"png16_bytes expects a non-empty (H, W) or (H, W, 1..4) array, got {samples.shape}")
    raw = pixels.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    pixel_bytes = channels * 2
    filtered = raw.copy()
    filtered[:, pixel_bytes:] -= raw[:, :-pixel_bytes]  # uint8 arithmetic wraps modulo 256, as PNG's filters do
    rows = np.concatenate([np.ones((height, 1), np.uint8), filtered], axis=1)  # filter type 1 (Sub)
    header = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
