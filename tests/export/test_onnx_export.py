"""QDQ ONNX export: graph contract, metadata, exact grids and integer weights, int4 blocks, fp16,
determinism, refusal of foreign artifacts, and the 2dq-export command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from safetensors.torch import save_file

from calib.artifact import ArtifactError, load_artifact
from export.cli import main as export_main
from export.export_view import build_export_view
from export.lint import lint_model
from export.metadata import ExportMetadata
from export.onnx_export import ExportLintError, ExportOptions, export_onnx
from toolchain import load_model
from toolchain.models import info_of
from toolchain.files import sha256_file
from toolchain.quant import grid, quantizers
from toolchain.tolerances import EXPORT_GRAPH_ATOL, EXPORT_VIEW_ATOL


def nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.name: node for node in model.graph.node}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def attribute(node: onnx.NodeProto, name: str, default=None):
    found = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else default


@pytest.fixture(scope="module")
def w4a4(calibrated, tmp_path_factory, export_tile):
    """The W4A4 per-tensor trt-int8 model and its export (path, result, proto)."""
    made = calibrated(w_bits=4, a_bits=4)
    path = tmp_path_factory.mktemp("export") / "w4a4.onnx"
    result = export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile))
    return made, path, result, onnx.load(str(path))


def test_graph_contract_and_metadata(w4a4, export_tile):
    made, path, result, model = w4a4
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "output"
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(inp) == ["batch", 3, export_tile, export_tile]
    assert dims(out) == ["batch", 3, 2 * export_tile, 2 * export_tile]
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == TensorProto.FLOAT
    meta = ExportMetadata.read(path)
    assert meta.to_props() == result.metadata == {p.key: p.value for p in model.metadata_props}
    assert meta.checkpoint_sha256 == sha256_file(made.checkpoint)
    assert meta.artifact_sha256 == sha256_file(made.artifact)
    assert meta.quant_config == json.loads(json.dumps(load_artifact(made.artifact).meta["quant_config"]))
    # spandrel's SwinIR pads to its window itself: LR sides need no multiple (1), only its minimum
    assert (meta.tile, meta.scale, meta.multiple, meta.batch) == (export_tile, 2, 1, None)
    assert (meta.target, meta.float_dtype, meta.arch, meta.opset, meta.int4_block) == (
        "trt-int8", "fp32", "SwinIR", 21, None)
    info = info_of(made.model)
    assert (meta.scale, meta.multiple, meta.arch) == (info.scale, info.multiple_of, info.arch)
    assert meta.model_config == json.loads(json.dumps(info.hyperparameters))
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    assert lint_model(model) == [] and result.violations == []
    # simplification: masks, biases and shape arithmetic are folded away
    assert result.nodes < result.nodes_exported / 2
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Shape", "GatherND", "ConstantOfShape", "Expand", "Pad", "Identity", "Cast"}
    # the only Gathers left are data ops: spandrel's SwinIR picks q, k, v as qkv[0], qkv[1], qkv[2]
    consts = constants(model)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert sorted(consts[n.input[1]].item() for n in gathers) == [0, 0, 1, 1, 2, 2]  # two blocks
    for gather in gathers:
        assert ".attn/" in gather.name and gather.input[0] not in consts and consts[gather.input[1]].shape == ()


def test_graph_runs_any_batch(w4a4):
    """The batch stays dynamic through spandrel's window code (``int(windows.shape[0] / ...)``, which
    torch.export would fix at the trace's batch 2): every batch computes the fake-quant model's output,
    each tile as if it ran alone."""
    import onnxruntime as ort

    made, path, _, _ = w4a4
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):
        x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference = made.model(x).numpy()
        output = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(output - reference).max() <= EXPORT_GRAPH_ATOL, batch
        alone = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(batch)])
        np.testing.assert_allclose(output, alone, rtol=0, atol=1e-6)


def test_activation_grids_are_the_quantizers_grids(w4a4):
    made, _, _, model = w4a4
    by_name, consts = nodes(model), constants(model)
    activations = {n: q for n, q in quantizers(made.model).items() if q.kind == "activation"}
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(activations)
    for name, quantizer in activations.items():
        clip, quant = by_name[f"{name}/Clip"], by_name[f"{name}/QuantizeLinear"]
        dequant = by_name[f"{name}/DequantizeLinear"]
        step, zero_point = quantizer.step_and_zero_point()
        low, high = grid.clip_values(step, zero_point, quantizer.bits)
        assert consts[clip.input[1]] == np.float32(low.item()) and consts[clip.input[2]] == np.float32(high.item())
        assert quant.input[0] == clip.output[0] and dequant.input[0] == quant.output[0]
        assert consts[quant.input[1]].shape == () and consts[quant.input[1]] == np.float32(step.item())
        zero = consts[quant.input[2]]
        assert zero.dtype == np.int8 and zero.shape == () and zero == 0
        assert dequant.input[1:] == quant.input[1:]


def test_weights_are_integer_initializers(w4a4):
    made, _, _, model = w4a4
    by_name, consts = nodes(model), constants(model)
    weights = {n: q for n, q in quantizers(made.model).items() if q.kind == "weight"}
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(weights) + sum(
        q.kind == "activation" for q in quantizers(made.model).values())
    linear = dict(made.model.named_modules())
    for name, quantizer in weights.items():
        dequant = by_name[f"{name}/DequantizeLinear"]
        codes = consts[dequant.input[0]]
        weight = linear[name.rsplit(".", 1)[0]].weight
        expected = grid.integer_codes(weight, quantizer.lower, quantizer.upper, quantizer.bits, quantizer.symmetric)
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, expected.t().numpy())  # (C_in, C_out): MatMul's B, atol 0
        step, _ = quantizer.step_and_zero_point()
        assert consts[dequant.input[1]] == np.float32(step.item()) and consts[dequant.input[2]] == 0
        (consumer,) = [n for n in model.graph.node if dequant.output[0] in n.input]
        assert consumer.op_type == "MatMul" and list(consumer.input).index(dequant.output[0]) == 1


def test_per_channel_weights_use_output_channel_axis(calibrated, tmp_path, export_tile):
    made = calibrated(w_bits=3, a_bits=5, weight_granularity="per-channel")
    path = tmp_path / "w3a5_pc.onnx"
    export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile))
    model = onnx.load(str(path))
    by_name, consts = nodes(model), constants(model)
    modules = dict(made.model.named_modules())
    for name, quantizer in quantizers(made.model).items():
        if quantizer.kind != "weight":
            continue
        dequant = by_name[f"{name}/DequantizeLinear"]
        weight = modules[name.rsplit(".", 1)[0]].weight
        step, _ = quantizer.step_and_zero_point()
        assert attribute(dequant, "axis") == 1
        np.testing.assert_array_equal(consts[dequant.input[1]], step.reshape(-1).detach().numpy())
        assert consts[dequant.input[1]].shape == (weight.shape[0],)
        expected = grid.integer_codes(weight, quantizer.lower, quantizer.upper, 3)
        np.testing.assert_array_equal(consts[dequant.input[0]], expected.t().numpy())
    assert lint_model(model) == []


def test_trt_int4_weights_are_padded_int4_blocks(calibrated, tmp_path, export_tile):
    made = calibrated(w_bits=4, a_bits=8, target="trt-int4", weight_granularity="per-channel")
    path = tmp_path / "w4_int4.onnx"
    result = export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile, int4_block=64))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert (ExportMetadata.read(path).float_dtype, ExportMetadata.read(path).int4_block) == ("fp16", 64)
    by_name = nodes(model)
    tensors = {t.name: t for t in model.graph.initializer}
    modules = dict(made.model.named_modules())
    weights = {n: q for n, q in quantizers(made.model).items() if q.kind == "weight"}
    assert weights and all(q.kind == "weight" for q in quantizers(made.model).values())  # weight-only
    for name, quantizer in weights.items():
        dequant = by_name[f"{name}/DequantizeLinear"]
        assert attribute(dequant, "block_size") == 64 and attribute(dequant, "axis") == 0
        codes, scale = tensors[dequant.input[0]], tensors[dequant.input[1]]
        assert codes.data_type == TensorProto.INT4 and tensors[dequant.input[2]].data_type == TensorProto.INT4
        weight = modules[name.rsplit(".", 1)[0]].weight  # (C_out, C_in)
        c_out, c_in = weight.shape
        padded = -(-c_in // 64) * 64
        assert list(codes.dims) == [padded, c_out] and list(scale.dims) == [padded // 64, c_out]
        assert scale.data_type == TensorProto.FLOAT16
        values = numpy_helper.to_array(codes).astype(np.int8)
        expected = grid.integer_codes(weight, quantizer.lower, quantizer.upper, 4, True).t().numpy()
        np.testing.assert_array_equal(values[:c_in], expected)
        assert not values[c_in:].any()  # zero rows: padded inputs contribute nothing
        (matmul,) = [n for n in model.graph.node if dequant.output[0] in n.input]
        pad = next(n for n in model.graph.node if n.output[0] == matmul.input[0])
        assert pad.op_type == "Pad"
        pads = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == pad.input[1]))
        assert pads[-1] == padded - c_in and not np.delete(pads, [pads.size // 2 - 1, pads.size - 1]).any()
    assert result.op_counts.get("QuantizeLinear", 0) == 0
    assert any(n.op_type == "Cast" for n in model.graph.node)  # fp32 I/O around an fp16 body
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert lint_model(model) == []


def test_fp16_float_layers(w4a4, calibrated, tmp_path, export_tile):
    made = calibrated(w_bits=4, a_bits=4)
    path = tmp_path / "w4a4_fp16.onnx"
    export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile, float_dtype="fp16"))
    model = onnx.load(str(path))
    scales = [t for t in model.graph.initializer if t.name in {n.input[1] for n in model.graph.node
                                                               if n.op_type == "QuantizeLinear"}]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert ExportMetadata.read(path).float_dtype == "fp16"


def test_export_view_computes_the_fake_quant_model(calibrated):
    made = calibrated(w_bits=4, a_bits=4)
    view = build_export_view(made.model)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (view(x) - made.model(x)).abs().max().item() <= EXPORT_VIEW_ATOL


def test_export_is_deterministic_and_cli_writes_it(w4a4, tmp_path, export_tile, capsys):
    made, first, _, _ = w4a4
    again = tmp_path / "again.onnx"
    report = tmp_path / "export.json"
    code = export_main(["--onnx", str(again), "--weights", str(made.checkpoint), "--calib", str(made.artifact),
                        "--tile", str(export_tile), "--json", str(report), "-q"])
    assert code == 0
    assert again.read_bytes() == first.read_bytes()
    summary = json.loads(report.read_text())
    assert summary["nodes"] < summary["nodes_exported"] and summary["violations"] == []
    assert "after simplification" in capsys.readouterr().out


def test_refuses_artifact_of_another_checkpoint(calibrated, tmp_path, export_tile):
    made = calibrated(w_bits=4, a_bits=4)
    foreign = tmp_path / "foreign.safetensors"  # the same architecture with one bias changed
    model = load_model(made.checkpoint)
    with torch.no_grad():
        model.conv_first.bias.add_(1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(foreign))
    out = tmp_path / "never.onnx"
    with pytest.raises(ArtifactError, match="checkpoint mismatch"):
        export_onnx(foreign, made.artifact, out, ExportOptions(tile=export_tile))
    assert not out.exists() and not list(tmp_path.glob(".never.onnx*"))
    assert export_main(["--onnx", str(out), "--weights", str(foreign), "--calib", str(made.artifact), "-q"]) == 1


def test_bad_options_are_refused(calibrated, tmp_path):
    made = calibrated(w_bits=4, a_bits=4)
    out = tmp_path / "never.onnx"
    with pytest.raises(ValueError, match="tile 12 .* at least its minimum 16"):  # spandrel's SwinIR: 16 minimum
        export_onnx(made.checkpoint, made.artifact, out, ExportOptions(tile=12))
    with pytest.raises(ValueError, match="opset"):
        ExportOptions(opset=17)
    with pytest.raises(ValueError, match="trt-int4 .* needs opset >= 21"):
        ExportOptions(target="trt-int4", opset=19).resolved("trt-int8")
    with pytest.raises(ValueError, match="fp16 float layers need opset >= 19"):
        ExportOptions(float_dtype="fp16", opset=18).resolved("trt-int8")
    with pytest.raises(ValueError, match="4-bit symmetric"):
        export_onnx(made.checkpoint, made.artifact, out, ExportOptions(tile=16, target="trt-int4"))
    assert not out.exists()
    assert export_main(["--onnx", str(out), "--weights", str(made.checkpoint)]) == 2  # no --calib


def test_lint_violations_fail_the_export_unless_disabled(calibrated, tmp_path, export_tile):
    # conv weights quantized but the first conv's input left float: TensorRT's both-inputs rule
    made = calibrated(w_bits=8, a_bits=8, quantize=["linear", "matmul", "conv"], exclude=["conv_first.input"])
    out = tmp_path / "convs.onnx"
    with pytest.raises(ExportLintError, match=r"\[matmul-both-inputs\] conv_first/Conv"):
        export_onnx(made.checkpoint, made.artifact, out, ExportOptions(tile=export_tile))
    assert not out.exists()
    result = export_onnx(made.checkpoint, made.artifact, out, ExportOptions(tile=export_tile, lint=False))
    assert out.exists() and [v.rule for v in result.violations] == ["matmul-both-inputs"]


def test_lint_only_command(w4a4, tmp_path, capsys):
    _, path, _, _ = w4a4
    assert export_main(["--lint-only", str(path)]) == 0
    assert "0 violation(s)" in capsys.readouterr().out
    broken = onnx.load(str(path))
    broken.opset_import[0].version = 12
    bad = tmp_path / "bad.onnx"
    onnx.save(broken, str(bad))
    assert export_main(["--lint-only", str(bad), "--json", str(tmp_path / "lint.json")]) == 1
    assert json.loads((tmp_path / "lint.json").read_text())["violations"][0]["rule"] == "opset"


def test_older_opset_for_int8_graphs(calibrated, tmp_path, export_tile):
    made = calibrated(w_bits=8, a_bits=8)
    path = Path(tmp_path) / "w8a8_op18.onnx"
    export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile, opset=18))
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain == "") == 18
    onnx.checker.check_model(model, full_check=True)
    assert lint_model(model) == []


@pytest.mark.slow
def test_ngswin_exports_through_the_same_path(tmp_path):
    """The export is model-agnostic: a tiny NGswin (cosine attention, N-gram context) exports, lints
    clean and runs in ONNX Runtime like its fake-quant model."""
    import onnxruntime as ort

    from calib.baselines import calibrate_minmax
    from export.onnx_export import Provenance, to_onnx
    from toolchain.loading import load_state_dict_model
    from toolchain.models.ngswin import NGswin
    from toolchain.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    net = NGswin(scale=2, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 1), dec_depth=1, dec_num_heads=1,
                 window_size=4)
    model = load_state_dict_model(net.state_dict(), "tiny NGswin")  # as a user loads it: with its ModelInfo
    config = QuantConfig(w_bits=4, a_bits=4)
    quantize_model(model, config)
    calibrate_minmax(model, lambda m: m(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))))
    proto, result = to_onnx(model, ExportOptions(tile=32), Provenance("0" * 64, "0" * 64, config.to_dict()))
    calls = []  # the N-gram attention runs twice per block (both directions): one Q/DQ per call
    hooks = [q.register_forward_pre_hook(lambda *_: calls.append(1)) for q in quantizers(model).values()
             if q.kind == "activation"]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x).clamp(0, 1)
    for hook in hooks:
        hook.remove()
    assert result.violations == [] and result.op_counts["QuantizeLinear"] == len(calls)
    assert not {"Shape", "Expand"} & set(result.op_counts)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    output = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).clamp(0, 1)
    identical = (torch.round(output * 255) == torch.round(reference * 255)).float().mean().item()
    assert identical >= 0.99


def test_quiet_export_of_atd_prints_no_third_party_warnings(tmp_path, capfd) -> None:
    """onnx_ir warns about an empty attribute while exporting ATD's graph: ``2dq-export -q`` (errors only) shows none
    of it, the default level still does."""
    import calib
    from export.cli import main as export_main
    from toolchain import load_model
    from toolchain.quant import QuantConfig

    from ..tiny_models import save_checkpoint, tiny_atd

    checkpoint = save_checkpoint(tiny_atd(), tmp_path / "atd.safetensors")
    qmodel = calib.quantize(load_model(checkpoint), QuantConfig(), lambda m: m(torch.rand(2, 3, 32, 32)))
    artifact = tmp_path / "q.safetensors"
    calib.save(qmodel, artifact, checkpoint=checkpoint)
    common = ["--onnx", str(tmp_path / "q.onnx"), "--weights", str(checkpoint), "--calib", str(artifact), "--tile", "32"]
    assert export_main([*common, "-q"]) == 0
    assert "WARNING" not in capfd.readouterr().err
    assert export_main(common) == 0
    assert "WARNING onnx_ir" in capfd.readouterr().err


def test_a_tile_the_model_pads_beyond_says_so(tmp_path) -> None:
    """GRL reflection-pads its input to a multiple of 64 (its eager forward falls back to zeros where the tile is
    smaller than the padding, which tracing cannot): the export at tile 32 fails naming the cure, and writes nothing."""
    import calib
    from export.api import export_onnx as export_qmodel
    from toolchain.quant import QuantConfig

    from ..tiny_models import tiny_grl

    qmodel = calib.quantize(tiny_grl(), QuantConfig(), lambda m: m(torch.rand(2, 3, 32, 32)))
    with pytest.raises(RuntimeError, match="failed at tile 32: the model pads its input .* use a larger --tile"):
        export_qmodel(qmodel, tmp_path / "grl.onnx", tile=32)
    assert not (tmp_path / "grl.onnx").exists()
