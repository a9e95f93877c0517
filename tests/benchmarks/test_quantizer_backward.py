"""The quantizer-backward benchmark on a tiny SwinIR: the reference (masks written out) and today's backward give
the same gradients for a block's trainable tensors, a backward that splits the ties differently is caught, and the
benchmark leaves the model and the quantizer's backward as it found them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from calib.baselines import calibrate_minmax
from calib.feature_taps import feature_modules
from calib.observers import batch_forward_loop
from toolchain.quant import QuantConfig, quantize_model, quantizers
from toolchain.quant.grid import _ClipRoundScale, fake_quantize

from ..tiny_models import tiny_swinir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quantizer_backward as bench  # noqa: E402


def _grads(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> list[torch.Tensor]:
    x, lower, upper = (t.clone().requires_grad_(True) for t in (x, lower, upper))
    out = fake_quantize(x, lower, upper, 3)
    out.backward(torch.linspace(-1, 2, x.numel()).reshape(x.shape))
    return [x.grad, lower.grad, upper.grad]


def _on_the_grid_ends() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel bounds and values below, on, between and above both clip ends (ties included)."""
    lower, upper = torch.tensor([[-1.0], [-0.5]]), torch.tensor([[2.5], [1.25]])
    x = torch.tensor([[-3.0, -1.0, 0.3, 2.5, 4.0], [-0.5, -0.7, 1.0, 1.25, 1.3]])
    return x, lower, upper


def test_reference_and_todays_backward_agree_bit_for_bit_with_ties():
    x, lower, upper = _on_the_grid_ends()
    now = _grads(x, lower, upper)
    with bench.use_backward(bench.masked_backward):
        before = _grads(x, lower, upper)
    assert all(torch.equal(a, b) for a, b in zip(now, before))
    assert now[0][0, 1] != 0 and now[1][0, 0] != 0       # the ties and the clipped values did carry gradient


def test_a_backward_with_other_tie_weights_is_caught():
    def full_ties(ctx, grad):
        grad_x, grad_step, grad_low, grad_high = bench.masked_backward(ctx, grad)
        x, _, low, high = ctx.saved_tensors
        tie = (x == low) | (x == high)
        return grad_x + 0.5 * grad * tie, grad_step, grad_low, grad_high

    x, lower, upper = _on_the_grid_ends()
    with bench.use_backward(full_ties):
        wrong = _grads(x, lower, upper)
    assert not torch.equal(wrong[0], _grads(x, lower, upper)[0])


def test_time_unit_reports_identical_gradients_and_restores_the_model():
    model = tiny_swinir(scale=2, seed=0, depths=[2, 2], num_heads=[2, 2], window_size=4)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate_minmax(model, batch_forward_loop(lr, progress=False))
    path, unit = [(p, m) for p, m in feature_modules(model, "") if quantizers(m)][0]
    backward = _ClipRoundScale.__dict__["backward"]
    row = bench.time_unit(model, path, unit, lr, rounds=1, steps=1)
    assert row["identical"] is True and row["trainable_tensors"] > 0
    assert all(t > 0 for t in row["s_per_step"].values())
    assert _ClipRoundScale.__dict__["backward"] is backward
    assert all(q.rounding is None for q in quantizers(model).values() if hasattr(q, "rounding"))
