"""TensorRT-rules lint: a valid export is clean, and each rule catches a graph broken on purpose."""
from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.lint import RULES, lint_model
from export.cli import main as export_main
from export.onnx_export import ExportOptions, export_onnx

BLOCK = "layers.0.residual_group.blocks.0"


@pytest.fixture(scope="module")
def valid(calibrated, tmp_path_factory, export_tile) -> onnx.ModelProto:
    """A W4A4 export with per-channel weights (every rule has something to check)."""
    made = calibrated(w_bits=4, a_bits=4, weight_granularity="per-channel")
    path = tmp_path_factory.mktemp("lint") / "w4a4_pc.onnx"
    export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile))
    return onnx.load(str(path))


@pytest.fixture
def model(valid) -> onnx.ModelProto:
    return copy.deepcopy(valid)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def add_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def caught(model: onnx.ModelProto, rule: str, node_name: str, target: str | None = None) -> list:
    found = [v for v in lint_model(model, target) if v.rule == rule and v.node == node_name]
    assert found, f"rule {rule} did not flag {node_name}: {[str(v) for v in lint_model(model, target)]}"
    return found


def test_valid_export_is_clean(valid):
    assert lint_model(valid) == []


def test_opset(model):
    model.opset_import[0].version = 12
    caught(model, "opset", "<model>")


def test_zero_point_must_be_zero(model):
    quant = node(model, f"{BLOCK}.attn.qkv.input/QuantizeLinear")
    quant.input[2] = add_initializer(model, "zp_one", np.array(1, np.int8))
    caught(model, "zero-point", quant.name)


def test_quantized_type_int8_only(model):
    quant = node(model, f"{BLOCK}.attn.proj.input/QuantizeLinear")
    quant.input[2] = add_initializer(model, "zp_uint8", np.array(0, np.uint8))
    assert "not int8" in caught(model, "quant-type", quant.name)[0].message
    without = node(model, f"{BLOCK}.mlp.fc1.input/QuantizeLinear")
    del without.input[2]
    assert "outputs uint8" in caught(model, "quant-type", without.name)[0].message


def test_int4_only_as_blocked_weight_of_trt_int4(model):
    dequant = node(model, f"{BLOCK}.mlp.fc2.weight/DequantizeLinear")
    codes = next(t for t in model.graph.initializer if t.name == dequant.input[0])
    array = np.clip(numpy_helper.to_array(codes), -8, 7).astype(ml_dtypes.int4)
    codes.CopyFrom(numpy_helper.from_array(array, codes.name))
    dequant.input[2] = add_initializer(model, "zp_int4", np.zeros(array.shape[1], ml_dtypes.int4))
    caught(model, "quant-type", dequant.name)  # no block size, target trt-int8
    caught(model, "quant-type", dequant.name, target="trt-int4")  # still no block size


def test_activation_scales_per_tensor(model):
    quant = node(model, f"{BLOCK}.attn.matmul.0.a/QuantizeLinear")
    dequant = node(model, f"{BLOCK}.attn.matmul.0.a/DequantizeLinear")
    scale = quant.input[1]
    value = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == scale)
    quant.input[1] = dequant.input[1] = add_initializer(model, "scale_vec", np.full(10, value, np.float32))
    quant.input[2] = dequant.input[2] = add_initializer(model, "zp_vec", np.zeros(10, np.int8))
    for n in (quant, dequant):
        n.attribute.append(helper.make_attribute("axis", -1))
    caught(model, "activation-per-tensor", quant.name)
    caught(model, "activation-per-tensor", dequant.name)


def test_weight_axis_follows_the_consumer_layout(model):
    dequant = node(model, f"{BLOCK}.attn.qkv.weight/DequantizeLinear")
    next(a for a in dequant.attribute if a.name == "axis").i = 0  # (C_in, C_out): axis 0 is the reduction
    assert "output-channel axis 1" in caught(model, "weight-axis", dequant.name)[0].message


def test_weight_dequantize_must_feed_the_linear_op_directly(model):
    dequant = node(model, f"{BLOCK}.mlp.fc1.weight/DequantizeLinear")
    matmul = node(model, f"{BLOCK}.mlp.fc1/MatMul")
    transpose = helper.make_node("Transpose", [dequant.output[0]], ["w_t"], name="extra/Transpose", perm=[1, 0])
    transpose2 = helper.make_node("Transpose", ["w_t"], ["w_tt"], name="extra/Transpose_1", perm=[1, 0])
    matmul.input[1] = "w_tt"
    model.graph.node.extend([transpose, transpose2])
    assert "feeds Transpose" in caught(model, "weight-axis", dequant.name)[0].message


def test_qdq_pairs(model):
    quant = node(model, f"{BLOCK}.mlp.fc2.input/QuantizeLinear")
    dequant = node(model, f"{BLOCK}.mlp.fc2.input/DequantizeLinear")
    dequant.input[1] = add_initializer(model, "other_scale", np.array(0.5, np.float32))
    caught(model, "qdq-pair", quant.name)  # dequantizes with another scale
    clip = node(model, f"{BLOCK}.attn.matmul.1.b/Clip")
    reader = node(model, f"{BLOCK}.attn.matmul.1.b/DequantizeLinear")
    reader.input[0] = clip.output[0]
    caught(model, "qdq-pair", reader.name)  # reads a Clip, not a QuantizeLinear


@pytest.mark.parametrize("matmul, operand", [("attn.qkv", 0), ("attn.matmul.0", 1), ("attn.matmul.1", 0)])
def test_matmul_needs_qdq_on_both_inputs(model, matmul, operand):
    mm = node(model, f"{BLOCK}.{matmul}/MatMul")
    dequant = next(n for n in model.graph.node if n.output[0] == mm.input[operand])
    quant = next(n for n in model.graph.node if n.output[0] == dequant.input[0])
    clip = next(n for n in model.graph.node if n.output[0] == quant.input[0])
    mm.input[operand] = clip.input[0]  # the float tensor, unquantized
    caught(model, "matmul-both-inputs", mm.name)


def test_no_qdq_directly_on_layernorm(model):
    clip = node(model, f"{BLOCK}.mlp.fc1.input/Clip")
    quant = node(model, f"{BLOCK}.mlp.fc1.input/QuantizeLinear")
    quant.input[0] = clip.input[0]  # LayerNorm -> QuantizeLinear, no clip between
    norm = node(model, f"{BLOCK}.norm2/LayerNormalization")
    assert quant.input[0] == norm.output[0]
    caught(model, "layernorm-qdq", norm.name)
    norm1 = node(model, f"{BLOCK}.norm1/LayerNormalization")
    norm1.input[0] = node(model, f"{BLOCK}.attn.proj.input/DequantizeLinear").output[0]
    caught(model, "layernorm-qdq", norm1.name)


def test_every_rule_is_tested():
    tested = {"opset", "zero-point", "quant-type", "activation-per-tensor", "weight-axis", "qdq-pair",
              "matmul-both-inputs", "layernorm-qdq", "qdq-params", "topk-k"}
    assert tested == set(RULES)


def test_qdq_params_must_be_constants(model):
    quant = node(model, f"{BLOCK}.attn.qkv.input/QuantizeLinear")
    model.graph.input.append(helper.make_tensor_value_info("runtime_scale", TensorProto.FLOAT, []))
    quant.input[1] = "runtime_scale"
    caught(model, "qdq-params", quant.name)


def test_command_line_refuses_a_file_that_is_not_onnx(tmp_path, capsys):
    # clean and broken graphs through `2dq-export --lint-only`: tests/export/test_onnx_export.py
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert export_main(["--lint-only", str(tmp_path / "junk.onnx")]) == 1
    assert "junk.onnx" in capsys.readouterr().err


@pytest.mark.parametrize("k, flagged", [(3840, False), (3841, True)])
def test_topk_within_tensorrts_limit(model, k, flagged):
    """A TopK over more than 3840 elements (ATD's token sort on a 64x64 tile: 4096) cannot build in TensorRT; ORT
    runs it."""
    output = model.graph.output[0].name
    k_name = add_initializer(model, "topk_k", np.array([k], np.int64))
    model.graph.node.append(helper.make_node("TopK", [output, k_name], ["topk_values", "topk_indices"], name="sort",
                                             axis=-1, largest=0, sorted=1))
    if flagged:
        caught(model, "topk-k", "sort")
    else:
        assert [v for v in lint_model(model) if v.rule == "topk-k"] == []
    assert [v for v in lint_model(model, "ort") if v.rule == "topk-k"] == []
