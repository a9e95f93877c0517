"""Reading and writing RGB images as float arrays in [0, 1].

Every image enters the toolchain through :func:`read_image` as ``(H, W, 3)`` float32 RGB and leaves
through :func:`to_uint8` / :func:`write_image` with the SR convention ``round(clip(x, 0, 1) * 255)``
(BasicSR's ``tensor2img``, which the 2DQuant evaluation uses).
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..files import atomic_path

log = logging.getLogger(__name__)

#: Pillow formats we read, and the file suffixes we write them under
READ_FORMATS = ("PNG", "BMP", "JPEG", "TIFF")
WRITE_FORMATS = {".png": "PNG", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
#: suffixes :func:`toolchain.data.patches.list_images` picks up
IMAGE_SUFFIXES = tuple(WRITE_FORMATS)
#: JPEG is lossy; written only on request, at a quality that keeps SR outputs inspectable
JPEG_QUALITY = 95
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """A file that is not a readable image, or holds one we cannot convert to RGB."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` float32 RGB in [0, 1].

    PNG, BMP, JPEG and TIFF are read with Pillow and decoded in full, so a truncated file fails
    here rather than later. Grayscale becomes three equal channels; palettes are expanded; alpha is
    dropped (with a warning; :func:`toolchain.data.image_modes.read_planes` keeps it, and 16-bit
    colour); 16-bit grayscale is divided by 65535. 16-bit colour images are given
    to us by Pillow at 8 bits (high byte of each sample), which is logged. EXIF orientation is not
    applied: pixels are returned as stored, so HR/LR pairs stay aligned.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageError: the file is not a readable PNG/BMP/JPEG/TIFF image.

    >>> from toolchain.defaults import DEFAULT_DATA
    >>> read_image(DEFAULT_DATA / "Set5" / "HR" / "baby.png").shape
    (512, 512, 3)
    """
    with opened_image(path) as img:
        colour_16bit = _is_16bit_colour(img)
        img.load()  # decode everything now: a truncated file must fail here
        array = _to_rgb_array(img, Path(path))
    if colour_16bit:
        log.warning("%s: 16-bit colour samples read at 8-bit precision (Pillow keeps the high byte)", path)
    return array


@contextlib.contextmanager
def opened_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open ``path`` with Pillow (header only, nothing decoded yet) for the ``with`` block.

    Every decoding failure inside the block (Pillow's, zlib's, a truncated file's) is raised as
    :class:`ImageError` naming the file, so callers that decode in their own way keep
    :func:`read_image`'s errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageError: the file is not a readable PNG/BMP/JPEG/TIFF image, or fails to decode.
    """
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path, formats=READ_FORMATS) as img:
            yield img
    except ImageError:
        raise
    except UnidentifiedImageError as err:
        raise ImageError(f"{path}: not a readable {'/'.join(READ_FORMATS)} image") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: refused by Pillow's size limit ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from err


def _is_16bit_colour(img: Image.Image) -> bool:
    """Whether Pillow will reduce this file's 16-bit colour samples to 8 bits (seen before load)."""
    rawmodes = [getattr(tile, "args", None) for tile in getattr(img, "tile", ()) or ()]
    for args in rawmodes:
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and rawmode.startswith(("RGB;16", "RGBA;16", "LA;16")):
            return True
    return False


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Loaded Pillow image -> ``(H, W, 3)`` float32 in [0, 1]."""
    mode = img.mode
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        log.warning("%s: alpha channel (mode %s) dropped", path, mode)
    if mode in _SIXTEEN_BIT_GRAY:
        gray = np.asarray(img).astype(np.float32) / np.float32(65535.0)
    elif mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535 "
                             f"({values.min()}..{values.max()}); expected 8- or 16-bit data")
        gray = values.astype(np.float32) / np.float32(65535.0)
    elif mode == "F":
        raise ImageError(f"{path}: floating-point image (mode F) has no defined range; "
                         "expected 8- or 16-bit data")
    elif mode in ("1", "L", "LA", "La"):
        gray = np.asarray(img.convert("L")).astype(np.float32) / np.float32(255.0)
    else:  # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, ...: Pillow converts to RGB, dropping alpha
        rgb = img if mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb).astype(np.float32) / np.float32(255.0)
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 as ``round(clip(x, 0, 1) * 255)`` (uint8 passes through).

    Computed in the input's float dtype (float32 stays float32, as BasicSR's ``tensor2img``);
    ``np.round`` rounds halves to even.

    >>> to_uint8(np.array([0.0, 0.5, 1.2], np.float32))
    array([  0, 128, 255], dtype=uint8)
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"to_uint8 expects a numpy array, got {type(img).__name__}")
    if img.dtype == np.uint8:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"to_uint8 expects a float image in [0, 1] or uint8, got {img.dtype}")
    if np.isnan(img).any():
        raise ValueError("to_uint8: image contains NaN values")
    return np.round(np.clip(img, 0, 1) * img.dtype.type(255)).astype(np.uint8)


def write_image(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` (or ``(H, W)``) float [0, 1] or uint8 image, atomically.

    The format follows the suffix (.png, .bmp, .jpg/.jpeg at quality 95, .tif/.tiff). Floats are
    quantized with :func:`to_uint8`. Nothing is left under ``path`` if writing fails.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_image(Path(folder) / "gray.png", np.full((4, 6, 3), 0.5, np.float32))
    ...     path.name, read_image(path).shape, to_uint8(read_image(path))[0, 0]
    ('gray.png', (4, 6, 3), array([128, 128, 128], dtype=uint8))
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; expected one of "
                         f"{', '.join(WRITE_FORMATS)}")
    if not isinstance(img, np.ndarray) or not (
        img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)
    ):
        shape = getattr(img, "shape", type(img).__name__)
        raise ValueError(f"{path}: expected an (H, W, 3) or (H, W) image array, got {shape}")
    pixels = np.ascontiguousarray(to_uint8(img))
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=fmt, **options)
    return path
