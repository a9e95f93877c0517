"""``quantize_before_movement`` (export/quantize_early.py): quantizers move above the data movement that
feeds them, every code stays what it was, and what the pass must not move stays where it is.

The tiny DAT x2 W8A8 export (``conftest.tiny_dat_export``) has the pattern the pass is for: q of each
window attention is ``Reshape -> Transpose -> Reshape -> Mul(scale) -> Clip -> QuantizeLinear``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.lint import lint_model
from export.quantize_early import quantize_before_movement
from export.speed_passes import run_speed_passes

from .conftest import DAT_TILE, tiny_dat_export

PASSES = ("compose_movements", "quantize_before_movement")


@pytest.fixture(scope="module")
def dat_graphs(tmp_path_factory) -> tuple[Path, Path, int]:
    """The composed tiny DAT export, the same with the quantizers moved, and how many moved."""
    folder = tmp_path_factory.mktemp("early")
    export = tiny_dat_export(folder / "dat_w8a8.onnx")
    paths, moved = [], 0
    for name, passes in (("composed", PASSES[:1]), ("early", PASSES)):
        model = ir.load(str(export))
        moved = run_speed_passes(model, passes).get("quantize_before_movement", 0)
        ir.save(model, str(folder / f"{name}.onnx"))
        paths.append(folder / f"{name}.onnx")
    return paths[0], paths[1], moved


def _codes_and_output(path: Path, tiles: np.ndarray) -> dict[str, np.ndarray]:
    """Every QuantizeLinear's codes (by the name of its output in the unrewritten graph) and the output,
    from ONNX Runtime with its graph optimizations off (the graph exactly as written)."""
    model = onnx.load(str(path))
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(helper.make_empty_tensor_value_info(name.removesuffix("/before_movement"))
                              for name in names)
    return _as_written(model, {"input": tiles})


def _as_written(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model`` run by ONNX Runtime with its graph optimizations off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, feeds)))


def test_moved_quantizers_give_every_code_and_output_bit_for_bit(dat_graphs):
    composed, early, moved = dat_graphs
    assert moved == 12  # q, k, v of the two window attentions in each of the tiny DAT's two spatial blocks
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(4)).numpy()
    before, after = _codes_and_output(composed, tiles), _codes_and_output(early, tiles)
    assert before.keys() == after.keys() and len(before) > 20
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_the_movement_now_carries_codes(dat_graphs):
    """Each moved quantizer's transpose reads int8 codes: q, k and v of every window attention; the
    channel attention's k, a transpose of the last two axes into a product's second factor, stays."""
    composed, early, moved = dat_graphs
    graph = ir.load(str(early)).graph
    code_transposes = [n for n in graph if n.op_type == "Transpose" and n.inputs[0].dtype == ir.DataType.INT8]
    assert len(code_transposes) == moved
    moved_names = set()
    for node in code_transposes:
        quantize = node.inputs[0].producer()
        while quantize.op_type != "QuantizeLinear":
            quantize = quantize.inputs[0].producer()
        moved_names.add(quantize.name)
    # q, k and v of both window attentions in the tiny DAT's two spatial blocks
    assert moved_names == {f"layers.{layer}.blocks.0.attn.attns.{branch}.{factor}/QuantizeLinear"
                           for layer in (0, 1) for branch in (0, 1)
                           for factor in ("matmul.0.a", "matmul.0.b", "matmul.1.b")}
    kept = [n for n in ir.load(str(composed)).graph if n.op_type == "QuantizeLinear"
            and n.name.endswith(".attn.matmul.0.b/QuantizeLinear") and _ops_above(n)[:2] == ["Clip", "Transpose"]]
    assert kept, "the channel attention's k^T: the case the pass must leave"
    early_by_name = {n.name: n for n in graph}
    for node in kept:
        assert _ops_above(early_by_name[node.name])[:2] == ["Clip", "Transpose"]  # still after its transpose


def _ops_above(node: ir.Node, depth: int = 6) -> list[str]:
    ops = []
    while depth and node.inputs and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        node = node.inputs[0].producer()
        ops.append(node.op_type)
        depth -= 1
    return ops


def test_the_rewritten_graph_is_for_cpu_builders_only(dat_graphs):
    """TensorRT wants every QuantizeLinear followed by its DequantizeLinear: the lint names exactly the
    moved pairs (the export itself, which TensorRT reads, is never rewritten)."""
    composed, early, moved = dat_graphs
    assert lint_model(onnx.load(str(composed))) == []
    violations = lint_model(onnx.load(str(early)))
    assert {v.rule for v in violations} == {"qdq-pair"} and len(violations) == 2 * moved


def test_openvino_engine_is_bit_identical_and_moves_codes(dat_graphs, tmp_path):
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine

    composed, early, moved = dat_graphs
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(8))
    outputs, int8_transposes = [], []
    for graph in (composed, early):
        build = build_openvino_engine(graph, tmp_path / f"{graph.stem}.ov.xml", threads=2, graph_passes=())
        int8_transposes.append(build.int8_layers.get("Transpose", 0))
        outputs.append(OpenVinoTileRunner(build.engine, threads=2, batch=2)(tiles).numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])
    assert int8_transposes[1] >= int8_transposes[0] + moved


def _graph(chain: list[onnx.NodeProto], consts: dict[str, np.ndarray], shape: tuple[int, ...] = (1, 4, 6),
           operands: tuple[str, str] = ("d", "w"), other: Optional[list[int]] = None) -> ir.Model:
    """``x (shape) -> chain -> q -> DequantizeLinear -> d -> MatMul(operands)`` (``q`` the chain's codes; a
    constant ``w`` or an input ``other`` of shape ``other`` as the product's other factor)."""
    nodes = [*chain, helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("MatMul", list(operands), ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    if other is not None:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, other))
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


CONSTS = {"s": np.array(0.02, np.float32), "z": np.array(0, np.int8), "two": np.array(2.0, np.float32),
          "w": np.ones((4, 3), np.float32), "lo": np.array(-1.0, np.float32), "hi": np.array(1.0, np.float32)}


@pytest.mark.parametrize("chain, consts, moves", [
    # the pattern: movement, a scalar Mul, a Clip, a per-tensor int8 quantizer -> moved
    ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Mul", ["t", "two"], ["m"]),
      helper.make_node("Clip", ["m", "lo", "hi"], ["c"]), helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"])],
     {}, True),
    # scalar nodes between movement nodes: the movement is consecutive again after the quantizer -> moved
    ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Mul", ["t", "two"], ["m"]),
      helper.make_node("Reshape", ["m", "shape"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
      helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"])],
     {"shape": np.array([1, 6, 4], np.int64)}, True),
    # a per-channel quantizer (one scale per element of the last axis, which the transpose moves) -> left
    ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
      helper.make_node("QuantizeLinear", ["t", "sc", "zc"], ["q"], axis=2)],
     {"sc": np.full(4, 0.02, np.float32), "zc": np.zeros(4, np.int8)}, False),
    # an Add of a per-channel constant between the transpose and the quantizer stops the walk -> left
    ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Add", ["t", "shift"], ["a"]),
      helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"])],
     {"shift": np.arange(4, dtype=np.float32)}, False),
    # only reshapes above the quantizer: nothing worth moving -> left
    ([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"])],
     {"shape": np.array([1, 6, 4], np.int64)}, False),
])
def test_what_moves_and_what_stays(chain, consts, moves):
    model = _graph(chain, {**CONSTS, **consts})
    before = ir.serde.serialize_model(model)
    assert quantize_before_movement(model.graph) == int(moves)
    after = ir.serde.serialize_model(model)
    order = [n.op_type for n in after.graph.node]
    assert (order.index("QuantizeLinear") < order.index(chain[0].op_type)) == moves
    x = np.random.default_rng(0).normal(size=(1, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(_as_written(after, {"x": x})["y"], _as_written(before, {"x": x})["y"])


@pytest.mark.parametrize("perm, factor, moves", [
    ([0, 2, 1], 0, True),  # a first factor moves
    ([0, 2, 1], 1, False),  # a transposed second factor (the last two axes swapped) stays: runtimes fold it
    ([1, 0, 2], 1, True),  # any other movement of a second factor moves
])
def test_a_transposed_second_factor_stays(perm, factor, moves):
    """Codes whose movement only transposes a MatMul's second factor stay where they are (runtimes fold
    that transpose into their int8 product); others move."""
    shape = [2, 4, 6]
    moved_shape = [shape[p] for p in perm]
    other = [moved_shape[0], 3, moved_shape[1]] if factor == 1 else [moved_shape[0], moved_shape[2], 3]
    chain = [helper.make_node("Transpose", ["x"], ["t"], perm=perm),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["q"])]
    model = _graph(chain, CONSTS, shape, ("d", "other") if factor == 0 else ("other", "d"), other)
    before = ir.serde.serialize_model(model)
    assert quantize_before_movement(model.graph) == int(moves)
    feeds = {"x": np.random.default_rng(1).normal(size=shape).astype(np.float32),
             "other": np.random.default_rng(2).normal(size=other).astype(np.float32)}
    after = ir.serde.serialize_model(model)
    np.testing.assert_array_equal(_as_written(after, feeds)["y"], _as_written(before, feeds)["y"])
