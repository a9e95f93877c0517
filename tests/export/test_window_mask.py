"""``flat_window_mask`` (export/window_mask.py): the shifted-window mask added through a 5-D view becomes
one Add of the mask tiled over the batch, bit-identical at every batch, left alone where the view is not
the models' one, and OpenVINO then fuses the masked attentions (the reason for the pass)."""
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

from export.lint import lint_model
from export.window_mask import flat_window_mask

from .conftest import DAT_TILE, cpu_engine_runs, tiny_dat_with_and_without

HEADS, N = 3, 4


def _masked_softmax(windows: int, mask_shape: tuple[int, ...], split: list[int], merge: list[int]) -> onnx.ModelProto:
    """``Softmax(Reshape(Reshape(attn, split) + mask, merge))``, ``attn`` of shape ``[rows, HEADS, N, N]``
    with ``rows`` dynamic; the mask holds 0 and -100 as the models' masks do, and a few other values."""
    rng = np.random.default_rng(windows)
    mask = np.where(rng.random(mask_shape) < 0.5, 0.0, -100.0).astype(np.float32) + rng.random(mask_shape).astype(
        np.float32)
    nodes = [helper.make_node("Reshape", ["attn", "split"], ["view"], name="split"),
             helper.make_node("Add", ["view", "mask"], ["masked"], name="add"),
             helper.make_node("Reshape", ["masked", "merge"], ["logits"], name="merge"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax")]
    inits = [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.array(split, np.int64), "split"),
             numpy_helper.from_array(np.array(merge, np.int64), "merge")]
    attn, probs = (helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", HEADS, N, N])
                   for name in ("attn", "probs"))
    graph = helper.make_graph(nodes, "masked", [attn], [probs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, attn: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"attn": attn})[0]


def _rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = ir.serde.deserialize_model(model)
    count = flat_window_mask(graph.graph)
    return ir.serde.serialize_model(graph), count


@pytest.mark.parametrize("windows, mask_shape", [(2, (1, 2, 1, N, N)), (2, (1, 2, HEADS, N, N)), (1, (1, 1, 1, N, N))])
def test_the_view_pair_becomes_one_add_bit_identical_at_every_batch(windows, mask_shape):
    """Per-window masks (tiled over the batch), per-window-and-head ones (a bias merged into the mask, as
    ``one_bias_add`` leaves it) and one mask for all windows (broadcast, no tiling)."""
    model = _masked_softmax(windows, mask_shape, [-1, windows, HEADS, N, N], [-1, HEADS, N, N])
    flat, count = _rewrite(model)
    ops = collections.Counter(n.op_type for n in flat.graph.node)
    assert count == 1 and ops["Reshape"] == 0 and ops["Add"] == 1 and ops["Tile"] == (windows > 1)
    onnx.checker.check_model(flat, full_check=True)
    for batch in (1, 3):
        attn = np.random.default_rng(batch).normal(0, 3, (batch * windows, HEADS, N, N)).astype(np.float32)
        np.testing.assert_array_equal(_run(flat, attn), _run(model, attn))


@pytest.mark.parametrize("mask_shape, split, merge", [
    ((2, 2, 1, N, N), [-1, 2, HEADS, N, N], [-1, HEADS, N, N]),     # the mask varies along the batch
    ((1, 2, 1, N, N), [-1, 2, HEADS, N, N], [-1, HEADS, N * N]),     # the merge is not back to attn's shape
    ((1, 2, 1, 2, N), [-1, 2, HEADS, 2, 2 * N], [-1, HEADS, N, N]),  # the split moves elements across axes
    ((1, 2, 1, N, N), [0, 2, HEADS, N, N], [-1, HEADS, N, N]),       # 0 copies attn's leading axis, no split
])
def test_other_views_are_left_alone(mask_shape, split, merge):
    model = _masked_softmax(2, mask_shape, split, merge)
    flat, count = _rewrite(model)
    assert count == 0 and [n.op_type for n in flat.graph.node] == [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def dat_graphs(tmp_path_factory) -> tuple[Path, Path, int]:
    """The tiny DAT export with the default movement pass, and the same with the flat masks too."""
    return tiny_dat_with_and_without(tmp_path_factory.mktemp("mask"), ("compose_movements",), "flat_window_mask")


def test_tiny_dat_engine_output_is_unchanged(dat_graphs):
    composed, flat, rewritten = dat_graphs
    assert rewritten > 0
    assert lint_model(onnx.load(str(flat))) == []
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(8))
    _, outputs = cpu_engine_runs([composed, flat], tiles, "ort")
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_openvino_fuses_the_masked_attentions(dat_graphs):
    """Each rewritten mask lets OpenVINO's CPU plugin fuse one more ``q @ k^T -> softmax -> @ v`` into one
    attention kernel: two int8 products and a softmax fewer in its runtime graph; the output stays bit-identical."""
    pytest.importorskip("openvino")

    composed, flat, rewritten = dat_graphs
    tiles = torch.rand(1, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(9))
    layers, outputs = cpu_engine_runs([composed, flat], tiles, "openvino")
    assert layers[1].get("Softmax", 0) == layers[0]["Softmax"] - rewritten
    assert layers[1].get("MatMul", 0) == layers[0]["MatMul"] - 2 * rewritten
    np.testing.assert_array_equal(outputs[1], outputs[0])
