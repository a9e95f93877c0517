"""Optional graph passes for CPU speed, run on a finished 2dq QDQ export (issue 23, item 4).

Why: on DAT-light x4 the OpenVINO W8A8 engine spends about a quarter of a 64x64 tile in float 5-6-D
``Transpose`` nodes (window partition, head split) that its CPU plugin runs with a generic kernel,
and both runtimes run float element-wise work the QDQ graph inherits from the float model. Each pass
below removes some of that without touching a quantizer: Q/DQ nodes, their scales and the integer
weights are never changed, so the engine still computes the calibrated grid.

- ``compose_movements``: a chain of ``Transpose`` / reshape nodes (DAT: ``Transpose -> Reshape ->
  Transpose -> Reshape -> Transpose`` for every head split) becomes at most ``Reshape -> Transpose ->
  Reshape`` (:mod:`export.movement_chains`), used only where it has fewer transposes. Exact: elements
  are moved, never computed.
- ``reduce_transpose_rank``: the same rewrite also where the transpose count stays, when the
  transpose's rank drops (merged runs of axes, dropped size-1 axes). Exact.
- ``fold_constants``: nodes computed from constants only (DAT's position-bias MLP: the exporter's
  folder skips its LayerNormalization) are evaluated once with ONNX Runtime and stored as
  initializers; Q/DQ nodes are never folded. Exact in ORT (its own kernels, which its engine
  builder would fold with anyway); other runtimes get the value ORT computed.
- ``one_bias_add``: ``Add(Add(x, C1), C2)`` (also through a ``Reshape`` that keeps the axes ``C1``
  varies along, DAT's ``attn + bias`` then ``+ mask``) becomes one ``Add`` of ``C1 + C2``. Exact up to
  the order of one float addition (``(x + C1) + C2`` vs ``x + (C1 + C2)``; where the mask is 0 the
  sum is ``C1`` itself, where it is -100 softmax gives 0 either way).
- ``dedupe_quantize``: ``QuantizeLinear`` nodes with the same input, scale, zero point and attributes
  become one (its ``DequantizeLinear`` nodes stay one per consumer, as QDQ fusions expect). Exact.
- ``flat_window_mask`` (:mod:`export.window_mask`): the shifted-window mask added through a 5-D view
  (``Reshape -> Add(mask) -> Reshape``) becomes one ``Add`` of the mask tiled over the batch, so OpenVINO
  fuses the masked window attentions too. Bit-identical.
- ``gather_before_transpose`` (:mod:`export.gather_early`): ``Transpose -> Gather`` x 3 (the head split of
  a fused ``qkv``) as the gathers on the transpose's input, each followed by its slice's transpose, which
  ``compose_movements`` then merges with the transpose after it. Bit-identical.
- ``carry_transpose_to_gathers``: the same, also through the slices, rolls and views between a split and its
  gathers (DAT's spatial blocks), on movement chains composed first: no qkv split keeps a transpose.
  Bit-identical; not faster on OpenVINO (its reference ``Gather`` kernel on a middle axis costs what the
  transposes did: 1.83x vs 1.88x the best FP32 without it, ``benchmarks/cpu_speed.md``).
- ``quantize_before_movement`` (:mod:`export.quantize_early`): a per-tensor quantizer and the scalar
  element-wise nodes before it move above the data movement that feeds them, which then moves int8
  codes. Exact codes; for CPU runtimes only (:data:`CPU_ONLY_PASSES`): TensorRT's QDQ rules refuse it.
  OpenVINO's engine stays bit-identical but is not faster (its transpose kernel costs the same per
  element in int8); ONNX Runtime's QDQ fusions skip the moved pairs (not bit-identical).

:func:`apply_speed_passes` runs them on a ``ModelProto`` and keeps the ``2dq.*`` metadata, so the
result is still accepted by ``2dq-build-engine`` and its ``--verify``. Measured on DAT-light x4 W8A8 at
one thread (``benchmarks/cpu_speed.md``, graph levers): ``compose_movements`` makes the OpenVINO engine
1.3x and the ORT engine 1.13x faster, bit-identical, ``flat_window_mask`` the OpenVINO engine 1.09x more
(ORT: the same within noise) and ``gather_before_transpose`` 1.09-1.16x more on OpenVINO, 1.04-1.06x on ORT,
both bit-identical; the others gain nothing there (``one_bias_add`` grows the graph 2.5x), so
:data:`DEFAULT_PASSES` is ``flat_window_mask``, ``gather_before_transpose`` and ``compose_movements`` (and
``dedupe_quantize``, which finds nothing on our exports). The CPU engine builders (:func:`engines.ort_engine.build_ort_engine`,
:func:`engines.openvino_engine.build_openvino_engine`, ``2dq-build-engine --graph-passes``) run
:data:`DEFAULT_PASSES` on the graph they read; ``2dq-export``'s file, which TensorRT reads, is left as it is.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .graph_rewrite import FOLD_SIZE_LIMIT, QDQ_OPS
from .movement_chains import Dim, Step, format_dim, plan_movement, same_movement
from .gather_early import gather_before_transpose
from .ir_values import constant_array as _constant, only_use, shape_initializer, value_dims as _dims
from .quantize_early import MOVEMENT_OPS, quantize_before_movement
from .window_mask import flat_window_mask

log = logging.getLogger(__name__)


def _movement_chains(graph: ir.Graph) -> list[list[ir.Node]]:
    """Maximal linear chains of movement nodes whose inner outputs feed only the next node of the chain."""
    chains: list[list[ir.Node]] = []
    tail_of: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.op_type not in MOVEMENT_OPS or node.domain != "":
            continue
        source = node.inputs[0]
        producer = source.producer() if source is not None else None
        chain = tail_of.pop(id(producer), None) if producer is not None else None
        if chain is not None and only_use(source):
            chain.append(node)
        else:
            chain = [node]
            chains.append(chain)
        tail_of[id(node)] = chain
    return chains


def _steps(chain: list[ir.Node]) -> Optional[list[Step]]:
    steps: list[Step] = []
    for node in chain:
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            if perm is None:
                return None
            steps.append(("transpose", tuple(perm.as_ints())))
        else:
            dims = _dims(node.outputs[0])
            if dims is None:
                return None
            steps.append(("reshape", tuple(dims)))
    return steps


def _emit(graph: ir.Graph, chain: list[ir.Node], in_dims: list[Dim], steps: list[Step]) -> None:
    """Replace ``chain`` (input of ``in_dims``) by ``steps``."""
    head, tail = chain[0], chain[-1]
    current, current_dims = head.inputs[0], in_dims
    new_nodes = []
    for k, (kind, arg) in enumerate(steps):
        name = f"{tail.name}/movement_{k}"
        if kind == "transpose":
            node = ir.Node("", "Transpose", [current], [ir.AttrInt64s("perm", list(arg))], name=name)
            dims = [current_dims[p] for p in arg]
        else:
            node = ir.Node("", "Reshape", [current, shape_initializer(graph, f"{name}/shape", list(arg))], name=name)
            dims = list(arg)
        node.outputs[0].name = f"{name}/output"
        node.outputs[0].dtype = head.inputs[0].dtype
        node.outputs[0].shape = ir.Shape([format_dim(d) for d in dims])
        new_nodes.append(node)
        current, current_dims = node.outputs[0], dims
    if new_nodes:
        graph.insert_before(tail, new_nodes)
    tail.outputs[0].replace_all_uses_with(current)
    graph.remove(list(reversed(chain)), safe=True)


def rewrite_movements(graph: ir.Graph, reduce_rank: bool) -> int:
    """Rewrite movement chains (see the module docstring); returns how many chains were rewritten.

    Without ``reduce_rank`` a chain is rewritten only when it loses a transpose; with it also when its
    transpose's rank drops. Every rewrite is checked element by element (:func:`same_movement`); a
    plan that fails the check raises ``RuntimeError`` (a bug in the planner, never a model's fault).
    """
    rewritten = 0
    for chain in _movement_chains(graph):
        head, tail = chain[0], chain[-1]
        in_dims, out_dims, steps = _dims(head.inputs[0]), _dims(tail.outputs[0]), _steps(chain)
        if (in_dims is None or out_dims is None or steps is None or tail.outputs[0].is_graph_output()
                or head.inputs[0].const_value is not None):
            continue  # unknown shapes, or a constant (folding's job)
        plan = plan_movement(in_dims, steps, out_dims)
        if plan is None:
            continue
        old_t = [len(arg) for kind, arg in steps if kind == "transpose"]
        new_t = [len(arg) for kind, arg in plan if kind == "transpose"]
        better = len(new_t) < len(old_t) or (not old_t and len(plan) < len(steps))
        if reduce_rank and len(new_t) == len(old_t) and new_t:
            better = max(new_t) < max(old_t)
        if not better:
            continue
        if not same_movement(in_dims, steps, plan):
            raise RuntimeError(f"movement plan for the chain ending at {tail.name} does not move elements as "
                               f"the chain does: {steps} vs {plan}")
        _emit(graph, chain, in_dims, plan)
        rewritten += 1
    return rewritten


def compose_movements(graph: ir.Graph) -> int:
    """Chains of Transpose/reshapes with fewer transposes after composition; returns how many."""
    return rewrite_movements(graph, reduce_rank=False)


def reduce_transpose_rank(graph: ir.Graph) -> int:
    """:func:`compose_movements`, and every transpose whose rank can drop rewritten at the lowest rank."""
    return rewrite_movements(graph, reduce_rank=True)


def fold_constants(graph: ir.Graph, size_limit: int = FOLD_SIZE_LIMIT) -> int:
    """Evaluate the nodes computed from constants only (never Q/DQ, never outputs larger than
    ``size_limit`` elements) with ONNX Runtime and store their needed outputs as initializers; returns
    how many nodes were folded."""
    folded: list[ir.Node] = []
    constant: set[int] = set()
    for node in graph:
        if (node.domain not in ("", "ai.onnx") or node.op_type in QDQ_OPS or node.op_type == "Constant"
                or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())):
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or not all(v.const_value is not None or id(v) in constant for v in inputs):
            continue
        sizes = [_dims(v) for v in node.outputs]
        if any(d is None or any(s is not None for _, s in d) or np.prod([c for c, _ in d]) > size_limit
               for d in sizes):
            continue
        folded.append(node)
        constant.update(id(v) for v in node.outputs)
    inside = {id(n) for n in folded}
    wanted = [v for n in folded for v in n.outputs
              if v.is_graph_output() or any(id(use.node) not in inside for use in v.uses())]
    if not wanted:
        return 0
    values = _evaluate(graph, folded, wanted)
    for value, array in zip(wanted, values):
        name = f"{value.name}/folded"
        folded_value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        folded_value.shape, folded_value.dtype = ir.Shape(array.shape), value.dtype
        graph.register_initializer(folded_value)
        value.replace_all_uses_with(folded_value)
    graph.remove(list(reversed(folded)), safe=True)
    return len(folded)


def _evaluate(graph: ir.Graph, nodes: list[ir.Node], outputs: list[ir.Value]) -> list[np.ndarray]:
    """Run ``nodes`` (constant inputs) with ONNX Runtime, no graph optimization; the arrays of ``outputs``."""
    import onnxruntime as ort

    node_protos = [ir.serde.serialize_node(n) for n in nodes]
    constants = {v.name: v for n in nodes for v in n.inputs if v is not None and v.const_value is not None}
    initializers = []
    for name, value in sorted(constants.items()):
        tensor = ir.serde.serialize_tensor(value.const_value)
        tensor.name = name
        initializers.append(tensor)
    out_infos = [onnx.helper.make_empty_tensor_value_info(v.name) for v in outputs]
    model = onnx.helper.make_model(onnx.helper.make_graph(node_protos, "constants", [], out_infos, initializers),
                                   opset_imports=[onnx.helper.make_opsetid("", graph.opset_imports[""])])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in outputs], {})


def _add_operands(node: ir.Node) -> Optional[tuple[ir.Value, np.ndarray]]:
    """``(x, C)`` of an ``Add`` with exactly one constant float operand."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if (_constant(a) is None) == (_constant(b) is None):
        return None
    x, c = (a, _constant(b)) if _constant(b) is not None else (b, _constant(a))
    return (x, c) if c.dtype.kind == "f" else None


def one_bias_add(graph: ir.Graph) -> int:
    """``Add(Add(x, C1), C2)`` and ``Add(Reshape(Add(x, C1)), C2)`` as one Add of a constant; returns how many."""
    merged = 0
    for node in list(graph):
        outer = _add_operands(node)
        if outer is None or outer[0].producer() is None or not only_use(outer[0]):
            continue
        between = outer[0].producer()
        reshape = between if between.op_type == "Reshape" and between.domain == "" else None
        inner_value = reshape.inputs[0] if reshape is not None else outer[0]
        if inner_value.producer() is None or not only_use(inner_value):
            continue
        inner = _add_operands(inner_value.producer())
        if inner is None:
            continue
        x, c1 = inner
        if reshape is not None:
            c1 = _through_reshape(c1, _dims(x), _dims(inner_value), _dims(reshape.outputs[0]))
            if c1 is None:
                continue
        combined = (c1.astype(np.float32) + outer[1].astype(np.float32)).astype(outer[1].dtype)
        name = f"{node.name}/combined_constant"
        constant = ir.Value(name=name, const_value=ir.tensor(combined, name=name))
        constant.shape, constant.dtype = ir.Shape(combined.shape), outer[0].dtype
        graph.register_initializer(constant)
        inner_node = inner_value.producer()
        y_index = list(node.inputs).index(outer[0])
        if reshape is not None:
            reshape.replace_input_with(0, x)
        else:
            node.replace_input_with(y_index, x)
        node.replace_input_with(1 - y_index, constant)
        graph.remove(inner_node, safe=True)
        merged += 1
    return merged


def _through_reshape(c1: np.ndarray, x_dims: Optional[list[Dim]], z_dims: Optional[list[Dim]],
                     r_dims: Optional[list[Dim]]) -> Optional[np.ndarray]:
    """``C1`` (added to ``x`` giving ``z``) in the layout of ``Reshape(z)`` (``r_dims``), or None when the
    reshape mixes an axis ``C1`` varies along (then one Add cannot stand for the two)."""
    if x_dims is None or z_dims is None or r_dims is None or x_dims != z_dims or c1.ndim > len(z_dims):
        return None
    full = c1.reshape((1,) * (len(z_dims) - c1.ndim) + c1.shape)
    varying = [k for k, size in enumerate(full.shape) if size != 1]
    keep = len(z_dims) - varying[0] if varying else 0
    if keep > len(r_dims) or (keep and r_dims[-keep:] != z_dims[-keep:]):
        return None
    return full.reshape((1,) * (len(r_dims) - keep) + full.shape[len(full.shape) - keep:])


def dedupe_quantize(graph: ir.Graph) -> int:
    """Merge ``QuantizeLinear`` nodes of one tensor with equal scale, zero point and attributes; returns
    how many were removed."""
    kept: dict[tuple, ir.Node] = {}
    removed = 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain != "" or node.inputs[0] is None:
            continue
        params = [_constant(v) for v in node.inputs[1:]]
        if any(p is None for p in params):
            continue
        key = (id(node.inputs[0]), *((p.dtype.str, p.shape, p.tobytes()) for p in params),
               tuple(sorted((k, str(a.value)) for k, a in node.attributes.items())))
        if key not in kept:
            kept[key] = node
            continue
        if node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(kept[key].outputs[0])
        graph.remove(node, safe=True)
        removed += 1
    return removed


def carry_transpose_to_gathers(graph: ir.Graph) -> int:
    """:func:`export.gather_early.gather_before_transpose` with ``carry``, on movement chains composed first (a head
    split's transposes are then the one the slices are taken from); returns how many transposes it moved."""
    compose_movements(graph)
    return gather_before_transpose(graph, carry=True)


#: name -> pass, in the order :func:`apply_speed_passes` runs them
PASSES: dict[str, Callable[[ir.Graph], int]] = {
    "fold_constants": fold_constants,
    "one_bias_add": one_bias_add,
    "dedupe_quantize": dedupe_quantize,
    "flat_window_mask": flat_window_mask,
    "gather_before_transpose": gather_before_transpose,
    "carry_transpose_to_gathers": carry_transpose_to_gathers,
    "compose_movements": compose_movements,
    "reduce_transpose_rank": reduce_transpose_rank,
    "quantize_before_movement": quantize_before_movement,
}


#: passes whose graph only CPU runtimes take: codes between a QuantizeLinear and its DequantizeLinear,
#: which TensorRT's QDQ rules (and ``export.lint``'s ``qdq-pair``) refuse
CPU_ONLY_PASSES = ("quantize_before_movement",)


#: what :func:`apply_speed_passes` runs unless told: the passes that paid on DAT-light x4
#: (``benchmarks/cpu_speed.md``, graph levers); the others are measured options
DEFAULT_PASSES = ("dedupe_quantize", "flat_window_mask", "gather_before_transpose", "compose_movements")


def run_speed_passes(model: ir.Model, passes: Sequence[str] = DEFAULT_PASSES) -> dict[str, int]:
    """Apply ``passes`` (in :data:`PASSES` order) to ``model`` in place; how much each changed
    (nodes folded, Adds merged, Q removed, chains rewritten). Raises ``ValueError`` naming an unknown pass."""
    unknown = [name for name in passes if name not in PASSES]
    if unknown:
        raise ValueError(f"unknown speed pass(es) {unknown}; expected some of {list(PASSES)}")
    changes: dict[str, int] = {}
    for name, run in PASSES.items():
        if name in passes:
            changes[name] = run(model.graph)
            common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    log.info("speed passes: %s", changes)
    return changes


def apply_speed_passes(model_proto: onnx.ModelProto, passes: Sequence[str] = DEFAULT_PASSES) -> onnx.ModelProto:
    """A copy of ``model_proto`` with ``passes`` applied (:func:`run_speed_passes`), its ``metadata_props``
    (the export's ``2dq.*`` record) kept, so ``2dq-build-engine`` and ``--verify`` accept it.

    >>> import onnx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2, 4, 5]),
    ...          helper.make_node("Add", ["t", "bias"], ["y"])]
    >>> bias = numpy_helper.from_array(np.zeros((1, 1, 1, 1, 1, 30), np.float32), "bias")
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 2, 8, 32, 30])
    >>> graph = helper.make_graph(nodes, "g", [x],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8, 2, 32, 30])], [bias],
    ...     value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8, 8, 2, 32, 30])])
    >>> faster = apply_speed_passes(helper.make_model(graph), passes=["reduce_transpose_rank"])
    >>> [(n.op_type, list(n.attribute[0].ints) if n.attribute else "") for n in faster.graph.node]
    [('Reshape', ''), ('Transpose', [0, 2, 1, 3]), ('Reshape', ''), ('Add', '')]
    """
    model = ir.serde.deserialize_model(model_proto)
    run_speed_passes(model, passes)
    return ir.serde.serialize_model(model)
