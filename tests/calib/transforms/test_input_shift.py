"""Per-channel input shifts (calib/transforms/input_shift.py): exact in float, midpoint start, bake, refusals."""
from __future__ import annotations

import pytest
import torch

from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms.fold import bake_transforms
from calib.transforms.input_shift import add_input_shifts, init_input_shifts, input_shift_parameters, input_shift_paths
from calib.transforms.registry import restore_transforms, transform_parameters, transforms_spec, transforms_state
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant
from toolchain.quant import QuantConfig, float_mode, quantize_model

from ...tiny_models import tiny_swinir


def tiny(seed: int = 0) -> torch.nn.Module:
    return quantize_model(tiny_swinir(scale=2, seed=seed, depths=[2], num_heads=[2]), QuantConfig())


@pytest.fixture()
def smoothed():
    """A tiny quantized SwinIR with explicit input smoothing (its fc2 linears) and seeded data."""
    model = tiny()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    groups = find_smoothing_groups(model, x[:1], kinds=("input",))
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    return model, x, [g.producer for g in groups]


def test_random_offsets_leave_the_float_model_unchanged(smoothed):
    model, x, paths = smoothed
    assert paths and all(p.endswith("fc2") for p in paths)
    with torch.no_grad(), float_mode(model):
        before = model(x)
        offsets = add_input_shifts(model, paths)
        for offset in offsets.values():
            offset.copy_(torch.randn(offset.shape, generator=torch.Generator().manual_seed(2)) * 3)
        after = model(x)
    assert input_shift_paths(model) == paths and len(input_shift_parameters(model)) == len(paths)
    assert {id(p) for p in input_shift_parameters(model)} <= {id(p) for p in transform_parameters(model)}  # DQC trains them
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_offsets_start_at_the_channel_midpoints(smoothed):
    model, x, paths = smoothed
    add_input_shifts(model, paths)
    init_input_shifts(model, batch_forward_loop(x, progress=False))
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[p].input_quantizer.register_forward_pre_hook(
        lambda m, args, p=p: seen.__setitem__(p, args[0].detach().reshape(-1, args[0].shape[-1]))) for p in paths]
    with torch.no_grad(), float_mode(model):
        model(x)  # one batch = the data the offsets came from
    for hook in hooks:
        hook.remove()
    for path in paths:
        low, high = seen[path].amin(0), seen[path].amax(0)
        torch.testing.assert_close(low, -high, rtol=0, atol=1e-5)  # centered channel by channel


def test_bake_is_bit_identical_and_the_state_round_trips(smoothed):
    model, x, paths = smoothed
    add_input_shifts(model, paths)
    init_input_shifts(model, batch_forward_loop(x, progress=False))
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)
    spec, state = transforms_spec(model), transforms_state(model)
    assert spec["input_shifts"] == paths and all(f"input_shift.{p}.offset" in state for p in paths)
    with torch.no_grad():
        parametrized = model(x)
        rebuilt = tiny()
        rebuilt.load_state_dict({k: v for k, v in model.state_dict().items() if "parametrizations" not in k},
                                strict=False)
        restore_transforms(rebuilt, spec, state)
        for name, module in model.named_modules():  # bounds as calibrated
            if hasattr(module, "lower") and hasattr(module, "upper"):
                target = dict(rebuilt.named_modules())[name]
                target.set_bounds(module.lower, module.upper)
        baked = bake_transforms(model)(x)
        assert torch.equal(baked, parametrized)
        assert torch.equal(bake_transforms(rebuilt)(x), parametrized)
    linear = dict(model.named_modules())[paths[0]]
    assert isinstance(linear.input_offset, torch.Tensor) and not isinstance(linear.input_offset, torch.nn.Parameter)
    assert "input_offset" in dict(linear.named_buffers())


def test_refuses_a_linear_without_input_quantizer_or_twice(smoothed):
    model, _, paths = smoothed
    with pytest.raises(ValueError, match="no QuantLinear"):
        add_input_shifts(model, ["layers.0.residual_group.blocks.0.norm1"])
    add_input_shifts(model, paths[:1])
    with pytest.raises(ValueError, match="already has one"):
        add_input_shifts(model, paths[:1])
    with pytest.raises(ValueError, match="add_input_shifts"):
        init_input_shifts(tiny(), lambda m: None)
