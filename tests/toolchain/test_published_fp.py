"""The float DAT-light through spandrel and our evaluator reproduces the published PSNR/SSIM.

Published (DAT paper, supplementary table; ../shared/README.md): x2 Set5 38.24 dB, x4 32.57 dB / 0.8991,
x4 Set14 28.87 dB. B100 (x2 32.34, x4 27.74; 100 images, minutes on a CPU) and x2 Set14 are recorded by
benchmarks/ptq_grid.py in benchmarks/dat_light_ptq.md: x2 38.236 / 34.013 / 32.350, x4 32.571 / 28.869 / 27.749.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from toolchain import load_model
from toolchain.backends import TorchUpscaler
from toolchain.evaluate import evaluate_set
from toolchain.tolerances import PUBLISHED_PSNR_TOLERANCE, PUBLISHED_SSIM_TOLERANCE

PUBLISHED = {(4, "Set5"): 32.57, (2, "Set5"): 38.24, (4, "Set14"): 28.87}
IMAGES = {"Set5": 5, "Set14": 14}


@pytest.mark.slow
@pytest.mark.parametrize("scale, set_name", sorted(PUBLISHED))
def test_dat_light_fp_matches_published(scale: int, set_name: str, shared_dir: Path) -> None:
    model = load_model(shared_dir / "models" / "DAT-light" / f"DAT_light_x{scale}.pth")
    result = evaluate_set(TorchUpscaler(model), shared_dir / "datasets", set_name, scale, progress=False)
    assert result.images == IMAGES[set_name]
    assert abs(result.psnr - PUBLISHED[(scale, set_name)]) <= PUBLISHED_PSNR_TOLERANCE, result
    if (scale, set_name) == (4, "Set5"):
        assert abs(result.ssim - 0.8991) <= PUBLISHED_SSIM_TOLERANCE, result
