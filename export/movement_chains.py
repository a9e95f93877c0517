"""Chains of pure data movement (Transpose / Reshape) as one Reshape -> Transpose -> Reshape.

A chain of ``Transpose`` and reshape-like nodes (``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Flatten``)
only moves elements; its net effect is one permutation of "atoms": the input's axes cut into the
finest pieces any reshape of the chain splits them into. :func:`plan_movement` finds those atoms,
composes every transpose of the chain into one permutation of them, merges runs of atoms that stay
adjacent and in order (DAT's window partition ``(B, 8, 2, 8, 32, 30)`` with perm ``(0, 1, 3, 2, 4, 5)``
is the 4-D ``(8B, 2, 8, 960)`` with perm ``(0, 2, 1, 3)``), drops size-1 axes, and returns the
shortest equivalent: nothing, one Reshape, or Reshape -> Transpose -> Reshape of the lowest rank.

Shapes are static except one symbolic dimension (the batch; the exporter writes ``s77``, ``16*s77``):
a dimension is ``(coefficient, symbol or None)`` and divides another only if it does for every batch,
so no plan depends on the batch size. :func:`same_movement` replays two plans on ``arange`` tensors at
several batch sizes; a plan is used only if it moves every element where the chain did.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import numpy as np

#: a dimension: ``(coefficient, symbol)``; ``symbol`` None for a static size
Dim = tuple[int, Optional[str]]
#: one step of a chain: ``("transpose", perm)`` or ``("reshape", output dims)``
Step = tuple[str, tuple]
ONE: Dim = (1, None)
_SYMBOLIC = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z_0-9]*)(?:\*(\d+))?$")
#: batch sizes the symbolic dimension takes when two plans are compared
CHECK_BATCHES = (1, 2, 3)


def parse_dim(dim: Union[int, str, object]) -> Optional[Dim]:
    """``12`` -> ``(12, None)``, ``"16*s77"`` -> ``(16, "s77")``; None for anything else (unknown, ``s1*s2``)."""
    if isinstance(dim, (int, np.integer)):
        return (int(dim), None) if dim >= 0 else None
    match = _SYMBOLIC.match(str(dim).replace(" ", "")) if dim is not None else None
    if match is None:
        return None
    left, symbol, right = match.groups()
    return int(left or 1) * int(right or 1), symbol


def format_dim(dim: Dim) -> Union[int, str]:
    """The inverse of :func:`parse_dim`: an int, or ``"16*s77"``."""
    coefficient, symbol = dim
    if symbol is None:
        return coefficient
    return symbol if coefficient == 1 else f"{coefficient}*{symbol}"


def divides(a: Dim, b: Dim) -> bool:
    return b[0] % a[0] == 0 and (a[1] is None or a[1] == b[1])


def _quotient(b: Dim, a: Dim) -> Dim:
    return b[0] // a[0], (b[1] if a[1] is None else None)


def dims_product(dims: Sequence[Dim]) -> Optional[Dim]:
    """Product of ``dims``; None when a symbol would appear twice (not one batch dimension)."""
    coefficient, symbol = 1, None
    for c, s in dims:
        if s is not None and symbol is not None:
            return None
        coefficient, symbol = coefficient * c, symbol or s
    return coefficient, symbol


def plan_movement(in_dims: Sequence[Dim], steps: Sequence[Step], out_dims: Sequence[Dim]) -> Optional[list[Step]]:
    """The shortest chain equivalent to ``steps`` on an input of ``in_dims`` ending in ``out_dims``.

    Returns ``[]`` (the chain is the identity), ``[reshape]``, or up to ``[reshape, transpose, reshape]``
    with the transpose of the lowest rank; None when a reshape of the chain is not a split or merge of
    axes (``(6, 4) -> (4, 6)``) or the shapes hold more than one symbolic dimension.
    """
    if dims_product(in_dims) is None or dims_product(in_dims) != dims_product(out_dims):
        return None
    sizes: list[Dim] = []
    input_order: list[int] = []
    axes: list[list[int]] = []
    for dim in in_dims:
        if dim == ONE:
            axes.append([])
            continue
        sizes.append(dim)
        input_order.append(len(sizes) - 1)
        axes.append([len(sizes) - 1])
    for kind, arg in steps:
        if kind == "transpose":
            if sorted(arg) != list(range(len(axes))):
                return None
            axes = [axes[p] for p in arg]
            continue
        flat = [atom for axis in axes for atom in axis]
        axes, i = [], 0
        for target in arg:
            group, rest = [], target
            while rest != ONE:
                if i >= len(flat):
                    return None
                atom = flat[i]
                if divides(sizes[atom], rest):
                    group.append(atom)
                    rest, i = _quotient(rest, sizes[atom]), i + 1
                elif divides(rest, sizes[atom]):  # the reshape splits this atom: major part first
                    sizes.extend([rest, _quotient(sizes[atom], rest)])
                    major, minor = len(sizes) - 2, len(sizes) - 1
                    at = input_order.index(atom)
                    input_order[at:at + 1] = [major, minor]
                    flat[i:i + 1] = [major, minor]
                    group.append(major)
                    rest, i = ONE, i + 1
                else:
                    return None
            axes.append(group)
        if i != len(flat):
            return None
    if [tuple(d) for d in _axis_dims(axes, sizes)] != [tuple(d) for d in out_dims]:
        return None
    return _shortest(list(in_dims), input_order, [atom for axis in axes for atom in axis], sizes, list(out_dims))


def _axis_dims(axes: list[list[int]], sizes: list[Dim]) -> list[Dim]:
    """The dims of a tensor whose axes are ``axes`` (lists of atoms of ``sizes``)."""
    return [dims_product([sizes[a] for a in axis]) or ONE for axis in axes]


def _shortest(in_dims: list[Dim], input_order: list[int], output_order: list[int], sizes: list[Dim],
              out_dims: list[Dim]) -> list[Step]:
    """Merge atoms adjacent and in order on both sides, then emit the fewest steps."""
    position = {atom: k for k, atom in enumerate(input_order)}
    runs: list[list[int]] = []
    for atom in output_order:
        if runs and position[atom] == position[runs[-1][-1]] + 1:
            runs[-1].append(atom)
        else:
            runs.append([atom])
    by_input = sorted(range(len(runs)), key=lambda r: position[runs[r][0]])
    rank = {run: k for k, run in enumerate(by_input)}
    perm = tuple(rank[run] for run in range(len(runs)))  # output axis k reads merged input axis perm[k]
    merged = [dims_product([sizes[a] for a in runs[r]]) for r in by_input]
    if perm == tuple(range(len(perm))):
        return [] if out_dims == in_dims else [("reshape", tuple(out_dims))]
    steps: list[Step] = []
    if merged != in_dims:
        steps.append(("reshape", tuple(merged)))
    steps.append(("transpose", perm))
    if [merged[p] for p in perm] != out_dims:
        steps.append(("reshape", tuple(out_dims)))
    return steps


def concrete(dims: Sequence[Dim], batch: int) -> list[int]:
    """``dims`` with the symbol set to ``batch``."""
    return [c * (batch if s is not None else 1) for c, s in dims]


def run_steps(array: np.ndarray, steps: Sequence[Step], batch: int) -> np.ndarray:
    """Replay ``steps`` on ``array`` (numpy), the symbolic dimension set to ``batch``."""
    for kind, arg in steps:
        array = np.transpose(array, arg) if kind == "transpose" else array.reshape(concrete(arg, batch))
    return array


def same_movement(in_dims: Sequence[Dim], first: Sequence[Step], second: Sequence[Step],
                  batches: Sequence[int] = CHECK_BATCHES) -> bool:
    """Whether two chains move every element of an ``in_dims`` input to the same place, at each batch size."""
    for batch in batches:
        shape = concrete(in_dims, batch)
        source = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        a, b = run_steps(source, first, batch), run_steps(source, second, batch)
        if a.shape != b.shape or not np.array_equal(a, b):
            return False
    return True
