"""Learned weight rounding (AdaRound, Nagel et al., ICML 2020) for block reconstruction and DQC.

Round to nearest puts each weight on its nearest grid point. AdaRound learns, per weight, whether it
goes down or up: the code is ``floor(w / s) + r`` with ``r = h(v)`` a stretched sigmoid of a logit ``v``
(:func:`toolchain.quant.grid.rounding_fraction`), trained to keep a block's output, while a regularizer
``1 - |2h - 1|^beta`` (``beta`` annealed from high to low) pushes every ``h`` to 0 or 1. At the end the
rounding is made hard (``v >= 0``) and the weight is replaced by its grid value, so the deployed graph,
the grids and the export are unchanged: only which grid point each weight takes differs, as with GPTQ
(:mod:`calib.gptq`, which this replaces when chosen). The grid of the weight (its bounds) stays fixed
while its rounding is learned, unless block reconstruction trains it too (``ReconstructConfig.rounding_grids``):
then the integer part ``floor(w / s0)`` is taken once on the starting grid (``fixed_base``) and the weight is
``(floor(w / s0) + r) * s`` on the moving step ``s``.

Weights under folds (:mod:`calib.transforms`) are written back through the folds' inverses, like GPTQ's.
Block reconstruction (:mod:`calib.reconstruct`) learns the roundings one block at a time; DQC
(:mod:`calib.dqc`, ``DQCConfig.rounding``) learns them end to end with the activation bounds, keeping the
weight grids and the fold parameters the weights depend on fixed (:func:`weight_dependent`), and checkpoints
the logits with the bounds (:func:`rounding_state`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
from torch import nn

from toolchain.quant import QuantConv2d, QuantLinear, Quantizer, grid, quantizers

from .float_affine import stored_parameter

#: AdaRound's defaults: regularizer exponent annealed from 20 to 2, after 20% of the steps without it
DEFAULT_BETA = (20.0, 2.0)
DEFAULT_WARMUP = 0.2

WeightLayer = Union[QuantLinear, QuantConv2d]


class LearnedRounding:
    """The rounding logits ``v`` of one weight quantizer (not a module: never part of the model's state)."""

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor, fixed_base: bool = False) -> None:
        lower, upper = quantizer.lower.detach(), quantizer.upper.detach()
        self.v = nn.Parameter(grid.rounding_logits(weight.detach(), lower, upper, quantizer.bits, quantizer.symmetric))
        self.hard = False
        self.base = None
        if fixed_base:  # floor(w / s0): the codes stay continuous in the bounds while they train
            step, _ = grid.step_and_zero_point(lower, upper, quantizer.bits, quantizer.symmetric)
            self.base = torch.floor(weight.detach() / step)

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        if self.base is not None and self.base.shape != x.shape:
            raise ValueError(f"learned rounding made for a weight of shape {tuple(self.base.shape)} got one of "
                             f"shape {tuple(x.shape)}")
        return grid.fake_quantize_rounded(x, quantizer.lower, quantizer.upper, quantizer.bits, quantizer.symmetric,
                                          self.v, self.hard, self.base)

    def regularizer(self, beta: float) -> torch.Tensor:
        """Mean of ``1 - |2h - 1|^beta`` over the weights: 0 when every rounding is decided."""
        h = grid.rounding_fraction(self.v)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()


def beta_at(step: int, steps: int, beta: tuple[float, float] = DEFAULT_BETA, warmup: float = DEFAULT_WARMUP) -> float:
    """The regularizer's exponent after ``step`` of ``steps`` (0 during the warm-up: no regularizer).

    >>> beta_at(0, 100), beta_at(20, 100), beta_at(100, 100)
    (0.0, 20.0, 2.0)
    """
    start = int(warmup * steps)
    if step < start:
        return 0.0
    progress = (step - start) / max(steps - start, 1)
    return beta[0] + (beta[1] - beta[0]) * progress


def weight_layers(module: nn.Module, prefix: str = "") -> dict[str, WeightLayer]:
    """The layers under ``module`` whose weight quantizer is on and calibrated, by model path."""
    found = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            quantizer = layer.weight_quantizer
            if quantizer is not None and quantizer.enabled and quantizer.initialized:
                found[f"{prefix}.{name}" if prefix and name else prefix or name] = layer
    return found


def attach_rounding(layers: dict[str, WeightLayer], fixed_base: bool = False) -> dict[str, LearnedRounding]:
    """Give every layer's weight quantizer a :class:`LearnedRounding` (starting at the identity; ``fixed_base``:
    for bounds that train with it)."""
    roundings = {}
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        if quantizer.rounding is not None:
            raise ValueError(f"{name}: its weight quantizer already has a learned rounding attached")
        with torch.no_grad():
            rounding = LearnedRounding(quantizer, layer.weight, fixed_base)
        quantizer.rounding = roundings[name] = rounding
    return roundings


def detach_rounding(layers: dict[str, WeightLayer]) -> None:
    """Remove the learned roundings (round to nearest again), weights untouched."""
    for layer in layers.values():
        layer.weight_quantizer.rounding = None


@torch.no_grad()
def bake_rounding(layers: dict[str, WeightLayer]) -> dict[str, torch.Tensor]:
    """Make each rounding hard, write the grid values into the weights (through their folds) and remove the
    roundings; returns the new float weights by parameter name (what the artifact stores, as GPTQ's)."""
    from .gptq import write_weight

    refined = {}
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        rounding = quantizer.rounding
        if rounding is None:
            raise ValueError(f"{name}: no learned rounding to bake")
        rounding.hard = True
        values = quantizer(layer.weight).detach().clone()
        quantizer.rounding = None
        refined[f"{name}.weight"] = write_weight(layer, values).clone()
    return refined


def _stored(layer: WeightLayer) -> torch.Tensor:
    """The tensor the layer's weight is computed from: under its folds, or the weight itself."""
    return stored_parameter(layer, "weight")


def weight_snapshot(layers: dict[str, WeightLayer]) -> dict[str, torch.Tensor]:
    """Copies of the layers' stored weights (see :func:`restore_weights`)."""
    return {name: _stored(layer).detach().clone() for name, layer in layers.items()}


@torch.no_grad()
def restore_weights(layers: dict[str, WeightLayer], snapshot: dict[str, torch.Tensor]) -> None:
    """Put the weights of :func:`weight_snapshot` back (after a rounding that did not pay)."""
    for name, layer in layers.items():
        _stored(layer).copy_(snapshot[name])


#: key prefix of the rounding logits in DQC's state dicts (checkpoints, best state), by quantizer name
ROUNDING_PREFIX = "rounding/"


def rounding_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the logits of every attached :class:`LearnedRounding`, under :data:`ROUNDING_PREFIX` + quantizer name."""
    return {key: v.detach().clone() for key, v in _logits(model).items()}


def _logits(model: nn.Module) -> dict[str, nn.Parameter]:
    return {ROUNDING_PREFIX + name: q.rounding.v for name, q in quantizers(model).items()
            if isinstance(q.rounding, LearnedRounding)}


@torch.no_grad()
def load_rounding_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`rounding_state` logits back (strict: the same quantizers carry a rounding)."""
    own = _logits(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"rounding state does not match the model's learned roundings (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for key, value in state.items():
        own[key].copy_(value)


@contextlib.contextmanager
def hard_rounding(model: nn.Module) -> Iterator[None]:
    """Within the block, every attached rounding is hard (``v >= 0``: the codes the baked weights will have)."""
    roundings = [q.rounding for q in quantizers(model).values() if isinstance(q.rounding, LearnedRounding)]
    before = [r.hard for r in roundings]
    for rounding in roundings:
        rounding.hard = True
    try:
        yield
    finally:
        for rounding, hard in zip(roundings, before):
            rounding.hard = hard


def weight_dependent(layers: dict[str, WeightLayer], parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    """Those of ``parameters`` (e.g. fold parameters) that any of the layers' weights is computed from."""
    if not parameters:
        return []
    flags = [p.requires_grad for p in parameters]
    used: set[int] = set()
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            for layer in layers.values():
                grads = torch.autograd.grad(layer.weight.sum(), parameters, allow_unused=True) \
                    if layer.weight.requires_grad else [None] * len(parameters)
                used.update(id(p) for p, g in zip(parameters, grads) if g is not None)
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
    return [p for p in parameters if id(p) in used]
