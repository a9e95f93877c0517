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


C = 4
END = np.iinfo(np.int64).max


def _spatial_split(cuts: list[tuple[list, list, list | None, list | None]], extra_use: bool = False) -> onnx.ModelProto:
    """DAT's spatial split: ``qkv [B, N, 3, C] -> Transpose(2, 0, 1, 3)``, ``v`` taken whole (``Gather`` 2) and
    each of ``cuts`` (Slice ``starts, ends, axes, steps``; None leaves the input out) followed by the gathers of
    all it keeps on axis 0; every slice used by a ``Relu``. ``extra_use``: the last cut also feeds a ``Relu``."""
    nodes = [helper.make_node("Transpose", ["qkv"], ["split"], perm=[2, 0, 1, 3], name="split"),
             helper.make_node("Gather", ["split", "two"], ["v"], axis=0, name="v"),
             helper.make_node("Relu", ["v"], ["out_v"], name="use_v")]
    inits = [numpy_helper.from_array(np.array(i, np.int64), n) for i, n in ((0, "zero"), (1, "one"), (2, "two"))]
    outputs = ["out_v"]
    for c, (starts, ends, axes, steps) in enumerate(cuts):
        names = [f"c{c}_starts", f"c{c}_ends", f"c{c}_axes", f"c{c}_steps"]
        inputs = ["split"]
        for name, values in zip(names, (starts, ends, axes, steps)):
            if values is not None:
                inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
            inputs.append(name if values is not None else "")
        while inputs[-1] == "":
            inputs.pop()
        nodes.append(helper.make_node("Slice", inputs, [f"cut{c}"], name=f"cut{c}"))
        kept = 2 if axes is None else 3  # a cut without axes keeps q and k
        for i, index in enumerate(("zero", "one", "two")[:kept]):
            nodes += [helper.make_node("Gather", [f"cut{c}", index], [f"s{c}{i}"], axis=0, name=f"g{c}{i}"),
                      helper.make_node("Relu", [f"s{c}{i}"], [f"o{c}{i}"], name=f"use{c}{i}")]
            outputs.append(f"o{c}{i}")
    if extra_use:
        nodes.append(helper.make_node("Relu", [f"cut{len(cuts) - 1}"], ["whole"], name="whole_use"))
        outputs.append("whole")
    qkv = helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", N, 3, C])
    model = helper.make_model(
        helper.make_graph(nodes, "spatial_split", [qkv],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits),
        opset_imports=[helper.make_opsetid("", 21)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


HALVES = [([0], [2], [3], None), ([2], [END], [-1], [1])]


@pytest.mark.parametrize("cuts", [HALVES, [([0], [2], None, None)]], ids=["channel_halves", "no_axes"])
def test_dat_spatial_split_loses_every_transpose_bit_identically(cuts):
    """``Slice`` nodes between the transpose and the gathers (DAT's channel halves; a cut on the 3 axis with
    its axes left out): each cut is taken from the transpose's input, on the axis the transpose moved there,
    and every slice comes out without a transpose; outputs equal element for element at batch 1 and 2."""
    model = _spatial_split(cuts)
    assert _passes(model, ("gather_before_transpose",))[1]["gather_before_transpose"] == 0  # the default pass
    rewritten, changes = _passes(model, ("carry_transpose_to_gathers", "compose_movements"))
    assert changes["carry_transpose_to_gathers"] == 1
    assert _transposes(rewritten) == []
    assert [n.op_type for n in rewritten.graph.node].count("Slice") == len(cuts)
    for batch in (1, 2):
        qkv = np.random.default_rng(batch).standard_normal((batch, N, 3, C)).astype(np.float32)
        for before, after in zip(_run(model, qkv), _run(rewritten, qkv)):
            np.testing.assert_array_equal(after, before)


def test_a_cut_with_another_use_is_left_alone():
    """A cut that also feeds something other than a gather would still need the transpose: left alone."""
    model = _spatial_split(HALVES, extra_use=True)
    rewritten, changes = _passes(model, ("carry_transpose_to_gathers",))
    assert changes["carry_transpose_to_gathers"] == 0
    assert _transposes(rewritten) == _transposes(model)


H = W = 4


def _shifted_split(merge_rows: bool = False) -> onnx.ModelProto:
    """DAT's shifted spatial split: ``qkv [B, H*W, 3, C] -> Transpose(2, 0, 1, 3) -> Reshape [3, B, H, W, C]``,
    the first channel half cut, rolled by one row (``Slice`` x 2 on axis 2, ``Concat``), viewed back as
    ``[3, B, H*W, C/2]`` and split into q, k, v; ``v`` also taken whole. ``merge_rows``: the first reshape merges
    the 3 axis with the batch instead (``[3B, H*W, C]``), which no reshape before the transpose can do."""
    ints = {"zero": 0, "one": 1, "two": 2, "c0": [0], "c1": [1], "half": [C // 2], "end": [END], "ax2": [2],
            "ax4": [4], "grid": [3, -1, H, W, C], "flat": [3, -1, H * W, C // 2], "rows": [-1, H * W, C]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("Transpose", ["qkv"], ["split"], perm=[2, 0, 1, 3], name="split"),
             helper.make_node("Gather", ["split", "two"], ["v"], axis=0, name="v"),
             helper.make_node("Relu", ["v"], ["out_v"], name="use_v")]
    outputs = ["out_v"]
    if merge_rows:
        nodes += [helper.make_node("Reshape", ["split", "rows"], ["rows_view"], name="rows_view"),
                  helper.make_node("Gather", ["rows_view", "one"], ["r"], axis=0, name="r"),
                  helper.make_node("Relu", ["r"], ["out_r"], name="use_r")]
        outputs.append("out_r")
    else:
        nodes += [helper.make_node("Reshape", ["split", "grid"], ["grid_view"], name="grid_view"),
                  helper.make_node("Slice", ["grid_view", "c0", "half", "ax4"], ["half0"], name="half0"),
                  helper.make_node("Slice", ["half0", "c0", "c1", "ax2"], ["top"], name="top"),
                  helper.make_node("Slice", ["half0", "c1", "end", "ax2"], ["rest"], name="rest"),
                  helper.make_node("Concat", ["rest", "top"], ["rolled"], axis=-3, name="roll"),
                  helper.make_node("Reshape", ["rolled", "flat"], ["flat_view"], name="flat_view")]
        for i, index in enumerate(("zero", "one", "two")):
            nodes += [helper.make_node("Gather", ["flat_view", index], [f"s{i}"], axis=0, name=f"g{i}"),
                      helper.make_node("Relu", [f"s{i}"], [f"o{i}"], name=f"use{i}")]
            outputs.append(f"o{i}")
    qkv = helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", H * W, 3, C])
    model = helper.make_model(
        helper.make_graph(nodes, "shifted_split", [qkv],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits),
        opset_imports=[helper.make_opsetid("", 21)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for info in model.graph.value_info:  # the batch the reshapes keep (-1), as the exporter names it
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("unk__"):
                dim.dim_param = "3*batch" if info.name == "rows_view" else "batch"
    return model


def test_dat_shifted_split_is_carried_through_reshapes_slices_and_the_roll():
    """Reshape (a split axis), Slice, Concat (the roll) and Reshape (merged back) between the transpose and
    the gathers: all taken on the transpose's input, no transpose left, bit-identical at batch 1 and 3."""
    model = _shifted_split()
    rewritten, changes = _passes(model, ("carry_transpose_to_gathers", "compose_movements"))
    assert changes["carry_transpose_to_gathers"] == 1
    assert _transposes(rewritten) == []
    ops = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert (ops["Slice"], ops["Concat"], ops["Reshape"]) == (3, 1, 2)
    for batch in (1, 3):
        qkv = np.random.default_rng(batch).standard_normal((batch, H * W, 3, C)).astype(np.float32)
        for before, after in zip(_run(model, qkv), _run(rewritten, qkv)):
            np.testing.assert_array_equal(after, before)


def test_a_reshape_that_mixes_the_moved_axes_is_left_alone():
    """``[3, B, N, C] -> [3B, N, C]`` merges axes the transpose put together from apart: not carried."""
    model = _shifted_split(merge_rows=True)
    rewritten, changes = _passes(model, ("carry_transpose_to_gathers",))
    assert changes["carry_transpose_to_gathers"] == 0
    assert _transposes(rewritten) == _transposes(model)


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


def test_carried_through_the_spatial_blocks_tiny_dat_keeps_no_split_transpose_and_its_ort_output(tmp_path):
    """``carry_transpose_to_gathers`` on the tiny DAT: every qkv split transpose (``(2, 0, 1, 3)`` of the spatial
    blocks) is gone, through channel halves, rolls and views; the ORT engine's output is the same."""
    default = ("dedupe_quantize", "flat_window_mask", "gather_before_transpose", "compose_movements")
    plain, carried, moved = tiny_dat_with_and_without(tmp_path, default, "carry_transpose_to_gathers")
    assert moved > 0
    splits = [sum(n.op_type == "Transpose" and list(n.attribute[0].ints) == [2, 0, 1, 3]
                  for n in onnx.load(str(p)).graph.node) for p in (plain, carried)]
    assert splits[0] > 0 and splits[1] == 0
    assert lint_model(onnx.load(str(carried))) == []
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(10))
    _, outputs = cpu_engine_runs([plain, carried], tiles, "ort")
    np.testing.assert_array_equal(outputs[1], outputs[0])
