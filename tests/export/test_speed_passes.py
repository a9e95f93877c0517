"""Speed passes (issue 23 item 4) on tiny exported models: each changes the graph, keeps the export's
outputs (bit for bit where it only moves data or folds what ORT folds; to float rounding where it
reorders one addition), keeps the graph lint-clean and its metadata, and refuses what it cannot prove.

Models: the tiny calibrated SwinIR x2 of ``conftest.py`` (windows, a shifted block with a mask) and a
tiny DAT x2 (its position-bias MLP is the constant subgraph the exporter leaves unfolded).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.ort_engine import OrtTileRunner, build_ort_engine
from export.lint import lint_model
from export.metadata import ExportMetadata
from export.movement_chains import parse_dim, plan_movement, same_movement
from export.onnx_export import ExportOptions
from export.speed_passes import CPU_ONLY_PASSES, PASSES, apply_speed_passes, run_speed_passes

from .conftest import DAT_TILE, TILE, tiny_dat_export

#: the passes whose graph is still a TensorRT QDQ graph (test_quantize_early.py has the CPU-only one)
EXPORT_PASSES = tuple(name for name in PASSES if name not in CPU_ONLY_PASSES)
#: one_bias_add reorders one float addition: outputs agree to a few float32 ulps of the [0, 1] image
REORDERED_ADD_ATOL = 1e-5


@pytest.fixture(scope="module")
def swinir_export(calibrated, tmp_path_factory) -> Path:
    """The tiny SwinIR x2 W8A8 export (a 2dq file, as ``2dq-export`` writes it)."""
    from export.onnx_export import export_onnx

    made = calibrated(w_bits=8, a_bits=8)
    path = tmp_path_factory.mktemp("speed") / "swinir_w8a8.onnx"
    export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=TILE))
    return path


@pytest.fixture(scope="module")
def dat_export(tmp_path_factory) -> Path:
    """A tiny DAT x2 W8A8 export (:func:`tests.export.conftest.tiny_dat_export`)."""
    return tiny_dat_export(tmp_path_factory.mktemp("speed") / "dat_w8a8.onnx")


def _rewritten(source: Path, passes, folder: Path) -> tuple[Path, dict[str, int]]:
    model = ir.load(str(source))
    changes = run_speed_passes(model, passes)
    path = folder / f"{source.stem}_{'_'.join(passes)}.onnx"
    ir.save(model, str(path))
    return path, changes


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _engine_output(path: Path, tiles: torch.Tensor) -> np.ndarray:
    """The ORT engine ``2dq-build-engine --backend ort`` builds from ``path``, run on ``tiles``."""
    engine = path.with_suffix(".ort.onnx")
    build_ort_engine(path, engine, threads=2)
    return OrtTileRunner(engine, threads=2)(tiles).numpy()


def _check_still_an_export(original: Path, rewritten: Path) -> None:
    proto = onnx.load(str(rewritten))
    onnx.checker.check_model(proto, full_check=True)
    assert lint_model(proto) == []
    assert ExportMetadata.read(rewritten) == ExportMetadata.read(original)


@pytest.mark.parametrize("passes, exact", [
    (("reduce_transpose_rank",), True),
    (("one_bias_add",), False),
    (EXPORT_PASSES, False),
])
def test_passes_on_tiny_swinir_keep_the_engine_output(swinir_export, tmp_path, passes, exact):
    """SwinIR's window partitions have one transpose each (nothing to compose): rank reduction and the
    shifted block's bias + mask are what change."""
    tiles = torch.rand(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(5))
    rewritten, changes = _rewritten(swinir_export, passes, tmp_path)
    before, after = _ops(swinir_export), _ops(rewritten)
    if "one_bias_add" in passes:
        assert changes["one_bias_add"] > 0 and after["Add"] == before["Add"] - changes["one_bias_add"]
    if "reduce_transpose_rank" in passes:
        assert changes["reduce_transpose_rank"] > 0
        assert _transpose_ranks(rewritten) < _transpose_ranks(swinir_export)
    assert after["QuantizeLinear"] == before["QuantizeLinear"]
    assert after["DequantizeLinear"] == before["DequantizeLinear"]
    _check_still_an_export(swinir_export, rewritten)
    expected, got = _engine_output(swinir_export, tiles), _engine_output(rewritten, tiles)
    if exact:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=REORDERED_ADD_ATOL)


def _transpose_ranks(path: Path) -> int:
    """Sum of the ranks of the graph's transposes."""
    return sum(len(n.attribute[0].ints) for n in onnx.load(str(path)).graph.node if n.op_type == "Transpose")


def test_passes_on_tiny_dat_keep_the_engine_output(dat_export, tmp_path):
    """DAT's head splits (three transposes a chain) compose; its position-bias MLP becomes one constant;
    bias + mask become one Add."""
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(6))
    before = _ops(dat_export)
    expected = _engine_output(dat_export, tiles)
    composed, changes = _rewritten(dat_export, ("compose_movements",), tmp_path)
    assert changes["compose_movements"] > 0 and _ops(composed)["Transpose"] < before["Transpose"]
    _check_still_an_export(dat_export, composed)
    np.testing.assert_array_equal(_engine_output(composed, tiles), expected)

    assert before["Gemm"] > 0 and before["LayerNormalization"] > 0
    folded, changes = _rewritten(dat_export, ("fold_constants",), tmp_path)
    after = _ops(folded)
    assert changes["fold_constants"] > 0
    assert after["Gemm"] == 0 and after["GatherND"] == 0  # the bias MLP and its gather are constants now
    assert all(after[op] == before[op] for op in ("QuantizeLinear", "DequantizeLinear"))
    _check_still_an_export(dat_export, folded)
    np.testing.assert_array_equal(_engine_output(folded, tiles), expected)

    every, changes = _rewritten(dat_export, EXPORT_PASSES, tmp_path)
    assert changes["one_bias_add"] > 0
    _check_still_an_export(dat_export, every)
    np.testing.assert_allclose(_engine_output(every, tiles), expected, rtol=0, atol=REORDERED_ADD_ATOL)


def test_dedupe_quantize_merges_a_second_quantizer_of_one_tensor(swinir_export, tmp_path):
    """A second Q/DQ of an already quantized tensor (made here: the exports have none, DAT-light neither)
    merges into the first; the probe output it feeds is unchanged."""
    model = onnx.load(str(swinir_export))
    assert run_speed_passes(ir.serde.deserialize_model(model), ("dedupe_quantize",)) == {"dedupe_quantize": 0}
    first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    duplicate = helper.make_node("QuantizeLinear", list(first.input), ["probe_q"], name="probe/QuantizeLinear")
    dequantize = helper.make_node("DequantizeLinear", ["probe_q", *first.input[1:]], ["probe"], name="probe/DQ")
    model.graph.node.extend([duplicate, dequantize])
    model.graph.output.append(helper.make_tensor_value_info("probe", TensorProto.FLOAT, None))
    doubled = tmp_path / "doubled.onnx"
    onnx.save(model, str(doubled))
    merged = apply_speed_passes(model, passes=("dedupe_quantize",))
    assert _ops(doubled)["QuantizeLinear"] - collections.Counter(n.op_type for n in merged.graph.node)[
        "QuantizeLinear"] == 1
    assert lint_model(merged) == []
    import onnxruntime as ort

    tiles = torch.rand(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(8)).numpy()
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input": tiles})
    for got, expected in zip(run(merged), run(model)):
        np.testing.assert_array_equal(got, expected)


def _dims(*dims):
    return [parse_dim(d) for d in dims]


def test_movement_plans_are_checked_element_by_element():
    """DAT's head split (three transposes) is one; a wrong permutation is caught; a reshape that is not a
    split or merge of axes, and a second symbolic dimension, are refused."""
    steps = [("transpose", (0, 2, 1)), ("reshape", tuple(_dims("s", 30, 8, 8, 2, 32))),
             ("transpose", (0, 2, 4, 3, 5, 1)), ("reshape", tuple(_dims("16*s", 256, 3, 10))),
             ("transpose", (0, 2, 1, 3))]
    in_dims, out_dims = _dims("s", 4096, 30), _dims("16*s", 3, 256, 10)
    plan = plan_movement(in_dims, steps, out_dims)
    assert [kind for kind, _ in plan] == ["reshape", "transpose", "reshape"]
    assert same_movement(in_dims, steps, plan)
    wrong = [(kind, (arg[1], arg[0], *arg[2:]) if kind == "transpose" else arg) for kind, arg in plan]
    assert not same_movement(in_dims, steps, wrong)
    assert plan_movement(_dims(6, 4), [("reshape", tuple(_dims(4, 6)))], _dims(4, 6)) is None
    assert plan_movement(_dims("a", "b", 8), [("transpose", (1, 0, 2))], _dims("b", "a", 8)) is None


def _transpose_model(dims, perm, out_dims) -> onnx.ModelProto:
    """``x -> Transpose -> Relu -> y`` with the shapes given (None: unknown)."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm), helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
                              value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, out_dims)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_transposes_without_static_shapes_are_left_alone():
    unknown = _transpose_model(["n", "c", 8, 4], [0, 1, 3, 2], ["n", "c", 4, 8])   # two symbolic dims
    none = _transpose_model(None, [0, 1, 3, 2], None)                               # no shape at all
    for model in (unknown, none):
        assert [n.op_type for n in apply_speed_passes(model, PASSES).graph.node] == ["Transpose", "Relu"]
    static = _transpose_model(["n", 6, 8, 4], [0, 1, 3, 2], ["n", 6, 4, 8])   # the positive control
    faster = apply_speed_passes(static, ["reduce_transpose_rank"])
    assert [n.op_type for n in faster.graph.node] == ["Reshape", "Transpose", "Reshape", "Relu"]
    assert list(faster.graph.node[1].attribute[0].ints) == [0, 2, 1]


def test_one_add_refuses_a_reshape_that_mixes_the_constants_axes():
    """``(x + C1)`` reshaped so that C1's varying axis is split: one Add cannot stand for the two."""
    nodes = [helper.make_node("Add", ["x", "c1"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Add", ["r", "c2"], ["y"])]
    constants = [numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(1, 8), "c1"),
                 numpy_helper.from_array(np.array([2, 2, 4], np.int64), "shape"),
                 numpy_helper.from_array(np.ones((1, 1, 4), np.float32), "c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 4])], constants,
                              value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8]),
                                          helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert [n.op_type for n in apply_speed_passes(model, ["one_bias_add"]).graph.node] == ["Add", "Reshape", "Add"]
    with pytest.raises(ValueError, match="unknown speed pass"):
        apply_speed_passes(model, ["fold_everything"])


def test_composed_movements_run_bit_identical_in_openvino(dat_export, tmp_path):
    """The OpenVINO engine of the composed graph gives the unrewritten graph's engine output bit for bit
    (elements are moved, never computed)."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine

    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(9))
    composed, _ = _rewritten(dat_export, ("compose_movements",), tmp_path)
    outputs = []
    for graph in (dat_export, composed):
        engine = build_openvino_engine(graph, tmp_path / f"{graph.stem}.ov.xml", threads=2).engine
        outputs.append(OpenVinoTileRunner(engine, threads=2, batch=2)(tiles).numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])
