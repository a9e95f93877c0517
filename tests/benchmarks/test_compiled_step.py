"""The compiled-step benchmark on a tiny SwinIR with a tile large enough for the compiled kernels: both paths run,
their gradients agree, the compiled one was really taken, and the model and the switch come back as they were."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from calib.baselines import calibrate_minmax
from calib.feature_taps import feature_modules
from calib.observers import batch_forward_loop
from toolchain.quant import QuantConfig, grid, quantize_model, quantizers
from toolchain.quant.compiled import ENV

from ..tiny_models import tiny_swinir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compiled_step as bench  # noqa: E402


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler (none on PATH)")
def test_both_paths_run_agree_and_leave_the_model_as_it_was():
    model = tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2], window_size=8)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calibrate_minmax(model, batch_forward_loop(lr, progress=False))
    blocks = [(p, m) for p, m in feature_modules(model, "") if quantizers(m)][:1]
    switch = os.environ.get(ENV)
    rows = bench.run(model, blocks, lr, rounds=1, steps=1, full=True)
    assert os.environ.get(ENV) == switch                           # the suite's setting is back
    assert grid._STE_GRADIENTS._compiled is not None and grid._STE_GRADIENTS.failure is None
    assert [r["step"] for r in rows] == [f"reconstruction, {blocks[0][0]}", "full model (DQC)"]
    for row in rows:
        assert row["trainable_tensors"] > 0 and all(t > 0 for t in row["s_per_step"].values())
        assert row["max_relative_gradient_difference"] < 1e-3, row
    assert all(q.rounding is None for q in quantizers(model).values() if hasattr(q, "rounding"))
    assert not any(p.requires_grad for p in model.parameters())
