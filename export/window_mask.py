"""The shifted-window mask added in the attention's own rank: a CPU graph pass that lets OpenVINO fuse
the masked window attentions.

Swin-style models (SwinIR, DAT, HAT, ...) add the shifted-window mask to the attention logits through a
5-D view: ``attn`` is ``[B * nW, heads, N, N]``, the model computes ``attn.view(B, nW, heads, N, N) +
mask[None, :, None]`` and views the sum back. The export keeps that as ``Reshape (5-D) -> Add(mask) ->
Reshape (4-D)`` between the ``q @ k^T`` product and the softmax. OpenVINO's CPU plugin fuses
``MatMul -> element-wise -> Softmax -> MatMul`` chains of rank 3 or 4 into one attention kernel (its
"MHA snippets"), but not through the 5-D view: on DAT-light x4 the unshifted window attentions are fused
and the shifted ones are not (``benchmarks/cpu_speed.md``).

:func:`flat_window_mask` replaces the view pair by one ``Add`` of the mask tiled over the batch in the
attention's own layout: ``Add(attn, Tile(mask[nW, 1, N, N], [B, 1, 1, 1]))`` with ``B`` the batch read from
``attn``'s shape (``Shape -> Slice -> Div``), so the graph keeps a dynamic batch. Row ``b * nW + w`` of the
tiled mask is window ``w``'s mask, the element the 5-D broadcast added there: the same float additions on the
same operands, bit-identical. A runtime that compiles a static batch (OpenVINO, TensorRT) folds the tiling
into a constant; ONNX Runtime tiles it once per call (``[B * nW, 1, N, N]``).

Only the view pair the models write is matched: the first ``Reshape`` splits the leading axis of ``attn`` in
two (its other axes unchanged), the mask constant is 1 along the batch axis, and the second ``Reshape``
gives back ``attn``'s shape; anything else is left alone. No quantizer is touched.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from .ir_values import constant_array as _constant, int64_initializer as _int64, only_use


def _static_tail(value: ir.Value) -> Optional[list[int]]:
    """``value``'s dims after the first, when all of them are known integers."""
    if value.shape is None or len(value.shape) < 2:
        return None
    tail = list(value.shape)[1:]
    return [int(d) for d in tail] if all(isinstance(d, int) for d in tail) else None


def _match(split: ir.Node) -> Optional[tuple[ir.Value, ir.Value, np.ndarray, ir.Node, ir.Node]]:
    """``(attn, mask value, mask array, add, merge)`` when ``split`` is the 5-D view of a window-mask
    addition, else None."""
    if split.op_type != "Reshape" or split.domain != "" or len(split.inputs) != 2 or split.inputs[0] is None:
        return None
    attn, target = split.inputs
    split_shape, tail = _constant(target), _static_tail(attn)
    if split_shape is None or tail is None or list(split_shape[2:]) != tail:
        return None
    if split_shape[1] < 1 or not (split_shape[0] == -1 or split_shape[0] > 0) or not only_use(split.outputs[0]):
        return None
    windows = int(split_shape[1])
    add = next(iter(split.outputs[0].uses())).node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is split.outputs[0] else add.inputs[0]
    mask = _constant(other)
    if mask is None or mask.dtype.kind != "f" or mask.ndim != len(split_shape) or mask.shape[0] != 1:
        return None
    if mask.shape[1] not in (1, windows) or any(m not in (1, t) for m, t in zip(mask.shape[2:], tail)):
        return None
    if not only_use(add.outputs[0]):
        return None
    merge = next(iter(add.outputs[0].uses())).node
    if merge.op_type != "Reshape" or merge.domain != "" or len(merge.inputs) != 2:
        return None
    merge_shape = _constant(merge.inputs[1])
    rows = split_shape[0] * windows if split_shape[0] > 0 else -1
    if merge_shape is None or list(merge_shape[1:]) != tail or merge_shape[0] not in (-1, rows):
        return None
    if merge.outputs[0].is_graph_output():
        return None
    return attn, other, mask, add, merge


def _tiled(graph: ir.Graph, attn: ir.Value, mask: ir.Value, windows: int, base: str, before: ir.Node) -> ir.Value:
    """``Tile(mask, [rows(attn) / windows, 1, ...])``, its nodes inserted before ``before``."""
    shape = ir.node("Shape", [attn], name=f"{base}/Shape")
    rows = ir.node("Slice", [shape.outputs[0], _int64(graph, f"{base}/zero", [0]), _int64(graph, f"{base}/one", [1])],
                   name=f"{base}/Slice")
    batch = ir.node("Div", [rows.outputs[0], _int64(graph, f"{base}/windows", [windows])], name=f"{base}/Div")
    ones = _int64(graph, f"{base}/ones", [1] * (len(mask.shape) - 1))
    repeats = ir.node("Concat", [batch.outputs[0], ones], attributes={"axis": 0}, name=f"{base}/Concat")
    tile = ir.node("Tile", [mask, repeats.outputs[0]], name=f"{base}/Tile")
    graph.insert_before(before, [shape, rows, batch, repeats, tile])
    return tile.outputs[0]


def flat_window_mask(graph: ir.Graph) -> int:
    """Each ``Reshape (split batch and windows) -> Add(mask) -> Reshape (back)`` of ``graph`` as one ``Add`` of
    the mask tiled over the batch; returns how many were rewritten."""
    rewritten = 0
    for split in list(graph):
        found = _match(split)
        if found is None:
            continue
        attn, mask_in, mask, add, merge = found
        windows, base = mask.shape[1], f"{add.name}/flat_mask"
        flat = np.ascontiguousarray(mask.reshape(mask.shape[1:]))
        mask_value = ir.Value(name=f"{base}/mask", const_value=ir.tensor(flat, name=f"{base}/mask"))
        mask_value.shape, mask_value.dtype = ir.Shape(flat.shape), mask_in.dtype
        graph.register_initializer(mask_value)
        # one mask for every window: broadcasting alone adds it where the view did
        addend = mask_value if windows == 1 else _tiled(graph, attn, mask_value, windows, base, add)
        flat_add = ir.node("Add", [attn, addend], name=f"{base}/Add")
        graph.insert_before(add, flat_add)
        result, name = flat_add.outputs[0], merge.outputs[0].name
        if merge.outputs[0].type is not None:
            result.type, result.shape = merge.outputs[0].type, merge.outputs[0].shape
        merge.outputs[0].replace_all_uses_with(result)
        graph.remove([merge, add, split], safe=True)
        result.name = name  # the logits keep their name
        rewritten += 1
    return rewritten
