"""TensorRT-rules lint of a QDQ ONNX graph: what TensorRT's explicit quantization accepts.

Each rule returns :class:`Violation` entries naming the node, the rule and what is wrong:

- ``opset``: default-domain opset in [13, 25] (per-channel Q/DQ needs 13; TensorRT 11's parser reads
  up to 25); int4 tensors or blocked Q/DQ need 21.
- ``qdq-params``: scales and zero points are constants (initializers or ``Constant`` outputs).
- ``zero-point``: every zero point is 0 (TensorRT's quantization is symmetric).
- ``quant-type``: quantized tensors are int8 (a ``QuantizeLinear`` needs its int8 zero point: without
  one it produces uint8). int4 only as weight-only: a ``DequantizeLinear`` of an initializer, with
  block quantization (``block_size`` 64 or 128), in a ``trt-int4`` graph.
- ``activation-per-tensor``: Q/DQ of activations (non-constant tensors) have a scalar scale.
- ``weight-axis``: a weight ``DequantizeLinear`` feeds a linear op (MatMul/Gemm/Conv/ConvTranspose)
  directly, as its weight input; per-channel scales run along the output-channel axis of the
  layout TensorRT expects (``MatMul`` B ``(K, N)``: axis 1; ``Gemm`` B: 0 with ``transB=1``, else 1;
  ``Conv`` ``(C_out, C_in, ...)``: 0; ``ConvTranspose`` ``(C_in, C_out, ...)``: 1) with one scale per
  channel; blocked (int4) scales run along the reduction axis (``MatMul`` B axis 0) whose size the
  block divides.
- ``qdq-pair``: every ``QuantizeLinear`` feeds only ``DequantizeLinear`` nodes with the same scale and
  zero point; an activation ``DequantizeLinear`` reads a ``QuantizeLinear``.
- ``matmul-both-inputs``: a MatMul/Gemm/Conv with a ``DequantizeLinear`` on one data input has one on
  the other too (both attention matmuls included); the only exception is weight-only int4 (an
  int4 weight on B, a float activation on A).
- ``layernorm-qdq``: no Q/DQ directly on a LayerNormalization: no input of it comes from a
  ``DequantizeLinear`` (normalization runs in float; TensorRT keeps it out of INT8), and its output
  does not feed a ``QuantizeLinear`` directly (our graphs clip first: ``LN -> Clip -> Q``).
- ``topk-k`` (TensorRT targets): a ``TopK`` with a constant ``k`` takes at most 3840 elements, TensorRT's limit
  (ATD's stable sort of a tile's tokens is a ``TopK`` over all of them: at most 3840 tokens per tile).

The target (``trt-int4`` allows int4) is read from the export's metadata (:mod:`export.metadata`)
unless given; the metadata's opset and int4 block must be the graph's (``opset`` / ``quant-type``).

Command line: ``2dq-export --lint-only FILE.onnx [--target T] [--json OUT]`` (exit 1 when violations are found).

A graph from ``2dq-export`` lints clean (the export runs this lint itself). A Q/DQ pair with zero
point 3 does not:

>>> from onnx import helper
>>> def qdq_model(zero_point):
...     nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["x_q"], name="q"),
...              helper.make_node("DequantizeLinear", ["x_q", "scale", "zero"], ["y"], name="dq")]
...     constants = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
...                  helper.make_tensor("zero", TensorProto.INT8, [], [zero_point])]
...     graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
...                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], constants)
...     return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
>>> for violation in lint_model(qdq_model(3)):
...     print(violation)
[zero-point] q: zero point 'zero' is not 0 (values [3])
[zero-point] dq: zero point 'zero' is not 0 (values [3])
>>> lint_model(qdq_model(0))
[]
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from .metadata import ExportMetadata, key

MIN_OPSET, MAX_OPSET, MIN_OPSET_INT4 = 13, 25, 21
INT4_BLOCKS = (64, 128)
LINEAR_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
RULES = ("opset", "qdq-params", "zero-point", "quant-type", "activation-per-tensor", "weight-axis", "qdq-pair",
         "matmul-both-inputs", "layernorm-qdq", "topk-k")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node's name (or ``<model>``), the rule id (:data:`RULES`), what is wrong."""

    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


class _Graph:
    """Index of a graph: producers, consumers, constants, tensor element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, index))
        self.initializers = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.initializers[node.output[0]] = attr.t
        self.elem_type = {v.name: v.type.tensor_type.elem_type
                          for v in [*graph.input, *graph.output, *graph.value_info]}
        for name, tensor in self.initializers.items():
            self.elem_type[name] = tensor.data_type

    def const(self, name: str) -> Optional[np.ndarray]:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def dims(self, name: str) -> Optional[tuple[int, ...]]:
        tensor = self.initializers.get(name)
        return None if tensor is None else tuple(tensor.dims)


def lint_model(model_or_path: onnx.ModelProto | str | os.PathLike, target: Optional[str] = None) -> list[Violation]:
    """Every TensorRT-rule violation of a QDQ graph (file or proto), in node order.

    Raises:
        ValueError: a file that is not a readable ONNX model (the file named).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        try:
            model = onnx.load(str(model_or_path))
        except DecodeError as err:
            raise ValueError(f"{model_or_path}: not an ONNX model ({err})") from err
    where = "model" if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    # a graph with no 2dq metadata is linted as trt-int8; a partial record is refused (ValueError)
    meta = ExportMetadata.find({p.key: p.value for p in model.metadata_props}, where)
    if target is None:
        target = meta.target if meta is not None else "trt-int8"
    g = _Graph(model)
    found = _check_opset(model, g) + _check_metadata(model, g, meta)
    for node in g.nodes:
        if node.op_type in _QDQ and node.domain in ("", "ai.onnx"):
            found += _check_qdq(node, g, target)
        elif node.op_type in LINEAR_OPS:
            found += _check_linear(node, g)
        elif node.op_type == "LayerNormalization":
            found += _check_layernorm(node, g)
        elif node.op_type == "TopK" and target.startswith("trt"):
            found += _check_topk(node, g)
    return found


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0]}>"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _check_opset(model: onnx.ModelProto, g: _Graph) -> list[Violation]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    found = []
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        found.append(Violation("<model>", "opset", f"default-domain opset {opset} is outside [{MIN_OPSET}, {MAX_OPSET}]"))
    uses_int4 = any(t in (TensorProto.INT4, TensorProto.UINT4) for t in g.elem_type.values()) or any(
        _attr(n, "block_size", 0) for n in g.nodes if n.op_type in _QDQ)
    if uses_int4 and opset is not None and opset < MIN_OPSET_INT4:
        found.append(Violation("<model>", "opset", f"int4 / blocked Q/DQ need opset >= {MIN_OPSET_INT4}, got {opset}"))
    return found


def _check_metadata(model: onnx.ModelProto, g: _Graph, meta: Optional[ExportMetadata]) -> list[Violation]:
    """The export's own record against its graph: the opset it names, the int4 block of its weights."""
    if meta is None:
        return []
    found = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != meta.opset:
        found.append(Violation("<model>", "opset", f"metadata {key('opset')}={meta.opset} but the graph imports "
                               f"opset {opset}"))
    for node in g.nodes:
        block = _attr(node, "block_size", 0) if node.op_type in _QDQ else 0
        if block and block != meta.int4_block:
            found.append(Violation(_name(node), "quant-type", f"block_size {block} but metadata "
                                   f"{key('int4_block')}={meta.int4_block}"))
    return found


def _check_qdq(node: onnx.NodeProto, g: _Graph, target: str) -> list[Violation]:
    name, found = _name(node), []
    x, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    zero_point = node.input[2] if len(node.input) > 2 else ""
    for label, tensor in (("scale", scale), ("zero point", zero_point)):
        if tensor and not g.is_const(tensor):
            found.append(Violation(name, "qdq-params", f"{label} {tensor!r} is not a constant"))
    if zero_point and g.is_const(zero_point):
        values = g.const(zero_point)
        if np.any(values.astype(np.int64) != 0):
            found.append(Violation(name, "zero-point", f"zero point {zero_point!r} is not 0 (values {np.unique(values)[:4]})"))
    is_weight = node.op_type == "DequantizeLinear" and g.is_const(x)
    quant_type = (g.elem_type.get(zero_point) if zero_point else
                  (g.elem_type.get(x) if node.op_type == "DequantizeLinear" else TensorProto.UINT8))
    block = _attr(node, "block_size", 0)
    if quant_type == TensorProto.INT4:
        if not (is_weight and block in INT4_BLOCKS and target == "trt-int4"):
            found.append(Violation(name, "quant-type", "int4 is allowed only as a weight-only DequantizeLinear of an "
                                   f"initializer with block_size in {INT4_BLOCKS} in a trt-int4 graph "
                                   f"(weight={is_weight}, block_size={block}, target={target})"))
    elif quant_type != TensorProto.INT8:
        type_name = TensorProto.DataType.Name(quant_type) if quant_type else "unknown"
        hint = " (a QuantizeLinear without zero point outputs uint8)" if not zero_point else ""
        found.append(Violation(name, "quant-type", f"quantized type {type_name} is not int8{hint}"))
    elif block:
        found.append(Violation(name, "quant-type", "block quantization is allowed only for int4 weights"))
    scale_dims = g.dims(scale) if scale else None
    if not is_weight and not (node.op_type == "QuantizeLinear" and g.is_const(x)):
        if scale_dims is not None and int(np.prod(scale_dims)) != 1:
            found.append(Violation(name, "activation-per-tensor", f"activation scale has shape {list(scale_dims)}, "
                                   "expected a scalar"))
    if is_weight:
        found += _check_weight_axis(node, g, scale_dims)
    found += _check_pair(node, g)
    return found


def _check_pair(node: onnx.NodeProto, g: _Graph) -> list[Violation]:
    name, found = _name(node), []
    if node.op_type == "QuantizeLinear":
        for consumer, _ in g.consumers.get(node.output[0], []):
            if consumer.op_type != "DequantizeLinear":
                found.append(Violation(name, "qdq-pair", f"feeds {consumer.op_type} {_name(consumer)}, "
                                       "expected only DequantizeLinear"))
            elif not _same_params(node, consumer, g):
                found.append(Violation(name, "qdq-pair", f"{_name(consumer)} dequantizes with another scale or "
                                       "zero point"))
    elif not g.is_const(node.input[0]):
        producer = g.producer.get(node.input[0])
        if producer is None or producer.op_type != "QuantizeLinear":
            source = "a graph input" if producer is None else f"{producer.op_type} {_name(producer)}"
            found.append(Violation(name, "qdq-pair", f"reads {source}, expected a QuantizeLinear"))
    return found


def _same_params(q: onnx.NodeProto, dq: onnx.NodeProto, g: _Graph) -> bool:
    for index in (1, 2):
        a = q.input[index] if len(q.input) > index else ""
        b = dq.input[index] if len(dq.input) > index else ""
        if a == b:
            continue
        va, vb = (g.const(a) if a else None), (g.const(b) if b else None)
        if va is None or vb is None or va.shape != vb.shape or va.dtype != vb.dtype or not np.array_equal(va, vb):
            return False
    return _attr(q, "axis", 1) == _attr(dq, "axis", 1) or (g.dims(q.input[1]) or ()) in ((), (1,))


def _expected_axis(consumer: onnx.NodeProto, index: int, rank: int) -> Optional[int]:
    """Output-channel axis of a weight that feeds ``consumer`` as input ``index``; None if not a weight input."""
    if index != 1:
        return None
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    return None


def _check_weight_axis(node: onnx.NodeProto, g: _Graph, scale_dims: Optional[tuple[int, ...]]) -> list[Violation]:
    name, found = _name(node), []
    weight_dims = g.dims(node.input[0]) or ()
    rank = len(weight_dims)
    consumers = g.consumers.get(node.output[0], [])
    if not consumers:
        return found
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    block = _attr(node, "block_size", 0)
    for consumer, index in consumers:
        expected = _expected_axis(consumer, index, rank) if consumer.op_type in LINEAR_OPS else None
        if expected is None:
            found.append(Violation(name, "weight-axis", f"weight DequantizeLinear feeds {consumer.op_type} "
                                   f"{_name(consumer)} (input {index}); it must feed a {'/'.join(LINEAR_OPS)} "
                                   "weight input directly"))
            continue
        if scale_dims is None or (int(np.prod(scale_dims)) == 1 and not block):
            continue  # per tensor
        if block:
            reduction = 0 if consumer.op_type == "MatMul" and rank == 2 else None
            if reduction is None or axis != reduction:
                found.append(Violation(name, "weight-axis", f"blocked scale along axis {axis}; int4 blocks must run "
                                       "along the reduction axis 0 of a 2-D MatMul weight"))
            elif weight_dims[0] % block or tuple(scale_dims) != (weight_dims[0] // block, weight_dims[1]):
                found.append(Violation(name, "weight-axis", f"weight {list(weight_dims)} with block {block} needs a "
                                       f"padded reduction axis and scales {[weight_dims[0] // max(block, 1), weight_dims[1]]}"
                                       f", got scales {list(scale_dims)}"))
            continue
        if axis != expected:
            found.append(Violation(name, "weight-axis", f"per-channel axis {axis}, but {consumer.op_type} "
                                   f"{_name(consumer)} needs the output-channel axis {expected}"))
        elif len(scale_dims) != 1 or scale_dims[0] != weight_dims[expected]:
            found.append(Violation(name, "weight-axis", f"{list(scale_dims)} scales for {weight_dims[expected]} "
                                   f"output channels of weight {list(weight_dims)}"))
    return found


def _from_dq(name: str, g: _Graph) -> Optional[onnx.NodeProto]:
    producer = g.producer.get(name)
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _check_linear(node: onnx.NodeProto, g: _Graph) -> list[Violation]:
    inputs = list(node.input[:2])
    sources = [_from_dq(x, g) if x else None for x in inputs]
    quantized = [s is not None for s in sources]
    if not any(quantized) or all(quantized):
        return []
    b_source = sources[1] if len(sources) > 1 else None
    if b_source is not None and not quantized[0] and g.elem_type.get(b_source.input[0]) == TensorProto.INT4:
        return []  # weight-only int4: float activation times int4 weight
    missing = "A (input 0)" if not quantized[0] else "B (input 1)"
    return [Violation(_name(node), "matmul-both-inputs", f"{node.op_type} has Q/DQ on one input only; {missing} "
                      "is not dequantized")]


def _check_layernorm(node: onnx.NodeProto, g: _Graph) -> list[Violation]:
    found = []
    for x in node.input:
        if x and _from_dq(x, g) is not None:
            found.append(Violation(_name(node), "layernorm-qdq", f"input {x!r} comes from a DequantizeLinear; "
                                   "LayerNormalization must run on float data"))
    for consumer, _ in g.consumers.get(node.output[0], []):
        if consumer.op_type == "QuantizeLinear":
            found.append(Violation(_name(node), "layernorm-qdq", f"output feeds QuantizeLinear {_name(consumer)} "
                                   "directly"))
    return found


#: TensorRT's ``ITopKLayer``: ``k <= 3840``
TRT_MAX_TOPK = 3840


def _check_topk(node: onnx.NodeProto, g: _Graph) -> list[Violation]:
    k = g.const(node.input[1]) if len(node.input) > 1 else None
    if k is None or int(np.max(k)) <= TRT_MAX_TOPK:
        return []
    return [Violation(_name(node), "topk-k", f"k = {int(np.max(k))} exceeds TensorRT's TopK limit of {TRT_MAX_TOPK} "
                      "(a smaller tile, or --target ort)")]
