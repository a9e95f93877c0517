"""Per-channel input shifts: center a linear's input channels before its quantizer, fold the shift into the bias.

Explicit input smoothing (:mod:`calib.transforms.smoothing`, kind ``"input"``) scales the input
channels of a linear that no fold reaches; what it cannot fix is a channel whose values sit far from
zero (a residual-stream channel living in ``[3, 9]`` wastes most of a per-tensor grid on ``[-9, 3]``).
An input shift subtracts a learnable per-channel offset ``c`` ``(C_in,)`` after the multiplier and
adds it back through the bias, exactly:

    W_q (x*m - c) + (b + W_q c) = W_q (x*m) + b

with ``W_q`` the fake-quantized weight the layer multiplies with (the shift costs no weight
quantization error). The deployed graph has one per-channel ``Sub`` after the smoothing ``Mul``,
before the input's ``QuantizeLinear``, and the folded bias. This is the channel-wise shifting of
Outlier Suppression+ (Wei et al., 2023) applied where no LayerNorm can absorb it.

Offsets start at the per-channel midpoint of the (smoothed) float input over the calibration data
(:func:`init_input_shifts`), before the bounds are searched; DQC trains them with the bounds and the
smoothing factors. :func:`calib.transforms.fold.bake_transforms` writes them into a plain
``input_offset`` buffer and the bias for export.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear, float_mode

from .fold import FoldParametrization, _fold_modules, _module, quantized_weight

log = logging.getLogger(__name__)


class InputOffset(FoldParametrization):
    """``QuantLinear.input_offset`` ``(C_in,)`` -> ``offset``; owns the learnable ``offset``."""

    def __init__(self, offset: nn.Parameter, path: str) -> None:
        super().__init__()
        self.path = path
        self._share("offset", offset, owner=True)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.offset


class AddWeightedOffset(FoldParametrization):
    """The same linear's bias ``(C_out,)`` -> ``b + W_q @ offset``."""

    def __init__(self, offset: nn.Parameter, path: str, linear: QuantLinear) -> None:
        super().__init__()
        self.path = path
        self._share("offset", offset, owner=False)
        object.__setattr__(self, "linear", linear)  # a reference, not a submodule

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + quantized_weight(self.linear) @ self.offset


def add_input_shifts(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Parameter]:
    """Give each input-quantized linear in ``paths`` an input shift with offset 0 (identity).

    Raises ``ValueError`` for a path that is not a ``QuantLinear`` with an input quantizer and a bias,
    or that already has a shift.
    """
    modules = dict(model.named_modules())
    made: dict[str, nn.Parameter] = {}
    for path in paths:
        linear = _module(modules, path, QuantLinear)
        if linear.input_quantizer is None or linear.bias is None:
            raise ValueError(f"input shift: {path} needs an input quantizer and a bias to fold into")
        if linear.input_offset is not None or path in made:
            raise ValueError(f"input shift: {path} already has one")
        bias = linear.bias
        offset = nn.Parameter(torch.zeros(linear.in_features, dtype=bias.dtype, device=bias.device))
        linear.input_offset = torch.zeros(linear.in_features, dtype=bias.dtype, device=bias.device)
        parametrize.register_parametrization(linear, "input_offset", InputOffset(offset, path))
        parametrize.register_parametrization(linear, "bias", AddWeightedOffset(offset, path, linear))
        made[path] = offset
    return made


def input_shift_owners(model: nn.Module) -> list[InputOffset]:
    """The parametrizations that own each offset, in module order."""
    return [p for m in model.modules() for p in _fold_modules(m, "input_offset", InputOffset)]


def input_shift_paths(model: nn.Module) -> list[str]:
    """The paths of the linears that carry an input shift, in module order."""
    return [p.path for p in input_shift_owners(model)]


def input_shift_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``offset`` Parameters ``(C_in,)`` (what DQC trains with the bounds)."""
    return [p.offset for p in input_shift_owners(model)]


@torch.no_grad()
def init_input_shifts(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> dict[str, torch.Tensor]:
    """Set every offset to the per-channel midpoint ``(min + max) / 2`` of the linear's smoothed (and rotated,
    :mod:`calib.transforms.rotation`) float input over ``forward_loop(model)``; returns the offsets by path."""
    owners = input_shift_owners(model)
    if not owners:
        raise ValueError(f"{type(model).__name__} has no input shifts: add_input_shifts() first")
    modules = dict(model.named_modules())
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}

    def hook(path: str) -> Callable:
        linear = modules[path]

        def record(module, args):
            x = linear.transformed_input(args[0].detach())  # after the multiplier and the rotation
            rows = x.reshape(-1, x.shape[-1])
            low[path] = torch.minimum(low[path], rows.amin(0)) if path in low else rows.amin(0)
            high[path] = torch.maximum(high[path], rows.amax(0)) if path in high else rows.amax(0)
        return record

    handles = [modules[p.path].register_forward_pre_hook(hook(p.path)) for p in owners]
    try:
        with float_mode(model):
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    offsets = {}
    for owner in owners:
        if owner.path not in low:
            raise ValueError(f"input shift {owner.path}: the calibration forward never reached this linear")
        owner.offset.copy_((low[owner.path] + high[owner.path]) / 2)
        offsets[owner.path] = owner.offset.detach().clone()
    log.info("input shifts: %d offsets set to the channel midpoints", len(owners))
    return offsets
