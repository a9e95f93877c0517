"""The reference's own noise: how far the fake-quant model moves from itself under float-sized input noise.

An engine cannot be expected to agree with the reference better than this: float layers that differ
in the last bits move values by about as much, and a quantized model that is sensitive to that (each
flipped code feeds later quantizers) shows it here without any engine involved. The first draw sets
the PSNR floor of :class:`engines.compare.Verdict`, all draws the spread of its task check.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolchain.backends import Upscaler
from toolchain.tolerances import DEFAULT_NOISE_SIGMA, FP16_NOISE_SIGMA

from .compare import Agreement, compare_upscalers, reference_upscaler


def noise_sigma(float_dtype: str) -> float:
    """The input noise the reference's own floor is measured at for an engine with ``float_dtype`` float
    layers (``"fp32"`` or ``"fp16"``): about the size of the rounding its float layers do.

    >>> noise_sigma("fp32"), noise_sigma("fp16") == 2 ** -11
    (1e-06, True)
    """
    return _by_dtype({"fp32": DEFAULT_NOISE_SIGMA, "fp16": FP16_NOISE_SIGMA}, float_dtype)


def _by_dtype(values: dict[str, float], float_dtype: str) -> float:
    if float_dtype not in values:
        raise ValueError(f"float dtype must be one of {tuple(values)}, got {float_dtype!r}")
    return values[float_dtype]


@dataclass
class Perturbed:
    """An upscaler fed its input plus seeded Gaussian noise of standard deviation ``sigma``."""

    upscaler: Upscaler
    sigma: float
    seed: int = 0

    def __post_init__(self) -> None:
        self.scale = self.upscaler.scale

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(self.seed).standard_normal(lr.shape).astype(np.float32)
        return self.upscaler.upscale(lr + self.sigma * noise)


def noise_floor(weights: str | os.PathLike, calib: str | os.PathLike, images: Sequence[tuple[str, np.ndarray]],
                tile: int, *, sigma: float = DEFAULT_NOISE_SIGMA, overlap: int = 16, batch: int = 4,
                device: str = "cpu", progress: bool = False, draws: int = 1,
                reference: Upscaler | None = None) -> list[Agreement]:
    """Agreements of the fake-quant model with itself when its input moves by ``sigma``, one per seeded
    draw (``draws`` of them). The clean outputs are computed once, or taken from ``reference``
    (:func:`engines.compare.reference_upscaler`, shared with :func:`engines.compare.verify_engine`)."""
    if draws < 1:
        raise ValueError(f"noise draws must be positive, got {draws}")
    if reference is None:
        reference = reference_upscaler(weights, calib, tile, overlap=overlap, batch=batch, device=device)
    perturbed = getattr(reference, "upscaler", reference)  # noise on the model itself, not on remembered outputs
    return [compare_upscalers(Perturbed(perturbed, sigma, seed), reference, images, progress)
            for seed in range(draws)]


def task_noise(draws: Sequence[Agreement]) -> tuple[float, float] | None:
    """RMS of the task (PSNR, SSIM) differences of noise draws (None without HR)."""
    tasks = [draw.task for draw in draws]
    if not tasks or any(task is None for task in tasks):
        return None
    return (math.sqrt(sum(t["psnr_difference"] ** 2 for t in tasks) / len(tasks)),
            math.sqrt(sum(t["ssim_difference"] ** 2 for t in tasks) / len(tasks)))
