"""``gather_before_transpose`` (export/gather_early.py): the slices of a head split taken before its transpose,
bit-identical at every batch, left alone where the elements moved by transposes would grow, and fewer float
transposes in the tiny DAT's engines (the reason for the pass)."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.gather_early import gather_before_transpose
from export.lint import lint_model
from export.speed_passes import run_speed_passes

from .conftest import DAT_TILE, cpu_engine_runs, tiny_dat_with_and_without

N, HEADS, D = 6, 2, 5
SPLIT_PERM = [2, 0, 3, 1, 4]  # [B, N, 3, heads, d] -> [3, B, heads, N, d], as the models write it


def _head_split(followers: tuple[bool, bool, bool], indices: list) -> onnx.ModelProto:
    """``qkv [B, N, 3, HEADS, D] -> Transpose -> Gather(axis 0, indices[i])`` for q, k, v; slice ``i`` is then
    transposed (last two axes, DAT's channel attention) where ``followers[i]``, then used by a ``Relu``."""
    nodes = [helper.make_node("Transpose", ["qkv"], ["split"], perm=SPLIT_PERM, name="split")]
    inits, outputs = [], []
    for i, (follow, index) in enumerate(zip(followers, indices)):
        inits.append(numpy_helper.from_array(np.array(index, np.int64), f"i{i}"))
        nodes.append(helper.make_node("Gather", ["split", f"i{i}"], [f"s{i}"], axis=0, name=f"gather{i}"))
        rank = 4 if np.ndim(index) == 0 else 5
        if follow:
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            nodes += [helper.make_node("Transpose", [f"s{i}"], [f"t{i}"], perm=perm, name=f"after{i}"),
                      helper.make_node("Relu", [f"t{i}"], [f"o{i}"], name=f"use{i}")]
        else:
            nodes.append(helper.make_node("Relu", [f"s{i}"], [f"o{i}"], name=f"use{i}"))
        outputs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None))
    qkv = helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", N, 3, HEADS, D])
    model = helper.make_model(helper.make_graph(nodes, "head_split", [qkv], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _run(model: onnx.ModelProto, qkv: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"qkv": qkv})


def _passes(model: onnx.ModelProto, passes: tuple[str, ...]) -> tuple[onnx.ModelProto, dict[str, int]]:
    graph = ir.serde.deserialize_model(model)
    changes = run_speed_passes(graph, passes)
    return ir.serde.serialize_model(graph), changes


def _transposes(model: onnx.ModelProto) -> list[list[int]]:
    return [list(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"]


@pytest.mark.parametrize("indices", [[0, 1, 2], [2, -2, 0], [[0], [1], [2]]])
def test_dat_channel_split_loses_its_big_transpose_bit_identically_at_every_batch(indices):
    """All three slices transposed again (DAT's channel attention): the 5-D transpose goes, each slice is
    moved once (scalar and 1-D indices, negative ones too); outputs equal element for element at batch 1 and 3."""
    model = _head_split((True, True, True), indices)
    rewritten, changes = _passes(model, ("gather_before_transpose", "compose_movements"))
    assert changes["gather_before_transpose"] == 1
    assert SPLIT_PERM not in _transposes(rewritten) and len(_transposes(rewritten)) == 3
    assert [n.op_type for n in rewritten.graph.node].count("Gather") == 3
    assert [n.op_type for n in model.graph.node].count("Transpose") == 4
    for batch in (1, 3):
        qkv = np.random.default_rng(batch).standard_normal((batch, N, 3, HEADS, D)).astype(np.float32)
        for before, after in zip(_run(model, qkv), _run(rewritten, qkv)):
            np.testing.assert_array_equal(after, before)


def test_swinir_split_is_left_alone():
    """q and v used as they are (SwinIR's window attention): two slices would keep transposes of their own,
    so the rewrite would move as many elements in more transposes; the graph stays as it is."""
    model = _head_split((False, True, False), [0, 1, 2])
    rewritten, changes = _passes(model, ("gather_before_transpose",))
    assert changes["gather_before_transpose"] == 0
    assert _transposes(rewritten) == _transposes(model)


def test_one_slice_used_as_it_is_still_pays():
    """One slice keeping a transpose of its own (a third of the elements) against the whole tensor: rewritten."""
    model = _head_split((True, True, False), [0, 1, 2])
    rewritten, changes = _passes(model, ("gather_before_transpose", "compose_movements"))
    assert changes["gather_before_transpose"] == 1 and SPLIT_PERM not in _transposes(rewritten)
    qkv = np.random.default_rng(5).standard_normal((2, N, 3, HEADS, D)).astype(np.float32)
    for before, after in zip(_run(model, qkv), _run(rewritten, qkv)):
        np.testing.assert_array_equal(after, before)


def test_a_transpose_with_another_use_is_left_alone():
    model = _head_split((True, True, True), [0, 1, 2])
    model.graph.node.append(helper.make_node("Relu", ["split"], ["whole"], name="whole_use"))
    model.graph.output.append(helper.make_tensor_value_info("whole", TensorProto.FLOAT, None))
    graph = ir.serde.deserialize_model(model)
    assert gather_before_transpose(graph.graph) == 0


@pytest.fixture(scope="module")
def dat_graphs(tmp_path_factory) -> tuple[Path, Path, int]:
    """The tiny DAT export with the default passes, and the same with the gathers moved too."""
    default = ("dedupe_quantize", "flat_window_mask", "compose_movements")
    return tiny_dat_with_and_without(tmp_path_factory.mktemp("gather"), default, "gather_before_transpose")


def test_tiny_dat_has_fewer_transposes_and_the_same_ort_engine_output(dat_graphs):
    default, gathered, rewritten = dat_graphs
    assert rewritten > 0
    counts = [collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (default, gathered)]
    assert counts[1]["Transpose"] == counts[0]["Transpose"] - rewritten
    assert lint_model(onnx.load(str(gathered))) == []
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(8))
    _, outputs = cpu_engine_runs([default, gathered], tiles, "ort")
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_openvino_runs_fewer_float_transposes_with_the_same_output(dat_graphs):
    pytest.importorskip("openvino")

    default, gathered, rewritten = dat_graphs
    tiles = torch.rand(1, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(9))
    layers, outputs = cpu_engine_runs([default, gathered], tiles, "openvino")
    assert layers[1]["Transpose"] < layers[0]["Transpose"]
    np.testing.assert_array_equal(outputs[1], outputs[0])
