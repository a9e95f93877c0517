"""Which tensors are the same channels: a data-flow trace of one float forward, and fold verification.

Smoothing (:mod:`.smoothing`) and shifts (:mod:`.shift`) fold a per-channel factor or offset into
the producer of a tensor and the linears that read it. Where such a pair exists is found from data,
model-agnostically: :func:`trace_channels` runs one float forward and records per-channel sums and
sums of squares ``(C,)`` of every LayerNorm output, every quantized linear's input and output, and
the attention operands. Token permutations, rolls and window partitions keep these per channel, so a
linear reading a LayerNorm's output (through any reshaping of tokens) matches it
(:func:`norm_consumers`), and an attention's v or k matches a slice of the qkv output
(:func:`attention_operands`). :func:`verify_folds` then confirms, with random parameters, that a
candidate fold leaves the float output unchanged (a LayerNorm output that also feeds a residual
stream fails this and is dropped). The example input must need no padding inside the model
(:func:`toolchain.models.example_input`).

>>> stats = ChannelStats.of(torch.arange(6.0).reshape(1, 3, 2), (-1,))   # 3 tokens, 2 channels
>>> stats.count, stats.sum.tolist(), stats.sumsq.tolist()
(3, [6.0, 9.0], [20.0, 35.0])
>>> stats.matches(ChannelStats.of(torch.arange(6.0).reshape(3, 2).flip(0), (-1,)))   # token order is free
True
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from toolchain.quant import QuantLinear, QuantMatMul, float_mode
from toolchain.tolerances import CHANNEL_MATCH_RTOL, FOLD_VERIFY_RTOL

log = logging.getLogger(__name__)



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

    def matches(self, other: ChannelStats, rtol: float = CHANNEL_MATCH_RTOL) -> bool:
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
    ``"matmul_out_heads"`` (dims ``(-3, -1)``). ``shapes``: the ``(a, b)`` operand shapes of each
    QuantMatMul's first call (head count and head size, for folds per head).
    """

    calls: dict[tuple[str, str], list[ChannelStats]] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

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
            trace.shapes.setdefault(path, (tuple(args[0].shape), tuple(b.shape)))
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


def calls_match(consumer: list[ChannelStats], producer: list[ChannelStats], rtol: float = CHANNEL_MATCH_RTOL) -> bool:
    """Whether every call of ``consumer`` matches some call of ``producer`` (and there is at least one)."""
    return bool(consumer) and all(any(c.matches(p, rtol) for p in producer) for c in consumer)


def verify_folds(model: nn.Module, example: torch.Tensor, candidates: list[Any],
                 apply: Callable[[nn.Module, list[Any]], Callable[[], None]],
                 rtol: float = FOLD_VERIFY_RTOL) -> list[Any]:
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

