"""The transform registry (calib/transforms/registry.py): one table drives parameters, spec, state and restore
for every kind."""
from __future__ import annotations

import pytest
import torch

from calib.observers import batch_forward_loop
from calib.transforms.input_shift import add_input_shifts, input_shift_parameters
from calib.transforms.registry import (
    TRANSFORMS,
    load_transforms_state,
    restore_transforms,
    transform_parameters,
    transforms_spec,
    transforms_state,
)
from calib.transforms.shift import add_shifts, find_shift_sites, shift_parameters
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant, smoothing_parameters
from toolchain.quant import QuantConfig, float_mode, quantize_model

from ...tiny_models import tiny_swinir


def _tiny() -> torch.nn.Module:
    return quantize_model(tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2]), QuantConfig())


def _every_kind() -> torch.nn.Module:
    """The tiny model with smoothing of all three kinds, every shift, input shifts; parameters set at random."""
    model = _tiny()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sites = find_shift_sites(model, x[:1])
    groups = find_smoothing_groups(model, x[:1], kinds=("norm", "value", "input"))
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    add_input_shifts(model, [g.producer for g in groups if g.kind == "input"])
    add_shifts(model, sites)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in input_shift_parameters(model) + shift_parameters(model):
            p.copy_(torch.rand(p.shape, generator=generator) - 0.5)
    return model


def test_kinds_have_distinct_keys():
    assert len({k.spec_key for k in TRANSFORMS}) == len({k.state_prefix for k in TRANSFORMS}) == len(TRANSFORMS)
    assert [k.spec_key for k in TRANSFORMS] == ["smoothing", "folded_rotations", "shifts", "input_shifts",
                                                "rotations"]  # the order folds are added


def test_every_kind_round_trips_through_spec_and_state():
    model = _every_kind()
    spec, state = transforms_spec(model), transforms_state(model)
    assert list(spec) == ["smoothing", "shifts", "input_shifts"] and all(spec.values())
    # smoothing first, then shifts, then input shifts: the order DQC's optimizer sees them in
    assert transform_parameters(model) == smoothing_parameters(model) + shift_parameters(model) + \
        input_shift_parameters(model)
    assert len(state) == len(transform_parameters(model)) == sum(len(v) for v in spec.values())
    assert [k.split(".")[0] for k in state] == sorted((k.split(".")[0] for k in state),
                                                      key=["smoothing", "shift", "input_shift"].index)
    fresh = _tiny()
    restore_transforms(fresh, spec, state)
    assert transforms_spec(fresh) == spec
    restored = transforms_state(fresh)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], v) for k, v in state.items())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), float_mode(model), float_mode(fresh):
        assert torch.equal(fresh(x), model(x))


def test_a_model_without_input_shifts_writes_no_input_shift_entry():
    model = _tiny()
    add_smoothing(model, find_smoothing_groups(model, torch.rand(1, 3, 16, 16), kinds=("norm",)))
    assert list(transforms_spec(model)) == ["smoothing", "shifts"]  # artifacts from before input shifts stay valid
    assert transforms_spec(_tiny()) == {"smoothing": [], "shifts": []} and transforms_state(_tiny()) == {}


def test_state_that_does_not_fit_is_refused():
    model = _every_kind()
    spec, state = transforms_spec(model), transforms_state(model)
    first = next(iter(state))
    with pytest.raises(ValueError, match="do not fit the spec"):
        restore_transforms(_tiny(), spec, {**state, "shift.nowhere.offset": torch.zeros(())})
    with pytest.raises(ValueError, match=f"fold parameter {first}"):
        restore_transforms(_tiny(), spec, {**state, first: torch.zeros(3)})
    with pytest.raises(ValueError, match="non-finite"):
        load_transforms_state(model, {**state, first: torch.full_like(state[first], float("nan"))})
    with pytest.raises(ValueError, match="do not fit the model"):
        load_transforms_state(model, {k: v for k, v in state.items() if k != first})
    changed = {k: v + 0.125 for k, v in state.items()}
    load_transforms_state(model, changed)
    assert all(torch.equal(transforms_state(model)[k], v) for k, v in changed.items())
