"""Quantize before the data movement: a CPU graph pass that moves tensors as 8-bit codes, not floats.

In a 2dq QDQ export an activation quantizer often sits after a chain of pure data movement: DAT's
window partition and head split of q, k and v is ``Gather -> Reshape -> Transpose (6-D) -> Reshape ->
[Mul by the attention scale] -> Clip -> QuantizeLinear -> DequantizeLinear -> MatMul``. The transpose
then moves float32 values that are quantized right after. :func:`quantize_before_movement` reorders
such a chain to ``[Mul] -> Clip -> QuantizeLinear -> Reshape -> Transpose -> Reshape ->
DequantizeLinear``: the same element-wise work on the same values (in the input's layout), then the
movement of one-byte codes (a quarter of the bytes; OpenVINO's CPU plugin and ONNX Runtime both
transpose int8 / uint8 tensors natively).

Exact, bit for bit: the element-wise nodes moved are those whose other operands are constants of one
element (``Clip`` bounds, a ``Mul`` / ``Div`` / ``Add`` / ``Sub`` by a scalar), which commute with any
movement of elements, and the quantizer moved must be per-tensor (one scale, one zero point) with
8-bit codes. Nothing is computed differently, only in another order of elements, so the codes
are the ones the unmoved graph makes; the codes tensor keeps its name and shape at the end of the
chain (a per-quantizer code comparison finds it where it was).

Left where they are: a transposed second factor of a product (one transpose of the last two axes
into a ``MatMul``'s second input, DAT's channel-attention ``k^T``), which runtimes fold into their
int8 product; with codes moved in between, OpenVINO ran those products in float.

The result is for CPU runtimes only: a ``QuantizeLinear`` no longer feeds its ``DequantizeLinear``
directly, which TensorRT's QDQ rules (``export.lint``'s ``qdq-pair``) refuse, and ONNX Runtime's QDQ
fusions do not follow it (its x86 int8 -> uint8 conversion of Q/DQ pairs skips the moved pairs, and the
products they feed fall back to float, a few float roundings away from its int8 kernels). OpenVINO's
engine of the rewritten graph is bit-identical to the unrewritten one's (``tests/export/
test_quantize_early.py``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np  # noqa: F401  (the doctests use it)
import onnx_ir as ir

from .ir_values import only_use

#: pure data movement (what :mod:`export.movement_chains` composes; :mod:`export.speed_passes` uses it too)
MOVEMENT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
#: element-wise ops that commute with movement when every other operand is a one-element constant
SCALAR_OPS = ("Clip", "Mul", "Div", "Add", "Sub")
CODE_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)


def _one_element(value: Optional[ir.Value]) -> bool:
    return value is not None and value.const_value is not None and value.const_value.numpy().size == 1


def _scalar_input(node: ir.Node) -> Optional[int]:
    """The index of the data input of an element-wise ``node`` whose other operands are one-element
    constants; None for any other node."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in SCALAR_OPS:
        return None
    inputs = list(node.inputs)
    if node.op_type == "Clip":
        return 0 if all(v is None or _one_element(v) for v in inputs[1:]) else None
    if len(inputs) != 2:
        return None
    if _one_element(inputs[1]) and not _one_element(inputs[0]):
        return 0
    if node.op_type in ("Mul", "Add") and _one_element(inputs[0]) and not _one_element(inputs[1]):
        return 1
    return None


def _code_type(quantize: ir.Node) -> Optional[ir.DataType]:
    """The element type of a ``QuantizeLinear``'s codes: its output's, else its zero point's, else
    ``output_dtype``'s (ONNX's default: uint8)."""
    if quantize.outputs[0].dtype is not None:
        return quantize.outputs[0].dtype
    zero_point = quantize.inputs[2] if len(quantize.inputs) > 2 else None
    if zero_point is not None and zero_point.const_value is not None:
        return zero_point.const_value.dtype
    attribute = quantize.attributes.get("output_dtype")
    return ir.DataType(attribute.as_int()) if attribute is not None and attribute.as_int() else ir.DataType.UINT8


def _per_tensor_code_quantizer(node: ir.Node) -> bool:
    if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    if not all(_one_element(v) for v in node.inputs[1:] if v is not None):
        return False
    return _code_type(node) in CODE_TYPES and not node.outputs[0].is_graph_output()


def _folded_into_product(quantize: ir.Node, movement: list[ir.Node]) -> bool:
    """Whether ``movement`` is one transpose of the last two axes and the codes reach, through their
    ``DequantizeLinear``, the second input of a ``MatMul``: a transposed second factor, which runtimes
    fold into their int8 product (``k^T`` of DAT's channel attention) and codes moved in between would
    hide (OpenVINO then runs that product in float)."""
    if len(movement) != 1 or movement[0].op_type != "Transpose" or "perm" not in movement[0].attributes:
        return False
    perm = list(movement[0].attributes["perm"].as_ints())
    if perm != [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]:
        return False
    for use in quantize.outputs[0].uses():
        if use.node.op_type == "DequantizeLinear" and any(
                u.node.op_type == "MatMul" and u.idx == 1 for u in use.node.outputs[0].uses()):
            return True
    return False


def _chain_above(quantize: ir.Node) -> tuple[list[ir.Node], list[ir.Node]]:
    """The element-wise scalar nodes and the movement nodes (each top to bottom) between ``quantize``
    and the first node above it that is neither, through values used only by the chain."""
    scalar, movement = [], []
    value = quantize.inputs[0]
    while value is not None and value.producer() is not None and only_use(value):
        node = value.producer()
        if node.op_type in MOVEMENT_OPS and node.domain in ("", "ai.onnx"):
            movement.insert(0, node)
        elif _scalar_input(node) is not None:
            scalar.insert(0, node)
        else:
            break
        value = node.inputs[_scalar_input(node) or 0]
    return scalar, movement


def quantize_before_movement(graph: ir.Graph) -> int:
    """Move per-tensor 8-bit quantizers (and the scalar element-wise nodes before them) above the
    data movement that feeds them, where it holds a ``Transpose``; returns how many quantizers moved.

    >>> import numpy as np, onnx_ir as ir
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> consts = [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.05, "s"), (-1.0, "lo"),
    ...           (1.0, "hi"))] + [numpy_helper.from_array(np.array(0, np.int8), "z")]
    >>> nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
    ...          helper.make_node("Clip", ["t", "lo", "hi"], ["c"]),
    ...          helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
    ...          helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    >>> graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])], consts)
    >>> model = ir.serde.deserialize_model(helper.make_model(graph))
    >>> quantize_before_movement(model.graph)
    1
    >>> [(n.op_type, n.outputs[0].name, str(n.outputs[0].dtype)) for n in model.graph][:3]
    [('Clip', 'c', 'None'), ('QuantizeLinear', 'q/before_movement', 'INT8'), ('Transpose', 'q', 'INT8')]
    """
    moved = 0
    for quantize in list(graph):
        if not _per_tensor_code_quantizer(quantize):
            continue
        scalar, movement = _chain_above(quantize)
        if not any(node.op_type == "Transpose" for node in movement) or _folded_into_product(quantize, movement):
            continue
        top = movement[0].inputs[0]
        codes, code_type = quantize.outputs[0], _code_type(quantize)
        # element-wise nodes (original order) read the movement's input: same values, input's layout
        current = top
        for node in scalar:
            node.replace_input_with(_scalar_input(node), current)
            node.outputs[0].shape = top.shape
            current = node.outputs[0]
        quantize.replace_input_with(0, current)
        # the movement's output takes the codes' place (and their name); the codes move before it
        last = movement[-1].outputs[0]
        codes.replace_all_uses_with(last)
        name = codes.name
        codes.name, codes.shape, codes.dtype = f"{name}/before_movement", top.shape, code_type
        movement[0].replace_input_with(0, codes)
        for above, node in zip(movement, movement[1:]):  # consecutive again where scalar nodes sat between
            node.replace_input_with(0, above.outputs[0])
        for node in movement:
            node.outputs[0].dtype = code_type
        last.name = name
        for node in (*scalar, quantize):  # keep the list topologically ordered: chain above, then movement
            graph.remove(node)
            graph.insert_before(movement[0], node)
        moved += 1
    return moved

