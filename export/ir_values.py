"""Small helpers on ONNX IR values that the graph passes share (constants, uses, parsed shapes)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from .movement_chains import Dim, parse_dim


def constant_array(value: Optional[ir.Value]) -> Optional[np.ndarray]:
    """``value``'s constant as an array; None when it has none."""
    return None if value is None or value.const_value is None else value.const_value.numpy()


def int64_initializer(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    """A 1-D int64 initializer of ``graph`` (shapes, axes, indices of the passes' new nodes)."""
    array = np.array(values, dtype=np.int64)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.INT64
    graph.register_initializer(value)
    return value


def shape_initializer(graph: ir.Graph, name: str, dims: list[Dim]) -> ir.Value:
    """An int64 initializer for a Reshape to ``dims`` (the one symbolic dimension, the batch, as -1)."""
    return int64_initializer(graph, name, [-1 if symbol is not None else size for size, symbol in dims])


def only_use(value: ir.Value) -> bool:
    """Whether ``value`` feeds exactly one node and is no graph output."""
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def value_dims(value: Optional[ir.Value]) -> Optional[list[Dim]]:
    """The parsed dims of ``value``'s shape (:func:`export.movement_chains.parse_dim`); None when any is unknown."""
    if value is None or value.shape is None:
        return None
    dims = [parse_dim(d if isinstance(d, int) else d.value) for d in value.shape]
    return None if any(d is None for d in dims) else dims
