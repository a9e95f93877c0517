"""MATLAB-compatible bicubic resizing, and the bicubic degradation that makes LR images from HR.

The SR benchmarks' LR images were made with MATLAB's ``imresize(img, 1/s, 'bicubic')``; matching its
kernel, its output size rule and its boundary handling is what makes our LR (for calibration and
training patches) look like the LR the models are evaluated on. The algorithm, per axis:

- output size ``ceil(scale * size)``;
- output pixel ``x`` (1-based) sits at input coordinate ``u = x / scale + (1 - 1 / scale) / 2``;
- Keys cubic kernel with ``a = -0.5`` (support 4); when shrinking with antialiasing the kernel is
  stretched by ``1 / scale`` (support ``4 / scale``) and its height scaled by ``scale``;
- ``ceil(support) + 2`` taps starting at ``floor(u - support / 2)``, weights normalized to sum to 1;
- taps outside the image are mirrored with the edge pixel repeated (MATLAB's ``symmetric``).

Each axis becomes one dense ``(out, in)`` weight matrix applied with one matmul, rows first. For
uint8 images MATLAB rounds (half away from zero) after each axis; we do the same, and so reproduce the
MATLAB-made LR of Set5 and Set14 bit for bit (a float resize rounded once matches 85-90% of pixels).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

from .io import to_uint8

#: Keys cubic convolution parameter used by MATLAB (and BasicSR)
CUBIC_A = -0.5
#: support of the unscaled cubic kernel, in pixels
CUBIC_SUPPORT = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with ``a = -0.5``, evaluated elementwise (float64)."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (CUBIC_A * ax3 - 5.0 * CUBIC_A * ax2 + 8.0 * CUBIC_A * ax - 4.0 * CUBIC_A) * (
        (ax > 1.0) & (ax <= 2.0)
    )
    return near + far


def output_size(size: int, scale: float) -> int:
    """MATLAB's output length ``ceil(scale * size)``, taken exactly for scales such as 1/3.

    ``scale`` is read as the nearest fraction with a small denominator so that float noise
    (``(1/3) * 255 = 85.00000000000001``) cannot add a pixel.
    """
    exact = Fraction(scale).limit_denominator(10_000)
    if abs(float(exact) - scale) > 1e-12 * max(1.0, scale):
        return math.ceil(scale * size)
    return math.ceil(exact * size)


def weight_matrix(in_size: int, out_size: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Dense ``(out_size, in_size)`` float64 matrix: ``resized = W @ signal`` along one axis."""
    # shrinking with antialiasing stretches the kernel by 1/scale (and flattens it by scale)
    stretch = scale if scale < 1.0 and antialiasing else 1.0
    support = CUBIC_SUPPORT / stretch
    x = np.arange(1, out_size + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - support / 2.0)
    taps = int(math.ceil(support)) + 2
    index = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may be out of range
    weights = stretch * cubic(stretch * (u[:, None] - index))
    weights /= weights.sum(axis=1, keepdims=True)
    # symmetric padding: ... 2 1 | 1 2 ... n | n n-1 ... (period 2n)
    zero_based = np.mod(index.astype(np.int64) - 1, 2 * in_size)
    source = np.where(zero_based < in_size, zero_based, 2 * in_size - 1 - zero_based)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], source.shape)
    np.add.at(matrix, (rows, source), weights)  # mirrored taps can land on the same pixel
    return matrix


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Resize an image by ``scale`` with MATLAB's bicubic ``imresize``.

    Float images are resized in float64 and returned in their dtype, unclipped and unrounded.
    uint8 images follow MATLAB's uint8 path: after each axis the result is rounded half away from
    zero and saturated to 0..255. That intermediate rounding is what the benchmarks' LR images went
    through; with it our LR matches theirs bit for bit (see the tests).

    Args:
        img: ``(H, W)`` or ``(H, W, C)``, float (any range) or uint8.
        scale: positive factor, e.g. ``1/4`` to shrink by 4 or ``2`` to enlarge.
        antialiasing: widen the kernel when shrinking, as MATLAB does by default.

    Returns:
        ``(ceil(scale*H), ceil(scale*W)[, C])`` array of ``img``'s dtype.

    >>> imresize(np.ones((8, 8, 3), np.float32), 1 / 4).shape
    (2, 2, 3)
    """
    if not isinstance(img, np.ndarray) or not (
        np.issubdtype(img.dtype, np.floating) or img.dtype == np.uint8
    ):
        kind = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
        raise TypeError(f"imresize expects a float or uint8 numpy array, got {kind}")
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an (H, W) or (H, W, C) array, got shape {img.shape}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    scale = float(scale)
    height, width = img.shape[:2]
    out_h, out_w = output_size(height, scale), output_size(width, scale)
    if min(height, width, out_h, out_w) < 1:
        raise ValueError(f"cannot resize an image of shape {img.shape} by {scale}")
    rows = weight_matrix(height, out_h, scale, antialiasing)
    cols = weight_matrix(width, out_w, scale, antialiasing)
    integer = img.dtype == np.uint8
    data = img.astype(np.float64)
    # MATLAB resizes along the dimension with the smaller scale first; with one scale: rows first
    data = _resize_axis(data, rows, axis=0)  # (out_h, W[, C])
    if integer:
        data = _round_saturate_uint8(data)
    data = _resize_axis(data, cols, axis=1)  # (out_h, out_w[, C])
    if integer:
        data = _round_saturate_uint8(data)
    return data.astype(img.dtype)


def _resize_axis(data: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """Apply an ``(out, in)`` weight matrix along ``axis`` of ``data`` (one batched matmul)."""
    return np.moveaxis(np.moveaxis(data, axis, -1) @ matrix.T, -1, axis)


def _round_saturate_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's conversion of doubles to uint8: round half away from zero, clamp to 0..255."""
    return np.clip(np.floor(values + 0.5), 0.0, 255.0)


def _check_integer_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop ``(H, W, ...)`` at the bottom/right to the largest multiple of ``scale`` (a view)."""
    scale = _check_integer_scale(scale)
    height, width = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    if height == 0 or width == 0:
        raise ValueError(f"image of shape {img.shape} is smaller than the scale {scale}")
    return img[:height, :width]


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """Make the LR image of an HR image as the SR benchmarks did: MATLAB ``imresize(uint8, 1/s)``.

    The benchmark LR images (and BasicSR's training LR) were made by MATLAB from uint8 images, so
    the image is taken to 8 bits first and resized on MATLAB's uint8 path (:func:`imresize`).

    Args:
        hr: ``(H, W[, C])`` uint8, or float in [0, 1] (quantized with :func:`~toolchain.data.io.to_uint8`);
            ``H`` and ``W`` multiples of ``scale`` (see :func:`mod_crop`).
        scale: integer SR factor.

    Returns:
        ``(H/scale, W/scale[, C])`` float32 in [0, 1], on the 8-bit levels ``k / 255``.

    >>> bicubic_degrade(np.zeros((8, 12, 3), np.uint8), 4).shape
    (2, 3, 3)
    """
    scale = _check_integer_scale(scale)
    if hr.shape[0] % scale or hr.shape[1] % scale:
        raise ValueError(f"HR shape {hr.shape} is not a multiple of the scale {scale}; mod_crop it first")
    if hr.dtype != np.uint8:
        if not np.issubdtype(hr.dtype, np.floating):
            raise TypeError(f"bicubic_degrade expects uint8 or float [0, 1] images, got {hr.dtype}")
        hr = to_uint8(hr)
    return imresize(hr, 1.0 / scale).astype(np.float32) / np.float32(255.0)
