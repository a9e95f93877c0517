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

With ``carry`` (the ``carry_transpose_to_gathers`` pass, a measured option) the transpose is also carried
below the data movement between it and the gathers: DAT's spatial blocks split ``qkv [B, N, 3, C]`` the same
way (``Transpose(2, 0, 1, 3)``) but cut the channel halves first (``Slice``), and the shifted blocks view the
split as an image (``Reshape`` to ``[3, B, H, W, C]``), roll it (``Slice`` x 2 and ``Concat`` per axis) and
view it back (``Reshape``). Each such node (:data:`CARRIED`) is rewritten on the transpose's input instead
(its axes carried back through the perm; a reshape only where each group of axes it merges or splits is
consecutive and in order there), so the transpose moves down to the gathers, where the q, k, v slices come
out in the order they are used in: no transpose is left. It does not pay on OpenVINO
(``benchmarks/cpu_speed.md``): its CPU plugin runs a gather on a middle axis with a reference kernel that
costs what the transposes did.

It rewrites a transpose only when every value below it, down to the gathers, is used by such nodes only
(gathers with constant indices, 0-D or 1-D) and at most one slice keeps a transpose of its own that nothing
composes with (a slice whose transpose is the identity needs none; one whose only consumer is a
``Transpose`` composes). So the elements moved by transposes never grow: DAT's channel blocks (all three
slices transposed again) are rewritten, and with ``carry`` its spatial blocks; SwinIR's window attention
(``q`` and ``v`` used as they are) is left alone. No quantizer is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_ir as ir

from .ir_values import constant_array as _constant, int64_initializer, shape_initializer, value_dims
from .movement_chains import Dim, dims_product, divides

#: the nodes a transpose is carried below with ``carry`` (each is rewritten on the transpose's input instead)
CARRIED = ("Slice", "Concat", "Reshape")
#: a size-1 axis (reshapes that add or drop one are not carried)
ONE_AXES = {(1, None)}


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


def _gather(use, rank: int) -> Optional[tuple[ir.Node, np.ndarray, int]]:
    """``(gather, indices, axis)`` when ``use`` (a ``Value.uses()`` item) is a constant-index ``Gather`` of the
    data of a rank-``rank`` tensor."""
    gather = use.node
    if gather.op_type != "Gather" or gather.domain != "" or use.idx != 0 or len(gather.inputs) != 2:
        return None
    indices = _constant(gather.inputs[1])
    if indices is None or indices.ndim > 1 or indices.dtype.kind not in "iu":
        return None
    axis = gather.attributes.get_int("axis", 0)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank or gather.outputs[0].shape is None:
        return None
    return gather, indices, axis


def _slice_axes(cut: ir.Node, rank: int) -> Optional[list[int]]:
    """The axes (non-negative) a ``Slice`` of a rank-``rank`` tensor cuts; None when they are not constant."""
    if len(cut.inputs) < 3:
        return None
    if len(cut.inputs) > 3 and cut.inputs[3] is not None:
        axes = _constant(cut.inputs[3])
    else:
        starts = _constant(cut.inputs[1])
        axes = None if starts is None else np.arange(starts.size)
    if axes is None or axes.ndim != 1:
        return None
    axes = [int(a) + rank if a < 0 else int(a) for a in axes]
    return axes if all(0 <= a < rank for a in axes) and len(set(axes)) == len(axes) else None


def _groups(in_dims: list[Dim], out_dims: list[Dim]) -> Optional[list[tuple[list[int], list[int]]]]:
    """A reshape from ``in_dims`` to ``out_dims`` as consecutive groups of input axes that become consecutive
    groups of output axes (each a split or a merge); None when it is not one (``(6, 4) -> (4, 6)``, size-1
    axes, more than one symbolic dimension)."""
    if ONE_AXES.intersection(in_dims + out_dims) or dims_product(in_dims) is None or dims_product(out_dims) is None:
        return None
    groups, i, j = [], 0, 0
    while i < len(in_dims) and j < len(out_dims):
        ins, outs = [i], [j]
        i, j = i + 1, j + 1
        while dims_product([in_dims[k] for k in ins]) != dims_product([out_dims[k] for k in outs]):
            have, want = dims_product([in_dims[k] for k in ins]), dims_product([out_dims[k] for k in outs])
            if divides(have, want) and i < len(in_dims):
                ins.append(i)
                i += 1
            elif divides(want, have) and j < len(out_dims):
                outs.append(j)
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups if i == len(in_dims) and j == len(out_dims) else None


def _reshape_below(in_dims: list[Dim], perm: list[int], out_dims: list[Dim]) -> Optional[tuple[list[Dim], list[int]]]:
    """``Reshape(Transpose(x, perm), out_dims)`` as ``Transpose(Reshape(x, dims), new_perm)``: ``(dims, new_perm)``,
    or None when a merged group of axes is not consecutive and in order in ``x``."""
    groups = _groups(in_dims, out_dims)
    if groups is None:
        return None
    starts = []
    for ins, _ in groups:
        first = perm[ins[0]]
        if [perm[k] for k in ins] != list(range(first, first + len(ins))):
            return None
        starts.append(first)
    order = sorted(range(len(groups)), key=starts.__getitem__)  # the groups in x's order
    dims, offset = [], {}
    for k in order:
        offset[k] = len(dims)
        dims += [out_dims[j] for j in groups[k][1]]
    new_perm = [offset[k] + n for k, (_, outs) in enumerate(groups) for n in range(len(outs))]
    return dims, new_perm


@dataclass
class _Region:
    """The nodes between a transpose and the gathers that end it, and each value's perm over its source."""
    perms: dict[ir.Value, list[int]]
    nodes: list[ir.Node] = field(default_factory=list)
    gathers: list[tuple[ir.Node, np.ndarray, int]] = field(default_factory=list)
    reshapes: dict[ir.Node, list[Dim]] = field(default_factory=dict)


def _collect(transpose: ir.Node, carried: tuple[str, ...]) -> Optional[_Region]:
    """Every node reached from ``transpose`` through ``carried`` nodes, ending in constant-index gathers;
    None when a value of the region is used by anything else or is a graph output."""
    out = transpose.outputs[0]
    region = _Region(perms={out: _perm(transpose, len(transpose.inputs[0].shape))})
    frontier, seen = [out], set()
    while frontier:
        value = frontier.pop()
        uses = list(value.uses())
        if value.is_graph_output() or value.shape is None or not uses:
            return None
        for use in uses:
            node = use.node
            if node.op_type == "Gather":
                taken = _gather(use, len(value.shape))
                if taken is None:
                    return None
                region.gathers.append(taken)
            elif node.op_type not in carried or node.domain != "" or (node.op_type != "Concat" and use.idx != 0):
                return None
            elif node not in seen:
                seen.add(node)
                region.nodes.append(node)
                frontier.append(node.outputs[0])
    return region


def _plan(graph_order: dict[ir.Node, int], region: _Region) -> bool:
    """Each region value's perm, the region's nodes in graph order; False when one cannot be carried."""
    region.nodes.sort(key=graph_order.__getitem__)
    for node in region.nodes:
        perm = region.perms.get(node.inputs[0])
        if perm is None:
            return False
        if node.op_type == "Concat":
            if any(region.perms.get(v) != perm for v in node.inputs):
                return False
        elif node.op_type == "Slice":
            if _slice_axes(node, len(perm)) is None:
                return False
        else:
            in_dims, out_dims = value_dims(node.inputs[0]), value_dims(node.outputs[0])
            if in_dims is None or out_dims is None or _constant(node.inputs[1]) is None:
                return False
            below = _reshape_below(in_dims, perm, out_dims)
            if below is None:
                return False
            region.reshapes[node], perm = below
        region.perms[node.outputs[0]] = perm
    return True


def _worth_it(region: _Region) -> bool:
    """Whether at most one slice keeps a transpose that no following ``Transpose`` composes with."""
    left = 0
    for gather, indices, axis in region.gathers:
        slice_perm = _slice_perm(region.perms[gather.inputs[0]], axis, indices.ndim == 0)
        if slice_perm == sorted(slice_perm):
            continue
        uses = list(gather.outputs[0].uses())
        followed = (len(uses) == 1 and uses[0].node.op_type == "Transpose" and uses[0].node.domain == ""
                    and not gather.outputs[0].is_graph_output())
        left += not followed
    return left <= 1


def _carried(graph: ir.Graph, node: ir.Node, inputs: list[ir.Value], perm: list[int], region: _Region) -> ir.Value:
    """``node`` (a Slice, Concat or Reshape of the transposed values) on the values before the transpose."""
    name, rank = f"{node.name}/before_transpose", len(perm)
    if node.op_type == "Slice":
        axes = [perm[a] for a in _slice_axes(node, rank)]
        args = [inputs[0], node.inputs[1], node.inputs[2], int64_initializer(graph, f"{name}/axes", axes)]
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            args.append(node.inputs[4])
        early = ir.node("Slice", args, name=name)
    elif node.op_type == "Concat":
        axis = node.attributes.get_int("axis")
        early = ir.node("Concat", inputs, attributes={"axis": perm[axis + rank if axis < 0 else axis]}, name=name)
    else:
        dims = region.reshapes[node]
        early = ir.node("Reshape", [inputs[0], shape_initializer(graph, f"{name}/shape", dims)], name=name)
    out_perm = region.perms[node.outputs[0]]
    dims = [None] * len(out_perm)
    for axis, dim in enumerate(node.outputs[0].shape):
        dims[out_perm[axis]] = dim
    early.outputs[0].shape, early.outputs[0].dtype = ir.Shape(dims), inputs[0].dtype
    graph.insert_before(node, [early])
    return early.outputs[0]


def _gather_early(graph: ir.Graph, gather: ir.Node, indices: np.ndarray, axis: int, source: ir.Value,
                  perm: list[int]) -> None:
    """``gather`` (of ``Transpose(source, perm)``) replaced by the gather on ``source`` and the slice's transpose."""
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


def _rewrite(graph: ir.Graph, transpose: ir.Node, region: _Region) -> None:
    before = {transpose.outputs[0]: transpose.inputs[0]}  # region value -> the same before the transpose
    for node in region.nodes:
        early = _carried(graph, node, [before[v] for v in node.inputs if v in region.perms],
                         region.perms[node.inputs[0]], region)
        before[node.outputs[0]] = early
    for gather, indices, axis in region.gathers:
        value = gather.inputs[0]
        _gather_early(graph, gather, indices, axis, before[value], region.perms[value])
    for node in reversed(region.nodes):
        graph.remove(node, safe=True)
    graph.remove(transpose, safe=True)


def gather_before_transpose(graph: ir.Graph, carry: bool = False) -> int:
    """Each ``Transpose`` whose uses are constant-index ``Gather``s (with ``carry``: also through :data:`CARRIED`
    nodes), and worth it (see the module docstring), moved below them; returns how many transposes went so."""
    rewritten, order = 0, {}
    for transpose in list(graph):
        if transpose.op_type != "Transpose" or transpose.domain != "" or transpose.inputs[0] is None:
            continue
        if transpose.inputs[0].shape is None:
            continue
        region = _collect(transpose, CARRIED if carry else ())
        if region is not None and any(node not in order for node in region.nodes):
            order = {node: k for k, node in enumerate(graph)}  # (again after a rewrite added nodes)
        if region is None or not region.gathers or not _plan(order, region) or not _worth_it(region):
            continue
        _rewrite(graph, transpose, region)
        rewritten += 1
    return rewritten
