"""Take the slices before the transpose: a CPU graph pass that saves the head split's big float transpose.

Attention blocks split their fused ``qkv`` projection by viewing it as ``[B, N, 3, heads, d]``, moving the
``3`` axis to the front with one transpose of the whole tensor, and taking ``q``, ``k`` and ``v`` as its
three slices (``Transpose -> Gather(axis 0)`` x 3 in the export). DAT's channel attention then transposes
each slice once more (``q.transpose(-2, -1)``), so every channel block moves its ``qkv`` activations twice
in float: one 5-D transpose of ``[1, 4096, 3, 6, 10]`` and three 4-D ones of a third of it
(``benchmarks/cpu_speed.md``: the largest transposes left after :func:`export.speed_passes.compose_movements`).

:func:`gather_before_transpose` takes each slice from the transpose's input instead (``Gather`` on the
axis the transpose moved, then the transpose of the slice, of one axis fewer for a scalar index), so that
the slice's transpose composes with the one after it (``compose_movements`` runs after this pass) and the
big transpose disappears. Elements are only selected and moved, never computed: bit-identical.

It rewrites a transpose only when every use of it is such a ``Gather`` (constant indices, 0-D or 1-D) and at
most one of the slices keeps a transpose of its own that nothing composes with (a slice whose transpose is
the identity needs none; one whose only consumer is a ``Transpose`` composes). So the elements moved by
transposes never grow: DAT's channel blocks (all three slices transposed again) are rewritten; SwinIR's
window attention (``q`` and ``v`` used as they are) is left alone. No quantizer is touched.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from .quantize_early import constant_array as _constant


def _perm(transpose: ir.Node, rank: int) -> list[int]:
    attribute = transpose.attributes.get("perm")
    return list(attribute.as_ints()) if attribute is not None else list(range(rank))[::-1]


def _slice_perm(perm: list[int], axis: int, scalar: bool) -> list[int]:
    """The perm of the slice's transpose: ``perm`` without output axis ``axis`` when a scalar index drops it
    (input axes above the dropped one renumbered), else ``perm`` itself."""
    if not scalar:
        return perm
    dropped = perm[axis]
    return [p - (p > dropped) for i, p in enumerate(perm) if i != axis]


def _gathers(transpose: ir.Node) -> Optional[list[tuple[ir.Node, np.ndarray, int]]]:
    """``(gather, indices, output axis)`` of every use of ``transpose``; None when a use is anything else."""
    out = transpose.outputs[0]
    if out.is_graph_output() or out.shape is None:
        return None
    found = []
    for use in out.uses():
        gather = use.node
        if gather.op_type != "Gather" or gather.domain != "" or use.idx != 0 or len(gather.inputs) != 2:
            return None
        indices = _constant(gather.inputs[1])
        if indices is None or indices.ndim > 1 or indices.dtype.kind not in "iu":
            return None
        axis = gather.attributes.get_int("axis", 0)
        axis = axis + len(out.shape) if axis < 0 else axis
        if not 0 <= axis < len(out.shape) or gather.outputs[0].shape is None:
            return None
        found.append((gather, indices, axis))
    return found or None


def _worth_it(gathers: list[tuple[ir.Node, np.ndarray, int]], perm: list[int]) -> bool:
    """Whether at most one slice keeps a transpose that no following ``Transpose`` composes with."""
    left = 0
    for gather, indices, axis in gathers:
        slice_perm = _slice_perm(perm, axis, indices.ndim == 0)
        if slice_perm == sorted(slice_perm):
            continue
        uses = list(gather.outputs[0].uses())
        followed = (len(uses) == 1 and uses[0].node.op_type == "Transpose" and uses[0].node.domain == ""
                    and not gather.outputs[0].is_graph_output())
        left += not followed
    return left <= 1


def _rewrite(graph: ir.Graph, transpose: ir.Node, gathers: list[tuple[ir.Node, np.ndarray, int]],
             perm: list[int]) -> None:
    source = transpose.inputs[0]
    for gather, indices, axis in gathers:
        scalar = indices.ndim == 0
        source_axis = perm[axis]
        dims = list(source.shape)
        if scalar:
            del dims[source_axis]
        else:
            dims[source_axis] = len(indices)
        early = ir.node("Gather", [source, gather.inputs[1]], attributes={"axis": source_axis},
                        name=f"{gather.name}/before_transpose")
        early.outputs[0].shape, early.outputs[0].dtype = ir.Shape(dims), source.dtype
        nodes, result = [early], early.outputs[0]
        slice_perm = _slice_perm(perm, axis, scalar)
        if slice_perm != sorted(slice_perm):
            moved = ir.node("Transpose", [result], attributes={"perm": slice_perm},
                            name=f"{gather.name}/slice_transpose")
            nodes.append(moved)
            result = moved.outputs[0]
        graph.insert_before(gather, nodes)
        old = gather.outputs[0]
        result.shape, result.dtype, name = old.shape, old.dtype, old.name
        old.replace_all_uses_with(result)
        graph.remove(gather, safe=True)
        result.name = name  # the slice keeps its name
    graph.remove(transpose, safe=True)


def gather_before_transpose(graph: ir.Graph) -> int:
    """Each ``Transpose`` whose uses are all constant-index ``Gather``s (and worth it, see the module docstring)
    replaced by the gathers on its input, each followed by the slice's own transpose; returns how many."""
    rewritten = 0
    for transpose in list(graph):
        if transpose.op_type != "Transpose" or transpose.domain != "" or transpose.inputs[0] is None:
            continue
        source = transpose.inputs[0]
        if source.shape is None:
            continue
        gathers = _gathers(transpose)
        perm = _perm(transpose, len(source.shape))
        if gathers is None or not _worth_it(gathers, perm):
            continue
        _rewrite(graph, transpose, gathers, perm)
        rewritten += 1
    return rewritten
