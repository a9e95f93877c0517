"""PSNR/SSIM evaluation of any :class:`~toolchain.backends.Upscaler` on the benchmark sets.

The convention of BasicSR and the 2DQuant paper (ARCHITECTURE.md section 8): the output is clamped
to [0, 1] and rounded to uint8, the HR image is mod-cropped to the scale, and PSNR/SSIM are measured
on the Y channel with ``crop_border = scale``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .backends import Upscaler
from .data.benchmark import benchmark_pairs, load_pair
from .data.io import to_uint8, write_image
from .metrics import psnr_y, ssim_y

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetResult:
    """Mean PSNR (dB) and SSIM of one test set at one scale."""

    set: str
    scale: int
    psnr: float
    ssim: float
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_set(
    upscaler: Upscaler,
    data_root: str | Path,
    set_name: str,
    scale: int,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> SetResult:
    """Upscale every LR image of ``set_name`` at ``scale`` and average PSNR-Y / SSIM-Y against HR."""
    pairs = benchmark_pairs(data_root, set_name, scale)
    psnrs, ssims = [], []
    for pair in tqdm(pairs, desc=f"{set_name} x{scale}", unit="img", disable=not progress, leave=False):
        lr, hr = load_pair(pair)
        sr = to_uint8(upscaler.upscale(lr))
        if sr.shape != hr.shape:
            raise RuntimeError(f"{pair.name}: output {sr.shape} does not match HR {hr.shape}")
        hr8 = to_uint8(hr)
        psnrs.append(psnr_y(sr, hr8, crop_border=scale))
        ssims.append(ssim_y(sr, hr8, crop_border=scale))
        log.debug("%s x%d %s: %.3f dB, SSIM %.4f", set_name, scale, pair.name, psnrs[-1], ssims[-1])
        if save_dir is not None:
            write_image(Path(save_dir) / set_name / f"x{scale}" / f"{pair.name}.png", sr)
    return SetResult(set_name, scale, sum(psnrs) / len(psnrs), sum(ssims) / len(ssims), len(pairs))


def markdown_table(results: list[SetResult]) -> str:
    """Results as a markdown table (one row per set and scale)."""
    lines = ["| set | scale | PSNR-Y (dB) | SSIM-Y | images |", "|---|---|---|---|---|"]
    lines += [f"| {r.set} | x{r.scale} | {r.psnr:.2f} | {r.ssim:.4f} | {r.images} |" for r in results]
    return "\n".join(lines)
