"""Learned weight rounding (calib/learned_rounding.py; grid arithmetic in toolchain/quant/grid.py)."""
from __future__ import annotations

import pytest
import torch

from calib.learned_rounding import (LearnedRounding, attach_rounding, bake_rounding, beta_at, detach_rounding, restore_weights,
                                    weight_layers, weight_snapshot)
from toolchain.quant import QuantLinear, Quantizer, grid

from .test_gptq import _smoothed_model


def _bounds(seed: int = 0):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed))
    return w, w.amin(1, keepdim=True) * 0.8, w.amax(1, keepdim=True) * 0.8  # some weights clipped


def test_soft_rounding_starts_at_the_weight_itself_inside_the_grid():
    w, lower, upper = _bounds()
    v = grid.rounding_logits(w, lower, upper, 4)
    soft = grid.fake_quantize_rounded(w, lower, upper, 4, False, v, hard=False)
    step, zero_point = grid.step_and_zero_point(lower, upper, 4)
    low, high = grid.clip_values(step, zero_point, 4)
    inside = (w > low + step) & (w < high - step)
    assert inside.sum() > 100
    # floor(w/s) + frac(w/s) = w/s, up to the clamp of the fraction to (1e-4, 1 - 1e-4) of the stretched range
    assert torch.allclose(soft[inside], w[inside], atol=2e-4 * float(step.max()))


def test_hard_rounding_lies_on_the_grid_and_deploys_with_its_codes():
    w, lower, upper = _bounds(1)
    for bits in (2, 3, 4):
        v = torch.randn(w.shape, generator=torch.Generator().manual_seed(bits))
        hard = grid.fake_quantize_rounded(w, lower, upper, bits, False, v, hard=True)
        step, zero_point = grid.step_and_zero_point(lower, upper, bits)
        assert torch.equal(grid.fake_quantize(hard, lower, upper, bits), hard)  # round to nearest gives it back
        codes = grid.integer_codes(hard, lower, upper, bits).float()
        assert torch.equal(codes * step, hard)
        expected = torch.floor(w / step) + (v >= 0).float()  # floor or ceil, as the logit says, clamped
        assert torch.equal(codes, torch.clamp(expected, -zero_point, grid.levels(bits) - zero_point))


def test_a_fixed_base_keeps_the_codes_while_the_bounds_move_and_still_deploys_exactly():
    """``fixed_base``: the integer part is taken on the starting grid, so moving the bounds rescales the values
    (gradient to the bounds) instead of making codes jump; the hard result lies on the new grid."""
    w, lower, upper = _bounds(3)
    quantizer = Quantizer("w", "weight", 4, "weight", bounds_shape=(6, 1))
    quantizer.set_bounds(lower, upper)
    fixed, free = LearnedRounding(quantizer, w, fixed_base=True), LearnedRounding(quantizer, w)
    fixed.hard = free.hard = True
    assert torch.equal(fixed(quantizer, w), free(quantizer, w))  # on the starting grid: the same
    start_codes = grid.integer_codes(fixed(quantizer, w), quantizer.lower, quantizer.upper, 4)
    with torch.no_grad():
        quantizer.lower.mul_(1.03)
        quantizer.upper.mul_(1.03)  # 3% wider: zero points unchanged, every step 3% longer
    moved = fixed(quantizer, w)
    assert torch.equal(grid.integer_codes(moved, quantizer.lower, quantizer.upper, 4), start_codes)
    assert torch.equal(grid.fake_quantize(moved, quantizer.lower, quantizer.upper, 4), moved)
    assert not torch.equal(grid.integer_codes(free(quantizer, w), quantizer.lower, quantizer.upper, 4), start_codes)
    fixed.hard = False
    quantizer.lower.requires_grad_(True)
    quantizer.upper.requires_grad_(True)
    fixed(quantizer, w).sum().backward()
    assert quantizer.upper.grad.abs().sum() > 0 and fixed.v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        fixed(quantizer, w[:, :10])


def test_hard_logits_of_round_to_nearest_give_round_to_nearest():
    w, lower, upper = _bounds(2)
    step, _ = grid.step_and_zero_point(lower, upper, 3)
    scaled = w / step
    v = torch.where(scaled - torch.floor(scaled) >= 0.5, 1.0, -1.0)  # up iff the fraction is at least one half
    hard = grid.fake_quantize_rounded(w, lower, upper, 3, False, v, hard=True)
    assert torch.equal(hard, grid.fake_quantize(w, lower, upper, 3))


def test_regularizer_and_beta_schedule():
    assert beta_at(0, 10) == 0.0 and beta_at(1, 10) == 0.0  # warm-up: 20% of the steps
    assert beta_at(2, 10) == 20.0 and beta_at(10, 10) == 2.0
    assert 2.0 < beta_at(6, 10) < 20.0
    w, lower, upper = _bounds()
    quantizer = Quantizer("w", "weight", 4, "weight", bounds_shape=(6, 1))
    quantizer.set_bounds(lower, upper)
    rounding = LearnedRounding(quantizer, w)
    assert 0.0 < rounding.regularizer(2.0).item() <= 1.0  # undecided fractions cost
    with torch.no_grad():
        rounding.v.copy_(torch.where(rounding.v >= 0, 50.0, -50.0))
    assert rounding.regularizer(2.0).item() == 0.0  # every rounding decided: no cost


def test_bake_writes_grid_values_through_the_folds_and_restore_undoes_it():
    model, x, _ = _smoothed_model()
    layers = weight_layers(model)
    assert len(layers) == 8 and all(isinstance(m, QuantLinear) for m in layers.values())
    assert any("weight" in getattr(m, "parametrizations", {}) for m in layers.values())
    before = weight_snapshot(layers)
    with torch.no_grad():
        reference = model(x)
    roundings = attach_rounding(layers)
    with pytest.raises(ValueError, match="already has a learned rounding"):
        attach_rounding(layers)
    with torch.no_grad():
        for rounding in roundings.values():  # round everything up: far from round to nearest
            rounding.v.fill_(5.0)
    refined = bake_rounding(layers)
    assert sorted(refined) == sorted(f"{name}.weight" for name in layers)
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        assert quantizer.rounding is None
        folded = layer.weight.detach()
        step = quantizer.step_and_zero_point()[0]
        assert ((folded - quantizer(folded)).abs() <= 1e-5 * step).all(), name  # on the grid
    with torch.no_grad():
        assert not torch.equal(model(x), reference)
    restore_weights(layers, before)
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    detach_rounding(layers)  # idempotent with nothing attached
