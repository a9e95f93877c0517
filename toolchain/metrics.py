"""Image quality metrics: PSNR and SSIM on the Y channel as the SR literature reports them, and the
statistics of the difference between two outputs (:func:`output_difference`) every comparison uses.

The convention is BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel=True``
(ARCHITECTURE.md section 8): uint8 RGB images, ``crop_border`` pixels removed from every side, luma
``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (ITU-R BT.601, RGB in [0, 1], Y in [16, 235], not
rounded), PSNR against a peak of 255, SSIM with an 11x11 Gaussian window (sigma 1.5) over the
positions where the window fits. We compute Y in float64; BasicSR does it in float32, which moves
PSNR by far less than 0.001 dB. Every PSNR here comes from :func:`psnr_from_mse`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import correlate1d

from .data.io import to_uint8

#: BT.601 luma weights for RGB in [0, 1] and the offset, giving Y in [16, 235]
Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
Y_OFFSET = 16.0
PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * PEAK) ** 2
SSIM_C2 = (0.03 * PEAK) ** 2


def psnr_from_mse(mse: float, peak: float) -> float:
    """PSNR (dB) of a mean squared error ``mse`` against the peak value ``peak``; ``inf`` for a zero error.

    >>> psnr_from_mse(0.01, peak=1.0), psnr_from_mse(0.0, peak=255.0)
    (20.0, inf)
    """
    if mse < 0:
        raise ValueError(f"a mean squared error cannot be negative, got {mse!r}")
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` -> float64 luma ``(H, W)`` in [16, 235]."""
    return (img.astype(np.float64) / 255.0) @ Y_WEIGHTS + Y_OFFSET


def _y_pair(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    """Check two uint8 RGB images, crop their borders and return their Y channels."""
    for name, img in (("sr", sr), ("hr", hr)):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"{name} must be a uint8 (H, W, 3) RGB array, got {desc}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr differ in shape: sr {sr.shape}, hr {hr.shape} "
                         "(mod-crop HR to a multiple of the scale and crop SR to it)")
    if isinstance(crop_border, bool) or not isinstance(crop_border, numbers.Integral) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}")
    if 2 * crop_border >= min(sr.shape[:2]):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {sr.shape[1]}x{sr.shape[0]} image")
    crop_border = int(crop_border)
    if crop_border:
        sr = sr[crop_border:-crop_border, crop_border:-crop_border]
        hr = hr[crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(sr), rgb_to_y(hr)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) between the Y channels of two uint8 RGB images ``(H, W, 3)``; ``inf`` if equal.

    >>> psnr_y(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), crop_border=2)
    inf
    """
    y_sr, y_hr = _y_pair(sr, hr, crop_border)
    return psnr_from_mse(float(np.mean((y_sr - y_hr) ** 2)), PEAK)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian of ``size`` taps summing to 1 (the separable factor of SSIM's window)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Correlate with the separable window ``taps x taps``, keeping only fully covered positions."""
    half = len(taps) // 2
    out = correlate1d(correlate1d(img, taps, axis=0, mode="nearest"), taps, axis=1, mode="nearest")
    return out[half:-half, half:-half]


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """SSIM between the Y channels of two uint8 RGB images ``(H, W, 3)`` (1.0 if equal).

    The mean of the SSIM map over the positions where the 11x11 window fits inside the cropped image.

    >>> ssim_y(np.full((16, 16, 3), 7, np.uint8), np.full((16, 16, 3), 7, np.uint8), crop_border=0)
    1.0
    """
    y_sr, y_hr = _y_pair(sr, hr, crop_border)
    if min(y_sr.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, "
                         f"got {y_sr.shape[1]}x{y_sr.shape[0]}")
    taps = gaussian_window()
    mu_x, mu_y = _filter_valid(y_sr, taps), _filter_valid(y_hr, taps)
    var_x = _filter_valid(y_sr * y_sr, taps) - mu_x * mu_x
    var_y = _filter_valid(y_hr * y_hr, taps) - mu_y * mu_y
    cov = _filter_valid(y_sr * y_hr, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return float(ssim_map.mean())


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float) -> float:
    """PSNR (dB) of two same-shape float arrays or tensors with peak ``data_range``; ``inf`` if equal.

    Computed in float64. Used to compare engine outputs with the reference (e.g. ``data_range=1``).

    >>> round(psnr(np.zeros(4), np.full(4, 0.1), data_range=1.0), 6)
    20.0
    """
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ: {x.shape} vs {y.shape}")
    if isinstance(data_range, bool) or not (isinstance(data_range, numbers.Real) and data_range > 0):
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    if x.size == 0:
        raise ValueError("psnr: empty inputs")
    mse = float(np.mean((x - y) ** 2))
    if math.isnan(mse):
        raise ValueError("psnr: inputs contain NaN")
    return psnr_from_mse(mse, data_range)


def _as_float64(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class OutputDifference:
    """How far an output is from a reference output of the same shape (float images in [0, 1]).

    Sums and counts rather than means, so that several pairs pool with every value weighing the same:
    ``squared_error`` is the sum of squared differences of the outputs clipped to [0, 1] (what a viewer
    sees); ``identical`` counts values with equal 8-bit levels (:func:`toolchain.data.io.to_uint8`);
    ``abs_error`` and ``max_abs_error`` are the sum and maximum of the raw absolute differences (values
    outside [0, 1] included). ``abs_error_quantiles``: ``{q: quantile of the raw absolute differences}``
    for the quantiles asked for.
    """

    values: int
    squared_error: float
    identical: int
    abs_error: float
    max_abs_error: float
    abs_error_quantiles: dict[float, float] = field(default_factory=dict)

    @property
    def psnr(self) -> float:
        """PSNR (dB, peak 1) of the clipped outputs; ``inf`` when they are equal."""
        return psnr_from_mse(self.squared_error / self.values, 1.0)

    @property
    def identical_pixels(self) -> float:
        """Share of values whose 8-bit levels are equal."""
        return self.identical / self.values

    @property
    def mean_abs_error(self) -> float:
        return self.abs_error / self.values


def output_difference(output: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                      quantiles: Sequence[float] = ()) -> OutputDifference:
    """The statistics of ``output - reference`` (same shape, any layout; float), computed in float64.

    The 8-bit levels are rounded in each side's own float dtype (float32 stays float32, as written images).

    >>> ref = np.zeros((2, 2, 3), np.float32)
    >>> out = ref.copy(); out[0, 0, 0] = 0.5; out[1, 1, 2] = -0.25   # one value off, one below 0
    >>> d = output_difference(out, ref, quantiles=(0.5,))
    >>> d.values, d.identical, d.max_abs_error, d.mean_abs_error, d.abs_error_quantiles
    (12, 11, 0.5, 0.0625, {0.5: 0.0})
    >>> round(d.psnr, 6)   # from the clipped outputs: the negative value does not count
    16.812412
    """
    a, b = _as_array(output), _as_array(reference)
    if a.shape != b.shape:
        raise ValueError(f"output {a.shape} and reference {b.shape} differ in shape")
    if a.size == 0:
        raise ValueError("output_difference: empty outputs")
    x, y = a.astype(np.float64), b.astype(np.float64)
    error = np.abs(x - y)
    return OutputDifference(
        values=int(a.size),
        squared_error=float(np.sum((np.clip(x, 0, 1) - np.clip(y, 0, 1)) ** 2)),
        identical=int(np.count_nonzero(to_uint8(a) == to_uint8(b))),
        abs_error=float(np.sum(error)),
        max_abs_error=float(np.max(error)),
        abs_error_quantiles={q: float(np.quantile(error, q)) for q in quantiles},
    )


def _as_array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array of ``value`` in its own float dtype (bfloat16, which numpy lacks, as float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)
