"""GPTQ weight refinement (calib/gptq.py): the algorithm, the grid, the input-shift fold, the artifact."""
from __future__ import annotations

import pytest
import torch

from calib.artifact import load_artifact, load_quantized_model, save_artifact
from calib.baselines import calibrate_minmax
from calib.gptq import gptq_codes, refine_weights, relative_error
from calib.observers import batch_forward_loop
from calib.transforms import (add_input_shifts, add_shifts, add_smoothing, bake_transforms, find_shift_sites,
                              find_smoothing_groups, init_input_shifts, init_shifts, init_smoothquant)
from toolchain.quant import QuantConfig, QuantLinear, grid, quantize_model

from ..tiny_models import tiny_swinir

CONFIG = QuantConfig(w_bits=4, a_bits=4, weight_granularity="per-channel")


def _grid(lower: torch.Tensor, upper: torch.Tensor, bits: int = 4):
    return lambda column: grid.fake_quantize(column, lower, upper, bits)


def _correlated(columns: int, samples: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g)
    x = torch.randn(samples, columns, generator=g) @ mix  # strongly correlated inputs
    return (x.T @ x / samples).double()


def test_codes_are_grid_points_and_beat_rounding_to_nearest_on_correlated_inputs():
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    lower, upper = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    quantize = _grid(lower, upper)
    hessian = _correlated(24)
    for act_order in (True, False):
        codes = gptq_codes(weight, hessian, quantize, act_order=act_order)
        assert codes.dtype == weight.dtype and torch.equal(quantize(codes), codes)  # on the grid
        assert relative_error(weight, codes, hessian) < 0.5 * relative_error(weight, quantize(weight), hessian)


def test_uncorrelated_inputs_leave_nothing_to_compensate():
    """With a diagonal H no column's error moves another: GPTQ is rounding to nearest."""
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    quantize = _grid(weight.amin(), weight.amax(), bits=3)
    hessian = torch.diag(torch.rand(12, generator=torch.Generator().manual_seed(3)).double() + 0.1)
    assert torch.equal(gptq_codes(weight, hessian, quantize), quantize(weight))
    with pytest.raises(ValueError, match="damp"):
        gptq_codes(weight, hessian, quantize, damp=0.0)


def _smoothed_model(seed: int = 0):
    """A tiny quantized SwinIR x2 with every fold (norm, value and input smoothing, shifts, input shifts),
    MinMax bounds; folds parametrized."""
    model = quantize_model(tiny_swinir(scale=2, seed=seed, depths=[2], num_heads=[2]), CONFIG)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loop = batch_forward_loop(x, progress=False)
    sites = find_shift_sites(model, x[:1])
    groups = find_smoothing_groups(model, x[:1], kinds=("norm", "value", "input"))
    add_smoothing(model, groups)
    init_smoothquant(model, loop)
    add_input_shifts(model, [g.producer for g in groups if g.kind == "input"])
    init_input_shifts(model, loop)
    add_shifts(model, sites)
    calibrate_minmax(model, loop)
    init_shifts(model)
    return model, x, loop


def test_refine_writes_the_codes_through_the_folds():
    model, x, loop = _smoothed_model()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert any(hasattr(m, "parametrizations") and "weight" in m.parametrizations for m in linears.values())
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    results, refined = refine_weights(model, loop, progress=False)
    assert len(results) == len(linears) == 2 * 4  # qkv, proj, fc1, fc2 in two blocks
    assert sorted(refined) == sorted(f"{n}.weight" for n in linears)
    for name, m in linears.items():
        folded = m.weight.detach()
        step = m.weight_quantizer.step_and_zero_point()[0]
        assert ((folded - m.weight_quantizer(folded)).abs() <= 1e-5 * step).all(), name  # grid points
        stored = m.parametrizations.weight.original if hasattr(m, "parametrizations") and "weight" in \
            m.parametrizations else m.weight
        assert torch.equal(refined[f"{name}.weight"], stored.detach())
    assert any(not torch.equal(before[n], m.weight) for n, m in linears.items())
    assert sum(r.gptq_error for r in results) < sum(r.rtn_error for r in results)
    with torch.no_grad():
        folded_out = model(x)
        bake_transforms(model)  # every fold, input-shift biases included, follows the new codes exactly
        assert torch.equal(model(x), folded_out)


def test_refine_refuses_a_baked_model_with_input_offsets():
    model, _, loop = _smoothed_model()
    bake_transforms(model)
    with pytest.raises(ValueError, match="before bake_transforms"):
        refine_weights(model, loop, progress=False)


def test_artifact_round_trip_is_bit_identical(tmp_path, save_checkpoint):
    model, x, loop = _smoothed_model()
    checkpoint = save_checkpoint(tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2]),  # _smoothed_model's weights
                                 tmp_path / "tiny_x2.safetensors")
    _, refined = refine_weights(model, loop, progress=False)
    path = save_artifact(tmp_path / "g.safetensors", model, checkpoint=checkpoint, quant_config=CONFIG,
                         method="minmax", weights=refined)
    assert load_artifact(path).meta["refined_weights"] == len(refined) == 8
    loaded = load_quantized_model(checkpoint, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
