"""The float DAT-light through spandrel and our evaluator reproduces the published Set5 PSNR/SSIM.

Published (DAT paper, supplementary table; ../shared/README.md): x2 Set5 38.24 dB, x4 32.57 dB / 0.8991.
The other sets (Set14, B100) are recorded by benchmarks/ptq_grid.py (benchmarks/dat_light_ptq.md).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from toolchain import load_model
from toolchain.backends import TorchUpscaler
from toolchain.evaluate import evaluate_set

#: published figures are given to two decimals
PUBLISHED_TOLERANCE_DB = 0.02
PUBLISHED = {4: 32.57, 2: 38.24}


@pytest.mark.slow
@pytest.mark.parametrize("scale", [4, 2])
def test_dat_light_fp_matches_published(scale: int, shared_dir: Path) -> None:
    model = load_model(shared_dir / "models" / "DAT-light" / f"DAT_light_x{scale}.pth")
    result = evaluate_set(TorchUpscaler(model), shared_dir / "datasets", "Set5", scale, progress=False)
    assert result.images == 5
    assert abs(result.psnr - PUBLISHED[scale]) <= PUBLISHED_TOLERANCE_DB, result
    if scale == 4:
        assert abs(result.ssim - 0.8991) <= 0.0005, result
