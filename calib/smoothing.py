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
gradients flow through the fold. :func:`bake_transforms` writes the folded values into plain
Parameters for export (bit-identical outputs).

Groups are found from data flow, model-agnostically (:func:`find_smoothing_groups`): one float
forward records per-channel sums and sums of squares of every LayerNorm output, every quantized
linear's input and output, and the attention operands. Token permutations, rolls and window
partitions keep these per channel, so a linear reading a LayerNorm's output (through any reshaping of
tokens) matches it, and an attention's v matches a slice of the qkv output. Then a forward with
random factors confirms that the fold leaves the float output unchanged (a LayerNorm output that
also feeds a residual stream fails this and is dropped). The example input must need no padding
inside the model (:func:`toolchain.models.example_input`).

Order: find groups (and shift sites) -> :func:`add_smoothing` -> :func:`init_smoothquant` (float
statistics) -> shifts -> DOBI -> DQC -> :func:`bake_transforms` -> export.

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
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear, QuantMatMul, float_mode

log = logging.getLogger(__name__)

#: relative agreement of per-channel sums that counts as "the same tensor" (float64 sums of fp32 values)
MATCH_RTOL = 1e-6
#: a fold passes verification when the float output moves by at most this fraction of its range
VERIFY_RTOL = 1e-4
DEFAULT_ALPHA = 0.5
FOLDED_KINDS = ("norm", "value")
#: kinds that leave one Mul in the deployed graph
EXPLICIT_KINDS = ("input",)
GROUP_KINDS = FOLDED_KINDS + EXPLICIT_KINDS
#: floor on max|X_j| and max|W_j| in the SmoothQuant rule (dead channels get finite factors)
STAT_FLOOR = 1e-5


# --------------------------------------------------------------------------------------------------
# data-flow trace


@dataclass
class ChannelStats:
    """Per-channel ``count`` (values per channel), ``sum`` and ``sumsq`` ``(C,)`` float64 of one tensor."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    @staticmethod
    def of(t: torch.Tensor, channel_dims: tuple[int, ...]) -> ChannelStats:
        """Statistics of ``t`` per entry of ``channel_dims`` (flattened in order); other dims reduced."""
        dims = [d % t.dim() for d in channel_dims]
        rest = [d for d in range(t.dim()) if d not in dims]
        flat = t.detach().permute(*rest, *dims).reshape(-1, math.prod(t.shape[d] for d in dims)).double()
        return ChannelStats(flat.shape[0], flat.sum(0), flat.square().sum(0))

    def narrow(self, start: int, length: int) -> ChannelStats:
        return ChannelStats(self.count, self.sum[start:start + length], self.sumsq[start:start + length])

    def matches(self, other: ChannelStats, rtol: float = MATCH_RTOL) -> bool:
        """Same count and channels, sums equal to ``rtol`` of their magnitude (``sqrt(count*sumsq)``)."""
        if self.count != other.count or self.sum.shape != other.sum.shape:
            return False
        scale = (self.sumsq * self.count).sqrt() + 1e-30
        return bool(((self.sum - other.sum).abs() <= rtol * scale).all()
                    and ((self.sumsq - other.sumsq).abs() <= rtol * self.sumsq + 1e-30).all())


@dataclass
class Trace:
    """Per-call :class:`ChannelStats` of a float forward, keyed ``(what, module path)``.

    ``what``: ``"norm_out"`` (LayerNorm output, channels last), ``"linear_in"`` / ``"linear_out"``
    (QuantLinear, channels last), ``"matmul_b_heads"`` (right operand, channels = heads x features:
    dims ``(-3, -1)`` for v, ``(-3, -2)`` for k^T chosen by the operand's role) and
    ``"matmul_out_heads"`` (dims ``(-3, -1)``).
    """

    calls: dict[tuple[str, str], list[ChannelStats]] = field(default_factory=dict)

    def add(self, key: tuple[str, str], stats: ChannelStats) -> None:
        self.calls.setdefault(key, []).append(stats)

    def get(self, what: str, path: str) -> list[ChannelStats]:
        return self.calls.get((what, path), [])


def _head_dims(t: torch.Tensor, feature_dim: int) -> tuple[int, ...]:
    """Channel dims of an attention operand: (heads, features) when it has a head axis."""
    return (-3, feature_dim) if t.dim() >= 4 else (feature_dim,)


def trace_channels(model: nn.Module, example: torch.Tensor) -> Trace:
    """One float forward of ``example`` recording the statistics :class:`Trace` describes."""
    trace = Trace()
    handles = []

    def norm_hook(path: str) -> Callable:
        return lambda module, args, out: trace.add(("norm_out", path), ChannelStats.of(out, (-1,)))

    def linear_hook(path: str) -> Callable:
        def hook(module, args, out):
            trace.add(("linear_in", path), ChannelStats.of(args[0], (-1,)))
            trace.add(("linear_out", path), ChannelStats.of(out, (-1,)))
        return hook

    def matmul_hook(path: str, role: Optional[str]) -> Callable:
        def hook(module, args, out):
            b = args[1]
            trace.add(("matmul_b_heads", path), ChannelStats.of(b, _head_dims(b, -2 if role == "attn_k" else -1)))
            trace.add(("matmul_out_heads", path), ChannelStats.of(out, _head_dims(out, -1)))
        return hook

    for path, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(norm_hook(path)))
        elif isinstance(module, QuantLinear):
            handles.append(module.register_forward_hook(linear_hook(path)))
        elif isinstance(module, QuantMatMul):
            role = module.b_quantizer.role if module.b_quantizer is not None else None
            handles.append(module.register_forward_hook(matmul_hook(path, role)))
    try:
        with torch.no_grad(), float_mode(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def calls_match(consumer: list[ChannelStats], producer: list[ChannelStats], rtol: float = MATCH_RTOL) -> bool:
    """Whether every call of ``consumer`` matches some call of ``producer`` (and there is at least one)."""
    return bool(consumer) and all(any(c.matches(p, rtol) for p in producer) for c in consumer)


def verify_folds(model: nn.Module, example: torch.Tensor, candidates: list[Any],
                 apply: Callable[[nn.Module, list[Any]], Callable[[], None]],
                 rtol: float = VERIFY_RTOL) -> list[Any]:
    """The candidates whose fold (random parameters) leaves the float output of ``example`` unchanged.

    ``apply(model, subset)`` folds ``subset`` with random parameters and returns an undo function
    that restores the model exactly. Subsets that fail are bisected, so one bad candidate costs
    about ``2 log2(n)`` extra forwards.
    """
    with torch.no_grad(), float_mode(model):
        reference = model(example)
        tolerance = rtol * float((reference.amax() - reference.amin()).clamp_min(1e-12))

        def passes(subset: list[Any]) -> bool:
            undo = apply(model, subset)
            try:
                error = float((model(example) - reference).abs().max())
            finally:
                undo()
            return error <= tolerance

        def search(subset: list[Any]) -> list[Any]:
            if not subset or passes(subset):
                return subset
            if len(subset) == 1:
                log.info("fold of %s changes the float output: dropped", subset[0])
                return []
            half = len(subset) // 2
            return search(subset[:half]) + search(subset[half:])

        return search(list(candidates))


# --------------------------------------------------------------------------------------------------
# parametrizations


class FoldParametrization(nn.Module):
    """Base of every fold of :mod:`calib.smoothing` and :mod:`calib.shift` (what :func:`bake_transforms` bakes)."""

    def _share(self, name: str, parameter: nn.Parameter, owner: bool) -> None:
        # one Parameter drives several tensors; only its owner registers it (one state-dict entry,
        # one optimizer entry), the others keep a plain reference
        if owner:
            self.register_parameter(name, parameter)
        else:
            object.__setattr__(self, name, parameter)


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
    groups = [g for g in foldable if g.kind in kinds]
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


def norm_consumers(modules: dict[str, nn.Module], trace: Trace) -> dict[str, list[str]]:
    """``{LayerNorm path: [paths of the input-quantized linears that read exactly its output]}``."""
    norms = [path for path, m in modules.items()
             if isinstance(m, nn.LayerNorm) and m.weight is not None and trace.get("norm_out", path)]
    consumers: dict[str, list[str]] = {}
    for path, module in modules.items():
        if not isinstance(module, QuantLinear) or module.input_quantizer is None:
            continue
        found = [n for n in norms if calls_match(trace.get("linear_in", path), trace.get("norm_out", n))]
        if len(found) == 1:
            consumers.setdefault(found[0], []).append(path)
        elif len(found) > 1:
            log.warning("%s: input matches several LayerNorms %s; not folded", path, found)
    return consumers


def attention_operands(modules: dict[str, nn.Module], trace: Trace, role: str
                       ) -> list[tuple[str, Optional[tuple[str, int, int]], list[str]]]:
    """For every MatMul whose right operand has ``role`` (``"attn_v"``, ``"attn_k"``): its path, the
    ``(linear, start, stop)`` output slice that operand is (None if not exactly one), and the linears
    that read the MatMul's output (channels heads x features, as the attention's out-projection)."""
    linears = {p: m for p, m in modules.items() if isinstance(m, QuantLinear)}
    found = []
    for path, matmul in modules.items():
        if not isinstance(matmul, QuantMatMul) or matmul.b_quantizer is None or matmul.b_quantizer.role != role:
            continue
        source = _slice_source(linears, trace, trace.get("matmul_b_heads", path))
        readers = [p for p in linears if calls_match(trace.get("linear_in", p), trace.get("matmul_out_heads", path))]
        found.append((path, source, readers))
    return found


def _slice_source(linears: dict[str, QuantLinear], trace: Trace, operand: list[ChannelStats]
                  ) -> Optional[tuple[str, int, int]]:
    """``(linear path, start, stop)``: the unique linear whose output slice equals ``operand``."""
    if not operand:
        return None
    width = operand[0].sum.shape[0]
    found = []
    for path in linears:
        outputs = trace.get("linear_out", path)
        if not outputs or outputs[0].sum.shape[0] % width:
            continue
        for start in range(0, outputs[0].sum.shape[0], width):
            if calls_match(operand, [s.narrow(start, width) for s in outputs]):
                found.append((path, start, start + width))
    return found[0] if len(found) == 1 else None


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
    if linear.input_multiplier is not None or _folds(linear, "weight", ScaleColumns):
        raise ValueError(f"smoothing: {group.producer} already has an input multiplier or smoothed columns")
    weight = _original(linear, "weight")
    log_scale = nn.Parameter(torch.zeros(group.channels, dtype=weight.dtype, device=weight.device))
    linear.input_multiplier = torch.ones(group.channels, dtype=weight.dtype, device=weight.device)
    parametrize.register_parametrization(linear, "input_multiplier", DivideRows(log_scale, group, owner=True))
    parametrize.register_parametrization(linear, "weight", ScaleColumns(log_scale, group))
    return log_scale


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


# --------------------------------------------------------------------------------------------------
# baking and helpers shared with calib.shift


def bake_transforms(model: nn.Module) -> nn.Module:
    """Write every fold (smoothing and shifts) into plain Parameters, in place; returns ``model``.

    The baked model computes bit for bit what the parametrized model computed; it has no
    ``log_scale`` / ``offset`` Parameters left, only the folded LayerNorm affine parameters, weights
    and biases under their usual names. Bias folds of shifts read the quantized weights of their
    linears, so those weight quantizers must be enabled and calibrated (``ValueError`` otherwise).
    """
    readers = [p.linear for m in model.modules() for n in _parametrized_names(m) for p in _fold_modules(m, n)
               if getattr(p, "linear", None) is not None]
    idle = sorted({r.weight_quantizer.name for r in readers if r.weight_quantizer is not None and (
        not r.weight_quantizer.enabled or not r.weight_quantizer.initialized or r.weight_quantizer.observer is not None)})
    if idle:
        raise ValueError(f"bake_transforms: {len(idle)} weight quantizers that bias folds read are disabled, "
                         f"uncalibrated or observed (e.g. {idle[0]}); bake the calibrated quantized model")
    baked = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name in _parametrized_names(module):
                folds = _fold_modules(module, name)
                if not folds:
                    continue
                if len(folds) != len(module.parametrizations[name]):
                    raise ValueError(f"bake_transforms: {type(module).__name__}.{name} carries foreign "
                                     "parametrizations; refusing to bake them")
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                baked += 1
    log.info("baked %d folded tensors", baked)
    return model


def _parametrized_names(module: nn.Module) -> list[str]:
    return list(module.parametrizations.keys()) if parametrize.is_parametrized(module) else []


def _fold_modules(module: nn.Module, name: str, kind: type = FoldParametrization) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, name):
        return []
    return [p for p in module.parametrizations[name] if isinstance(p, kind)]


def _folds(module: nn.Module, name: str, kind: type) -> bool:
    return bool(_fold_modules(module, name, kind))


def _original(module: nn.Module, name: str) -> torch.Tensor:
    """The unparametrized tensor ``module.<name>``."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def quantized_weight(linear: QuantLinear) -> torch.Tensor:
    """The weight ``linear`` multiplies with in its forward (same call, same values)."""
    weight, quantizer = linear.weight, linear.weight_quantizer
    if quantizer is None or not quantizer.enabled or not quantizer.initialized or quantizer.observer is not None:
        return weight
    return quantizer(weight)


def _module(modules: dict[str, nn.Module], path: str, kind: type) -> nn.Module:
    module = modules.get(path)
    if not isinstance(module, kind):
        raise ValueError(f"no {kind.__name__} at {path!r} (found {'nothing' if module is None else type(module).__name__})")
    return module


def _check_unfolded(model: nn.Module) -> None:
    if any(_fold_modules(m, n) for m in model.modules() for n in _parametrized_names(m)):
        raise ValueError("detection runs on a model without folds: find groups/sites before adding any")
