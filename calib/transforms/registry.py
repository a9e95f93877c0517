"""Every transform kind in one table: its learnable parameters, its JSON spec, its state, its restore.

An artifact carries the folds of a calibrated model as a JSON spec (:func:`transforms_spec`: what
is folded where) and a state (:func:`transforms_state`: the learned parameters); DQC trains
:func:`transform_parameters` with the bounds and checkpoints :func:`transforms_state`. All of these
walk :data:`TRANSFORMS`, in its order, which is also the order the folds are added back by
:func:`restore_transforms` (smoothing before shifts: a shift subtracts its offset from the smoothed
tensor; rotations, whose fixed matrices are stored but never trained, after smoothing). A new
transform is one :class:`TransformKind` entry here.

>>> from toolchain.models.examples import tiny_swinir
>>> from toolchain.quant import QuantConfig, quantize_model
>>> from calib.transforms import add_smoothing, find_smoothing_groups
>>> model = quantize_model(tiny_swinir(), QuantConfig())
>>> _ = add_smoothing(model, find_smoothing_groups(model, torch.rand(1, 3, 16, 16), kinds=("norm",)))
>>> spec, state = transforms_spec(model), transforms_state(model)
>>> [(key, len(entries)) for key, entries in spec.items()], sorted(state)[0]
([('smoothing', 2), ('shifts', 0)], 'smoothing.layers.0.residual_group.blocks.0.norm1.log_scale')
>>> fresh = quantize_model(tiny_swinir(), QuantConfig())
>>> restore_transforms(fresh, spec, state)
>>> transforms_spec(fresh) == spec, len(transform_parameters(fresh))
(True, 2)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fold import FoldParametrization
from .input_shift import add_input_shifts, input_shift_owners
from .rotation import RotationSite, add_rotations, rotation_owners
from .rotation_fold import FoldedRotation, add_folded_rotations, folded_rotation_owners
from .shift import ShiftSite, add_shifts, shift_owners
from .smoothing import SmoothingGroup, add_smoothing, smoothing_owners


@dataclass(frozen=True)
class TransformKind:
    """How one kind of transform is described, saved and re-created.

    ``spec_key``: its list in :func:`transforms_spec`; ``state_prefix`` and ``parameter``: its state keys
    are ``<state_prefix>.<name>.<parameter>``; ``owners(model)``: the folds that own a parameter (one
    per entry, in module order); ``entry(owner)``: what the owner folds (a group, a site, a path);
    ``name(entry)``: the entry's unique name; ``to_json`` / ``from_json``: the entry in the spec;
    ``add(model, entries)``: folds them with identity (or, for rotations, their built) parameters,
    returned by name; ``optional``: the spec lists the kind only when the model has some (kinds added
    after artifacts were first written); ``learnable``: DQC trains the parameter (a rotation's ``R`` is a
    fixed buffer: stored and restored, never trained).
    """

    spec_key: str
    state_prefix: str
    parameter: str
    owners: Callable[[nn.Module], list[FoldParametrization]]
    entry: Callable[[FoldParametrization], Any]
    name: Callable[[Any], str]
    to_json: Callable[[Any], Any]
    from_json: Callable[[Any], Any]
    add: Callable[[nn.Module, list[Any]], dict[str, nn.Parameter]]
    optional: bool = False
    learnable: bool = True

    def state_key(self, name: str) -> str:
        return f"{self.state_prefix}.{name}.{self.parameter}"


#: every transform kind, in the order the folds are added (and their parameters listed)
TRANSFORMS: tuple[TransformKind, ...] = (
    TransformKind("smoothing", "smoothing", "log_scale", smoothing_owners, lambda owner: owner.group,
                  lambda group: group.key, SmoothingGroup.to_dict, SmoothingGroup.from_dict, add_smoothing),
    # before shifts and input shifts: a bias fold that reads the weight must come after the rows' rotation
    TransformKind("folded_rotations", "folded_rotation", "block", folded_rotation_owners, lambda owner: owner.group,
                  lambda group: group.name, FoldedRotation.to_dict, FoldedRotation.from_dict, add_folded_rotations,
                  optional=True, learnable=False),
    TransformKind("shifts", "shift", "offset", shift_owners, lambda owner: owner.site, lambda site: site.name,
                  ShiftSite.to_dict, ShiftSite.from_dict, add_shifts),
    TransformKind("input_shifts", "input_shift", "offset", input_shift_owners, lambda owner: owner.path, str, str, str,
                  add_input_shifts, optional=True),
    # after smoothing and folded rotations: a rotated linear's weight is (W * s) M R
    TransformKind("rotations", "rotation", "matrix", rotation_owners, lambda owner: owner.site,
                  lambda site: site.linear, RotationSite.to_dict, RotationSite.from_dict, add_rotations,
                  optional=True, learnable=False),
)


def transform_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable fold parameter: smoothing ``log_scale`` s, shift ``offset`` s, input-shift offsets
    (not the rotations' fixed matrices)."""
    return [getattr(owner, kind.parameter) for kind in TRANSFORMS if kind.learnable for owner in kind.owners(model)]


def transforms_spec(model: nn.Module) -> dict[str, Any]:
    """JSON description of the folds of ``model`` (smoothing groups, shift sites, input shifts), for a sidecar."""
    spec = {}
    for kind in TRANSFORMS:
        entries = [kind.to_json(kind.entry(owner)) for owner in kind.owners(model)]
        if entries or not kind.optional:
            spec[kind.spec_key] = entries
    return spec


def transforms_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fold parameters: ``smoothing.<producer>.log_scale`` ``(C,)``, ``shift.<site>.offset`` ``()``,
    ``input_shift.<linear>.offset`` ``(C_in,)``, ``rotation.<linear>.matrix`` ``(C_in, C_in)``,
    ``folded_rotation.<group>.block`` ``(d, d)``."""
    return {key: parameter.detach().clone() for key, parameter in _fold_parameters(model).items()}


@torch.no_grad()
def load_transforms_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`transforms_state` values back into the folds ``model`` already has (strict)."""
    current = _fold_parameters(model)
    if set(state) != set(current):
        raise ValueError(f"fold parameters do not fit the model: missing {sorted(set(current) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(current))[:5]}")
    for key, parameter in current.items():
        parameter.copy_(_checked(state, key, parameter).to(parameter))


@torch.no_grad()
def restore_transforms(model: nn.Module, spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Re-create the folds of :func:`transforms_spec` on a fresh quantized model and load their parameters.

    Strict: every parameter of the spec must be in ``state`` with its shape, and nothing else.
    Load the quantizer bounds (:func:`toolchain.quant.load_bounds`) as saved: they already are the
    bounds of the shifted tensors.
    """
    entries = {kind.spec_key: [kind.from_json(item) for item in spec.get(kind.spec_key, [])] for kind in TRANSFORMS}
    expected = {kind.state_key(kind.name(entry)) for kind in TRANSFORMS for entry in entries[kind.spec_key]}
    if set(state) != expected:
        raise ValueError(f"fold parameters do not fit the spec: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    for kind in TRANSFORMS:
        for name, parameter in kind.add(model, entries[kind.spec_key]).items():
            parameter.copy_(_checked(state, kind.state_key(name), parameter))


def _fold_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every fold parameter (and rotation matrix) of ``model`` under its state key (see :func:`transforms_state`)."""
    return {kind.state_key(kind.name(kind.entry(owner))): getattr(owner, kind.parameter)
            for kind in TRANSFORMS for owner in kind.owners(model)}


def _checked(state: Mapping[str, torch.Tensor], key: str, parameter: nn.Parameter) -> torch.Tensor:
    value = state[key]
    if tuple(value.shape) != tuple(parameter.shape) or not torch.isfinite(value).all():
        raise ValueError(f"fold parameter {key}: shape {tuple(value.shape)} (expected {tuple(parameter.shape)}) "
                         "or non-finite values")
    return value
