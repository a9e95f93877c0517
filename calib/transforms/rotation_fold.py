"""Rotations folded into attention weights, one orthogonal block per head: no op in the deployed graph.

Inside one attention head of size ``d``, two products are unchanged when both operands' channels are
rotated by the same orthogonal ``R`` ``(d, d)``; ``M = diag(R, ..., R)`` ``(w, w)`` rotates every head
of a slice of width ``w = heads * d``:

- ``"qk"``: the scores ``q k^T``, with ``q`` and ``k`` slices ``[qs, qe)``, ``[ks, ke)`` of one linear's
  output (qkv): ``(q M)(k M)^T = q k^T`` per head. The q and k rows of that linear's weight and bias become
  ``M^T W``, ``M^T b``; the q and k quantizers see ``q M`` and ``k M``.
- ``"value"``: the context ``probs @ (v M) = (probs @ v) M``. The v rows take ``M^T`` as above and the
  out-projection's weight columns take ``M`` (``W M``: its input is the heads' contexts side by side, the
  layout of the v slice), so ``((probs @ v) M)(W M)^T = (probs @ v) W^T``. The v quantizer and the
  out-projection's input quantizer see the rotated tensors.

Found from data flow like smoothing's value groups (:func:`find_folded_rotations`): the k (or v) operand
is a slice of a linear's output (:func:`~calib.transforms.trace.attention_operands`), heads and head size
come from the operand's shape, q is the slice of the same output and width that passes the check, and
every candidate is confirmed by a float forward with random rotations (a fold that changes the output is
dropped). DAT's channel attention normalizes q and k over tokens and contracts over tokens, and its v
also feeds a depthwise convolution: neither folds there; its spatial attention's q/k does. Head sizes are
rarely Hadamard orders (DAT-light and SwinIR-light: 10 and 30), so ``R`` is then a seeded random
orthogonal matrix (:func:`~calib.transforms.hadamard.rotation_matrix`).

Composition: smoothing first (the v rows are ``M^T (W_v / s)``, the projection ``(W_p * s) M``), then these
folds, then input rotations (:mod:`.rotation`: the projection is ``W_p M R``); shifts folded into a rotated
slice or into a value fold's projection are refused (:func:`conflicting_shift_sites`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear
from toolchain.quant.routing import opaque

from .fold import FoldParametrization, _check_unfolded, _fold_modules, _module
from .hadamard import KINDS as MATRIX_KINDS
from .hadamard import random_orthogonal, rotation_matrix
from .shift import ShiftSite, SubtractOffset
from .trace import attention_operands, trace_channels, verify_folds

log = logging.getLogger(__name__)

KINDS = ("qk", "value")


@dataclass(frozen=True)
class FoldedRotation:
    """Rows ``slices`` of ``producer``'s output rotated per head of size ``head_dim`` (``"qk"``: the q and k
    slices; ``"value"``: the v slice, whose reading ``linears`` take the rotation in their columns)."""

    kind: str
    producer: str
    slices: tuple[tuple[int, int], ...]
    head_dim: int
    linears: tuple[str, ...] = ()
    matrix: str = "hadamard"
    seed: int = 0
    construction: str = ""

    @property
    def name(self) -> str:
        return f"{self.producer}.{self.kind}.{self.slices[-1][0]}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "producer": self.producer, "slices": [list(s) for s in self.slices],
                "head_dim": self.head_dim, "linears": list(self.linears), "matrix": self.matrix, "seed": self.seed,
                "construction": self.construction}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> FoldedRotation:
        group = FoldedRotation(str(data["kind"]), str(data["producer"]),
                               tuple((int(a), int(b)) for a, b in data["slices"]), int(data["head_dim"]),
                               tuple(map(str, data["linears"])), str(data["matrix"]), int(data["seed"]),
                               str(data["construction"]))
        if group.kind not in KINDS or group.matrix not in MATRIX_KINDS:
            raise ValueError(f"folded rotation {group.name}: kind in {KINDS}, matrix in {MATRIX_KINDS}")
        return group


class RotateRows(FoldParametrization):
    """Producer weight ``(C_out, C_in)`` or bias ``(C_out,)``: each slice's rows ``<- M^T rows``. The weight's
    fold owns the buffer ``block`` ``R`` ``(d, d)``; the bias's reads it from there (``source``)."""

    def __init__(self, group: FoldedRotation, block: Optional[torch.Tensor] = None,
                 source: Optional[RotateRows] = None) -> None:
        super().__init__()
        self.group = group
        if source is None:
            self.register_buffer("block", block)
        object.__setattr__(self, "source", source)  # a reference, not a submodule

    @property
    def matrix(self) -> torch.Tensor:
        return self.block if self.source is None else self.source.block

    def _rotate(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        d, pieces, last = self.group.head_dim, [], 0
        with opaque():  # the router of the attention that reads this weight counts its own matmul calls only
            for start, stop in sorted(self.group.slices):
                rows = t[start:stop]
                pieces += [t[last:start], torch.matmul(r, rows.reshape((stop - start) // d, d, -1)).reshape(rows.shape)]
                last = stop
        return torch.cat(pieces + [t[last:]])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self._rotate(t, self.matrix.t())

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse (GPTQ writes a weight through it)."""
        return self._rotate(t, self.matrix)


class RotateHeadColumns(FoldParametrization):
    """A value fold's reader weight ``(C_out, w)`` -> ``W M`` (``R`` from the producer's :class:`RotateRows`)."""

    def __init__(self, source: RotateRows) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)

    def _rotate(self, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        d = self.source.group.head_dim
        with opaque():
            return torch.matmul(weight.reshape(weight.shape[0], -1, d), r).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._rotate(weight, self.source.matrix)

    def unfold(self, weight: torch.Tensor) -> torch.Tensor:
        return self._rotate(weight, self.source.matrix.t())


def _heads(shape: tuple[int, ...], size_dim: int) -> tuple[int, int]:
    """(heads, head size) of an attention operand: heads on dim -3 where there is one."""
    return (shape[-3] if len(shape) >= 4 else 1), shape[size_dim]


def _candidates(model: nn.Module, example: torch.Tensor, kinds: tuple[str, ...]) -> list[list[FoldedRotation]]:
    """Per attention operand, the folds that may be exact (``"qk"``: one per q slice candidate, likeliest first)."""
    modules = dict(model.named_modules())
    trace = trace_channels(model, example)
    found = []
    if "value" in kinds:
        for path, source, readers in attention_operands(modules, trace, "attn_v"):
            heads, d = _heads(trace.shapes[path][1], -1)
            if source is not None and readers and source[2] - source[1] == heads * d:
                found.append([FoldedRotation("value", source[0], (source[1:],), d, tuple(readers))])
    if "qk" in kinds:
        for path, source, _ in attention_operands(modules, trace, "attn_k"):
            heads, d = _heads(trace.shapes[path][1], -2)
            if source is None or source[2] - source[1] != heads * d or trace.shapes[path][0][-1] != d:
                continue
            producer, start, stop = source
            width, total = stop - start, modules[producer].out_features
            likely = start - total // 3  # the qkv layout (q, k, v) first, then every other slice
            starts = sorted((s for s in range(0, total, width) if s != start), key=lambda s: (s != likely, s))
            found.append([FoldedRotation("qk", producer, ((s, s + width), (start, stop)), d) for s in starts])
    return found


def find_folded_rotations(model: nn.Module, example: torch.Tensor, kinds: Iterable[str] = KINDS,
                          matrix: str = "hadamard", seed: int = 0, verify: bool = True) -> list[FoldedRotation]:
    """The exact folded rotations of ``model`` (module docstring), in module order; group ``i`` uses seed
    ``seed + i``. ``example`` ``(1, C, H, W)``: an input the model does not pad; the model has no folds yet."""
    kinds = tuple(kinds)
    if set(kinds) - set(KINDS) or matrix not in MATRIX_KINDS:
        raise ValueError(f"folded rotation kinds must be among {KINDS} and matrix in {MATRIX_KINDS}")
    _check_unfolded(model)
    modules = dict(model.named_modules())
    pending, groups = _candidates(model, example, kinds), []
    while pending:  # round j tries candidate j of every unresolved operand, slices disjoint within a round
        chosen, taken, rest = [], set(), []
        for options in pending:
            group = options[0]
            rows = {(group.producer, s) for s in group.slices}
            (rest if rows & taken else chosen).append(options)
            taken |= rows
        trial = [options[0] for options in chosen]
        passed = verify_folds(model, example, trial, _random_rotations) if verify else trial
        groups += passed
        pending = rest + [options[1:] for options in chosen if options[0] not in passed and len(options) > 1]
    order = {path: i for i, path in enumerate(modules)}
    groups.sort(key=lambda g: (order[g.producer], g.slices[-1][0]))
    groups = [replace(g, matrix=matrix, seed=seed + i, construction=rotation_matrix(g.head_dim, matrix, seed + i)[1])
              for i, g in enumerate(groups)]
    log.info("folded rotations: %d (%s)", len(groups), ", ".join(f"{k} {sum(g.kind == k for g in groups)}"
                                                                for k in kinds))
    return groups


def _random_rotations(model: nn.Module, groups: list[FoldedRotation]) -> Callable[[], None]:
    add_folded_rotations(model, groups, [random_orthogonal(g.head_dim, 17 + i).float() for i, g in enumerate(groups)])
    modules = dict(model.named_modules())

    def undo() -> None:
        for group in groups:
            for path, names in [(group.producer, ("weight", "bias"))] + [(p, ("weight",)) for p in group.linears]:
                for name in names:
                    if parametrize.is_parametrized(modules[path], name):
                        parametrize.remove_parametrizations(modules[path], name, leave_parametrized=False)
    return undo


def add_folded_rotations(model: nn.Module, groups: Iterable[FoldedRotation],
                         blocks: Optional[list[torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Fold ``groups`` (``blocks``: their ``R``; default: built from each group); returns the ``R`` by name.

    Add smoothing first and input rotations after; slices that overlap a fold or a shift are refused."""
    modules = dict(model.named_modules())
    groups = list(groups)
    made: dict[str, torch.Tensor] = {}
    for index, group in enumerate(groups):
        producer = _module(modules, group.producer, QuantLinear)
        weight = producer.weight
        taken = [s for p in _fold_modules(producer, "weight", RotateRows) for s in p.group.slices]
        shifted = [(p.site.start, p.site.stop) for p in _fold_modules(producer, "bias", SubtractOffset)]
        for start, stop in group.slices:
            if not 0 <= start < stop <= producer.out_features or (stop - start) % group.head_dim:
                raise ValueError(f"folded rotation {group.name}: slice [{start}:{stop}] does not fit")
            if any(a < stop and start < b for a, b in taken + shifted):
                raise ValueError(f"folded rotation {group.name}: rows [{start}:{stop}] are already rotated or "
                                 "shifted (calib.transforms.rotation_fold.conflicting_shift_sites)")
        readers = [_module(modules, p, QuantLinear) for p in group.linears]
        if any(r.input_rotation is not None for r in readers):
            raise ValueError(f"folded rotation {group.name}: a reader is input-rotated; add folded rotations first")
        block = blocks[index] if blocks is not None else rotation_matrix(group.head_dim, group.matrix, group.seed)[0]
        owner = RotateRows(group, block.to(dtype=weight.dtype, device=weight.device))
        parametrize.register_parametrization(producer, "weight", owner)
        if producer.bias is not None:
            parametrize.register_parametrization(producer, "bias", RotateRows(group, source=owner))
        for reader in readers:
            parametrize.register_parametrization(reader, "weight", RotateHeadColumns(owner))
        made[group.name] = owner.block
    return made


def conflicting_shift_sites(sites: Iterable[ShiftSite], groups: Iterable[FoldedRotation]) -> list[ShiftSite]:
    """The shift sites whose slice overlaps a rotated slice, or that fold into a value fold's reader."""
    groups = list(groups)
    return [s for s in sites if any((s.producer == g.producer and any(a < s.stop and s.start < b for a, b in g.slices))
                                    or set(s.bias_folds) & set(g.linears) for g in groups)]


def folded_rotation_owners(model: nn.Module) -> list[RotateRows]:
    """The folds that own each ``R``, in module order."""
    return [p for m in model.modules() for p in _fold_modules(m, "weight", RotateRows) if p.source is None]
