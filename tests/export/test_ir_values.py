"""export/ir_values.py: the IR helpers the graph passes share."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from export.ir_values import constant_array, int64_initializer, only_use, value_dims


def test_value_dims_parse_static_and_batch_dims_and_refuse_unknown_ones():
    value = ir.Value(name="x", shape=ir.Shape([3, "16*s77", 64]))
    assert value_dims(value) == [(3, None), (16, "s77"), (64, None)]
    assert value_dims(ir.Value(name="y", shape=ir.Shape([3, None]))) is None
    assert value_dims(ir.Value(name="z")) is None and value_dims(None) is None


def test_int64_initializer_is_a_registered_constant_with_its_shape():
    graph = ir.Graph([], [], nodes=[], name="g")
    value = int64_initializer(graph, "axes", [2, -1])
    assert graph.initializers["axes"] is value
    np.testing.assert_array_equal(constant_array(value), np.array([2, -1], np.int64))
    assert value.dtype == ir.DataType.INT64 and list(value.shape) == [2]
    assert constant_array(ir.Value(name="plain")) is None and constant_array(None) is None


def test_only_use_counts_uses_and_graph_outputs():
    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.node("Relu", [x])
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[relu], name="g")
    assert only_use(x)
    assert not only_use(relu.outputs[0])  # a graph output
    graph.append(ir.node("Neg", [x]))
    assert not only_use(x)
