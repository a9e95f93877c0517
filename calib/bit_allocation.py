"""The exact allocation step of :mod:`calib.bit_budget`: a multiple-choice knapsack over quantizer widths.

Each item (a quantizer's :class:`calib.bit_budget.Sensitivity`: ``name``, ``cost`` elements, ``error(bits)``)
takes one width; the cost-weighted mean width stays within the budget and the summed predicted error is least.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Sensitivity(Protocol):
    """What the allocation reads of one quantizer (:class:`calib.bit_budget.Sensitivity` is one)."""

    name: str
    cost: float

    def error(self, bits: int) -> float: ...

#: units the budget above the narrowest width is divided into by the allocation's dynamic programming
DEFAULT_STEPS = 1 << 14

#: relative slack on the budget test: sums of float costs must not refuse an exactly fitting allocation
_SLACK = 1e-9


def solve(items: list[Sensitivity], budget: float, widths: tuple[int, ...],
          steps: int = DEFAULT_STEPS) -> tuple[dict[str, int], bool]:
    """Widths of ``items`` (one kind) with cost-weighted mean <= ``budget``, minimizing the summed error.

    A multiple-choice knapsack, solved exactly by dynamic programming over the bits above the narrowest
    width, in ``steps`` equal units of the budget (costs rounded to the nearest unit; the result is then
    checked in exact arithmetic and the capacity lowered until it holds). Returns the widths and whether
    a uniform width was kept because it predicted less error (the rounding can exclude an allocation
    that fills the budget exactly, e.g. uniform at the budget). Deterministic: ties keep the narrower
    width; items go in name order.
    """
    widths = tuple(sorted(widths))
    items = sorted(items, key=lambda s: s.name)
    total = sum(s.cost for s in items)
    limit = budget * total * (1 + _SLACK)
    capacity = budget * total - widths[0] * total
    chosen = {s.name: widths[0] for s in items}
    if capacity > 0 and total > 0:
        unit = capacity / steps
        errors = torch.tensor([[s.error(b) for b in widths] for s in items], dtype=torch.float64)
        units = torch.tensor([[round(s.cost * (b - widths[0]) / unit) for b in widths] for s in items])
        choice = _knapsack(errors, units, steps)
        for slack in range(steps + 1):  # rounding may overshoot the real budget by a few units
            trial = _backtrack(choice, units, steps - slack)
            chosen = {s.name: widths[k] for s, k in zip(items, trial)}
            if sum(s.cost * chosen[s.name] for s in items) <= limit:
                break
    best_error = sum(s.error(chosen[s.name]) for s in items)
    uniform = [b for b in widths if b * total <= limit]
    if uniform:
        best = min(uniform, key=lambda b: (sum(s.error(b) for s in items), -b))
        if sum(s.error(best) for s in items) < best_error:
            return {s.name: best for s in items}, True
    return chosen, False


def _knapsack(errors: torch.Tensor, units: torch.Tensor, steps: int) -> torch.Tensor:
    """Choice table ``(items, steps + 1)``: the width index of item ``i`` in the best use of ``j`` units.

    ``errors`` / ``units`` ``(items, widths)``: each option's error and cost in units (row ``i``, option ``k``).
    ``best[j]`` = least summed error of the items so far within ``j`` units.
    """
    best = torch.zeros(steps + 1, dtype=torch.float64)
    choice = torch.zeros(errors.shape[0], steps + 1, dtype=torch.int8)
    for i in range(errors.shape[0]):
        options = torch.full((errors.shape[1], steps + 1), float("inf"), dtype=torch.float64)
        for k in range(errors.shape[1]):
            cost = int(units[i, k])
            if cost <= steps:
                options[k, cost:] = best[:steps + 1 - cost] + errors[i, k]
        best, choice[i] = options.min(dim=0)  # the first minimum: the narrowest width on ties
    return choice


def _backtrack(choice: torch.Tensor, units: torch.Tensor, capacity: int) -> list[int]:
    picks = [0] * choice.shape[0]
    for i in range(choice.shape[0] - 1, -1, -1):
        picks[i] = int(choice[i, capacity])
        capacity -= int(units[i, picks[i]])
    return picks
