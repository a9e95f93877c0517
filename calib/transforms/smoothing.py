"""Channel smoothing (SmoothQuant) folded into the producer of a tensor and the linears that read it.

A tensor ``y`` ``(..., C)`` read by linear layers ``W`` ``(C_out, C)`` is divided channel-wise by
``s_j > 0`` where it is produced, and the consumers' weights are multiplied back,
``W'[:, j] = W[:, j] * s_j`` (every consumer, one shared ``s``), so ``W' y' = W y``: the float model is
unchanged (up to fp32 rounding), the deployed graph has no extra op, the per-tensor activation
quantizer sees ``y / s`` (outlier channels tamed) and the weight quantizer ``W * s``. Two producers
fold (:data:`GROUP_KINDS`):

- ``"norm"``: a LayerNorm output ``y_j = gamma_j * xhat_j + beta_j``: ``gamma' = gamma / s``,
  ``beta' = beta / s``. SwinIR: ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` in every block.
  NGswin: none; its blocks are post-norm (``x + norm1(attn(x))``), so ``qkv`` and ``fc1`` read the
  residual stream, which no per-channel factor can cross exactly (LayerNorms read it too).
- ``"value"``: an attention's ``v``, rows ``[start, stop)`` of the qkv linear's weight and bias
  divided by ``s``; ``probs @ (v / s) = (probs @ v) / s`` per channel, so the out-projection's columns
  take ``s`` back. Both v's quantizer and the out-projection's input quantizer see the smoothed
  tensor. Every attention of SwinIR and NGswin (window and N-gram attention).

A third kind does not fold and is opt-in (:data:`EXPLICIT_KINDS`):

- ``"input"``: one input-quantized linear whose input no fold reaches (NGswin's ``qkv`` and ``fc1``
  read the residual stream). The linear multiplies its input by ``1 / s`` before the input quantizer
  (``QuantLinear.input_multiplier``) and its weight columns by ``s``. The deployed graph carries one
  per-channel ``Mul`` before that input's ``QuantizeLinear`` (float, exact on every engine; TensorRT
  fuses a pointwise op into the neighbouring kernels). Linears that read a foldable group (whether
  or not it is selected) never get an ``"input"`` group, so shifts and folds never meet a multiplier.

The fold is written as :mod:`torch.nn.utils.parametrize` parametrizations of the producer's
``weight``/``bias`` and of each consumer ``QuantLinear.weight``, driven by one learnable
``log_scale`` ``(C,)`` per group (:func:`smoothing_parameters`): DQC trains it with the bounds and
gradients flow through the fold. :func:`calib.transforms.fold.bake_transforms` writes the folded
values into plain Parameters for export (bit-identical outputs).

Groups are found from data flow, model-agnostically (:func:`find_smoothing_groups`, over the trace of
:mod:`calib.transforms.trace`): a linear whose input has the per-channel statistics of a LayerNorm's
output reads that output, an attention's v is the qkv output slice with its statistics; a forward
with random factors then confirms that the fold leaves the float output unchanged (a LayerNorm
output that also feeds a residual stream fails this and is dropped). The example input must need no
padding inside the model (:func:`toolchain.models.example_input`).

Order: find groups (and shift sites) -> :func:`add_smoothing` -> :func:`init_smoothquant` (float
statistics) -> shifts -> DOBI -> DQC -> :func:`~calib.transforms.fold.bake_transforms` -> export.

>>> from toolchain.models.examples import tiny_swinir
>>> model = tiny_swinir()   # random weights; real ones: load_model
>>> from toolchain.quant import QuantConfig, quantize_model
>>> from calib.observers import batch_forward_loop
>>> model = quantize_model(model, QuantConfig())
>>> x = torch.rand(1, 3, 16, 16)
>>> with float_mode(model):
...     before = model(x)
>>> groups = find_smoothing_groups(model, torch.rand(1, 3, 16, 16))
>>> [(group.kind, group.producer.split(".")[-1]) for group in groups]
[('norm', 'norm1'), ('value', 'qkv'), ('norm', 'norm2')]
>>> _ = add_smoothing(model, groups)
>>> factors = init_smoothquant(model, batch_forward_loop(torch.rand(4, 3, 16, 16), progress=False), alpha=0.5)
>>> [tuple(s.shape) for s in factors.values()]
[(12,), (12,), (12,)]
>>> with float_mode(model):   # the fold leaves the float model's output unchanged
...     torch.allclose(model(x), before, atol=1e-5)
True
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear, float_mode

from .fold import FoldParametrization, _check_unfolded, _fold_modules, _folds, _module, _original
from .trace import attention_operands, norm_consumers, trace_channels, verify_folds

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
FOLDED_KINDS = ("norm", "value")
#: kinds that leave one Mul in the deployed graph
EXPLICIT_KINDS = ("input",)
GROUP_KINDS = FOLDED_KINDS + EXPLICIT_KINDS
#: floor on max|X_j| and max|W_j| in the SmoothQuant rule (dead channels get finite factors)
STAT_FLOOR = 1e-5


class DivideRows(FoldParametrization):
    """Producer tensor (LayerNorm ``weight``/``bias`` ``(C,)``, linear ``weight`` ``(C_out, C_in)`` or
    ``bias``) -> entries (rows) ``[start, stop)`` divided by ``exp(log_scale)``; the producer's weight
    parametrization owns ``log_scale``."""

    def __init__(self, log_scale: nn.Parameter, group: SmoothingGroup, owner: bool) -> None:
        super().__init__()
        self.group = group
        self._share("log_scale", log_scale, owner)
        self.owner = owner

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.group.start, self.group.stop
        scale = torch.exp(self.log_scale).view(-1, *([1] * (t.dim() - 1)))
        if start == 0 and stop == t.shape[0]:
            return t / scale
        return torch.cat([t[:start], t[start:stop] / scale, t[stop:]])


class ScaleColumns(FoldParametrization):
    """Consumer weight ``(C_out, C)`` -> ``W * exp(log_scale)`` along the input channels."""

    def __init__(self, log_scale: nn.Parameter, group: SmoothingGroup) -> None:
        super().__init__()
        self.group = group
        self._share("log_scale", log_scale, owner=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.exp(self.log_scale)


@dataclass(frozen=True)
class SmoothingGroup:
    """Output channels ``[start, stop)`` of ``producer``, read by the input-quantized ``linears``.

    ``kind`` ``"norm"``: ``producer`` is a LayerNorm (all its channels) whose output the linears read
    through token reshapes only. ``"value"``: ``producer`` is the linear whose output slice is an
    attention's v; the linears read the attention output ``probs @ v`` (per channel, a weighted sum
    of v over tokens, so ``probs @ (v / s) = (probs @ v) / s``). ``"input"``: ``producer`` is the one
    linear in ``linears``; its ``input_multiplier`` holds ``1 / s``.
    """

    kind: str
    producer: str
    start: int
    stop: int
    linears: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.stop - self.start

    @property
    def key(self) -> str:
        """Unique name of the group's factors (a qkv linear can produce a v group and own an input group)."""
        return f"{self.producer}.input" if self.kind == "input" else self.producer

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "producer": self.producer, "start": self.start, "stop": self.stop,
                "linears": list(self.linears)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SmoothingGroup:
        group = SmoothingGroup(str(data["kind"]), str(data["producer"]), int(data["start"]), int(data["stop"]),
                               tuple(str(x) for x in data["linears"]))
        if group.kind not in GROUP_KINDS:
            raise ValueError(f"smoothing group {group.producer}: kind must be one of {GROUP_KINDS}")
        return group


def find_smoothing_groups(model: nn.Module, example: torch.Tensor, kinds: Iterable[str] = FOLDED_KINDS,
                          verify: bool = True) -> list[SmoothingGroup]:
    """The smoothing groups of ``model`` whose fold is exact (see the module docstring), in module order.

    ``example`` ``(1, C, H, W)``: an input the model does not pad. Only linears with an input quantizer
    count (smoothing helps that quantizer). Raises ``ValueError`` if the model already has folds.
    """
    kinds = tuple(kinds)
    if set(kinds) - set(GROUP_KINDS):
        raise ValueError(f"smoothing kinds must be among {GROUP_KINDS}, got {kinds}")
    _check_unfolded(model)
    modules = dict(model.named_modules())
    trace = trace_channels(model, example)
    foldable = [SmoothingGroup("norm", norm, 0, modules[norm].weight.shape[0], tuple(linears))
                for norm, linears in norm_consumers(modules, trace).items()]
    for _, source, readers in attention_operands(modules, trace, "attn_v"):
        readers = [r for r in readers if modules[r].input_quantizer is not None]
        if source is not None and readers:
            foldable.append(SmoothingGroup("value", *source, tuple(readers)))
    groups = [g for g in _merge_shared_values(foldable) if g.kind in kinds]
    if "input" in kinds:
        covered = {path for g in foldable for path in g.linears}
        groups += [SmoothingGroup("input", path, 0, m.in_features, (path,)) for path, m in modules.items()
                   if isinstance(m, QuantLinear) and m.input_quantizer is not None and path not in covered]
    order = {path: i for i, path in enumerate(modules)}
    groups.sort(key=lambda g: order[g.producer])
    if verify:
        groups = verify_folds(model, example, groups, _random_smoothing)
    log.info("smoothing: %d groups (%s)", len(groups), ", ".join(f"{k} {sum(g.kind == k for g in groups)}"
                                                                 for k in kinds))
    return groups



def _merge_shared_values(groups: list[SmoothingGroup]) -> list[SmoothingGroup]:
    """One value group per producer: attentions that read the same v (ATD's window and category attentions share
    its qkv) become one group whose factors every reader's linear compensates; a second, different slice of the
    same producer is left out (its rows cannot be divided twice)."""
    merged: dict[str, SmoothingGroup] = {}
    out: list[SmoothingGroup] = []
    for group in groups:
        if group.kind != "value":
            out.append(group)
            continue
        first = merged.get(group.producer)
        if first is None:
            merged[group.producer] = group
            out.append(group)
        elif (first.start, first.stop) == (group.start, group.stop):
            joined = replace(first, linears=first.linears + tuple(p for p in group.linears if p not in first.linears))
            out[out.index(first)] = merged[group.producer] = joined
        else:
            log.info("smoothing: %s channels [%d:%d] left out: [%d:%d] of it is smoothed already", group.producer,
                     group.start, group.stop, first.start, first.stop)
    return out


def _random_smoothing(model: nn.Module, groups: list[SmoothingGroup]) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    params = add_smoothing(model, groups)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.rand(p.shape, generator=generator) * 2 - 1)  # factors in [1/e, e]
    return lambda: remove_smoothing(model, groups)


def add_smoothing(model: nn.Module, groups: Iterable[SmoothingGroup]) -> dict[str, nn.Parameter]:
    """Register the folds of ``groups`` with ``log_scale = 0`` (identity); returns them by producer path.

    Smoothing comes before shifts (a shift subtracts one offset from the smoothed tensor).
    """
    modules = dict(model.named_modules())
    made: dict[str, nn.Parameter] = {}
    for group in groups:
        if group.kind == "input":
            made[group.key] = _add_input_smoothing(_module(modules, group.producer, QuantLinear), group)
            continue
        producer = _module(modules, group.producer, nn.LayerNorm if group.kind == "norm" else QuantLinear)
        if _folds(producer, "weight", DivideRows):
            raise ValueError(f"smoothing: {group.producer} is already smoothed")
        if producer.bias is not None and _folds(producer, "bias", FoldParametrization):
            raise ValueError(f"smoothing: {group.producer}.bias already carries a shift; add smoothing first")
        if not 0 <= group.start < group.stop <= producer.weight.shape[0]:
            raise ValueError(f"smoothing: channels [{group.start}:{group.stop}] outside {group.producer}")
        linears = [_module(modules, path, QuantLinear) for path in group.linears]
        for path, linear in zip(group.linears, linears):
            _check_unrotated(linear, path)
            if linear.in_features != group.channels or _folds(linear, "weight", ScaleColumns):
                raise ValueError(f"smoothing: {path} does not read {group.channels} free channels of "
                                 f"{group.producer} (in_features {linear.in_features}, or already smoothed)")
        weight = _original(producer, "weight")
        log_scale = nn.Parameter(torch.zeros(group.channels, dtype=weight.dtype, device=weight.device))
        parametrize.register_parametrization(producer, "weight", DivideRows(log_scale, group, owner=True))
        if producer.bias is not None:
            parametrize.register_parametrization(producer, "bias", DivideRows(log_scale, group, owner=False))
        for linear in linears:
            parametrize.register_parametrization(linear, "weight", ScaleColumns(log_scale, group))
        made[group.key] = log_scale
    return made


def _add_input_smoothing(linear: QuantLinear, group: SmoothingGroup) -> nn.Parameter:
    """``input_multiplier = 1 / s`` (owner of ``log_scale``) and ``W * s`` on one linear."""
    if group.linears != (group.producer,) or (group.start, group.stop) != (0, linear.in_features):
        raise ValueError(f"smoothing: an input group covers all inputs of its one linear, got {group}")
    _check_unrotated(linear, group.producer)
    if linear.input_multiplier is not None or _folds(linear, "weight", ScaleColumns):
        raise ValueError(f"smoothing: {group.producer} already has an input multiplier or smoothed columns")
    weight = _original(linear, "weight")
    log_scale = nn.Parameter(torch.zeros(group.channels, dtype=weight.dtype, device=weight.device))
    linear.input_multiplier = torch.ones(group.channels, dtype=weight.dtype, device=weight.device)
    parametrize.register_parametrization(linear, "input_multiplier", DivideRows(log_scale, group, owner=True))
    parametrize.register_parametrization(linear, "weight", ScaleColumns(log_scale, group))
    return log_scale


def _check_unrotated(linear: QuantLinear, path: str) -> None:
    # the weight of a smoothed, rotated linear is (W * s) R: its column scaling must come before the rotation
    if linear.input_rotation is not None:
        raise ValueError(f"smoothing: {path} is already rotated; add smoothing before rotations "
                         "(calib.transforms.rotation)")


def remove_smoothing(model: nn.Module, groups: Iterable[SmoothingGroup]) -> None:
    """Undo :func:`add_smoothing` exactly (original tensors back, factors discarded).

    Removes every parametrization of the tensors involved: only for a model that had no other fold
    (verification during detection).
    """
    modules = dict(model.named_modules())
    for group in groups:
        for path, names in [(group.producer, ("weight", "bias", "input_multiplier"))] + \
                [(p, ("weight",)) for p in group.linears]:
            module = modules[path]
            for name in names:
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        if group.kind == "input":
            modules[group.producer].input_multiplier = None


def smoothing_owners(model: nn.Module) -> list[DivideRows]:
    """The parametrizations that own each ``log_scale`` (one per group), in module order."""
    return [p for module in model.modules() for name in ("weight", "input_multiplier")
            for p in _fold_modules(module, name, DivideRows) if p.owner]


def smoothing_groups(model: nn.Module) -> list[SmoothingGroup]:
    """The groups currently folded into ``model``, in module order of their producers."""
    return [p.group for p in smoothing_owners(model)]


def smoothing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``log_scale`` Parameters ``(C,)`` of every group (what DQC trains with the bounds)."""
    return [p.log_scale for p in smoothing_owners(model)]


@torch.no_grad()
def init_smoothquant(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                     alpha: float = DEFAULT_ALPHA) -> dict[str, torch.Tensor]:
    """Set every ``log_scale`` by SmoothQuant's rule from float statistics of ``forward_loop(model)``.

    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: ``X`` the consumers' input before smoothing
    (over all calibration data), ``W_j`` column ``j`` of the unsmoothed weights of all consumers.
    Both maxima are floored at :data:`STAT_FLOOR`. Returns the factors ``s`` by producer path.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    owners = smoothing_owners(model)
    if not owners:
        raise ValueError(f"{type(model).__name__} has no smoothing folds: add_smoothing() first")
    modules = dict(model.named_modules())
    amax = {p.group.key: torch.zeros(p.group.channels, dtype=torch.float64) for p in owners}

    def hook(owner: DivideRows) -> Callable:
        def record(module, args):
            # an input group's linear divides inside forward: its pre-hook sees the unsmoothed input
            unsmoothed = args[0].detach().double()
            if owner.group.kind != "input":
                unsmoothed = unsmoothed * torch.exp(owner.log_scale.detach().double())
            key = owner.group.key
            amax[key] = torch.maximum(amax[key], unsmoothed.abs().reshape(-1, owner.group.channels).amax(0).cpu())
        return record

    # every consumer of a group reads the same tensor: its first one is enough
    handles = [modules[p.group.linears[0]].register_forward_pre_hook(hook(p)) for p in owners]
    try:
        with float_mode(model):
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for owner in owners:
        group = owner.group
        columns = torch.stack([_original(modules[p], "weight").detach().abs().amax(0).double().cpu()
                               for p in group.linears]).amax(0)
        x = amax[group.key].clamp_min(STAT_FLOOR)
        w = columns.clamp_min(STAT_FLOOR)
        scale = x.pow(alpha) / w.pow(1.0 - alpha)
        owner.log_scale.copy_(scale.log().to(owner.log_scale))
        factors[group.key] = scale.float()
        log.debug("SmoothQuant %s: factors in [%.3g, %.3g]", group.producer, float(scale.min()), float(scale.max()))
    log.info("SmoothQuant (alpha %.2f) set %d groups", alpha, len(owners))
    return factors
