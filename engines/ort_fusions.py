"""Graph fusions ONNX Runtime leaves undone in a QDQ model, applied to the saved engine.

ORT turns each ``DequantizeLinear -> MatMul`` node unit whose output stays float into
``com.microsoft:MatMulIntegerToFloat`` but keeps the linear layer's bias as a separate broadcast
``Add``. The kernel has an optional ``bias`` input (its 7th: a 1-D float tensor the size of B's last
dimension, added to the float result in the same pass), so :func:`fuse_matmul_bias` moves the bias
there and drops the ``Add``: one pass over the layer's output less, and on SwinIR-light those adds
(``qkv``, ``proj``, ``fc2`` of every block) are among the slowest elementwise nodes of the engine
because a ``[N]`` vector broadcast over ``[..., N]`` is slower per element in ORT than a plain add.
The arithmetic is the same: ``float(A_int @ B_int) * scale + bias``.
"""
from __future__ import annotations

import collections
import logging

import onnx

log = logging.getLogger(__name__)

MATMUL = "MatMulIntegerToFloat"
MS_DOMAIN = "com.microsoft"
BIAS_INPUT = 6  # A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias


def fuse_matmul_bias(model: onnx.ModelProto) -> int:
    """Fold ``Add(MatMulIntegerToFloat(...), bias)`` into the MatMul's bias input, in place.

    Only where it is exactly that: the MatMul has no bias yet, its output feeds this one ``Add`` and
    is not a graph output, B is a 2-D initializer ``(K, N)`` and the other ``Add`` operand is a 1-D
    float32 initializer of length ``N``. Returns the number of adds removed.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    removed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != MATMUL or node.domain != MS_DOMAIN or len(node.input) > BIAS_INPUT:
            continue
        (out,) = node.output
        users = consumers.get(out, [])
        if out in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            continue
        add = users[0]
        bias_name = add.input[1] if add.input[0] == out else add.input[0]
        weight = initializers.get(node.input[1])
        bias = initializers.get(bias_name)
        if weight is None or bias is None or len(weight.dims) != 2 or bias.data_type != onnx.TensorProto.FLOAT:
            continue
        if list(bias.dims) != [weight.dims[1]] or add.input[0] == add.input[1]:
            continue
        inputs = list(node.input) + [""] * (BIAS_INPUT - len(node.input)) + [bias_name]
        del node.input[:]
        node.input.extend(inputs)
        node.output[0] = add.output[0]
        removed.append(add)
    for add in removed:
        graph.node.remove(add)
    if removed:
        log.info("fused %d bias adds into %s", len(removed), MATMUL)
    return len(removed)
