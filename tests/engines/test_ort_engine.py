"""ONNX Runtime engines: integer kernels really used, codes and outputs equal to the fake-quant model
at every bit width, blocked int4 weights, the tile runner, and 2dq-build-engine."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from engines.cli_build import main as build_main
from engines.ort_engine import OrtTileRunner, build_ort_engine, op_counts
from export.metadata import ExportMetadata
from export.speed_passes import DEFAULT_PASSES
from toolchain.files import sha256_file
from toolchain.metrics import output_difference
from toolchain.models import info_of
from toolchain.quant import grid, quantizers
from toolchain.tolerances import CODE_ATOL, ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ..export.conftest import DAT_TILE, TILE, tiny_dat_export


def outputs_agree(engine_out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Whole-model agreement (ARCHITECTURE.md s. 7): PSNR of the clamped outputs, share of identical uint8 values."""
    difference = output_difference(engine_out, reference)
    return difference.psnr, difference.identical_pixels


def quantizer_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each activation quantizer sees when ``model`` runs ``x``."""
    seen, hooks = {}, []
    for name, quantizer in quantizers(model).items():
        if quantizer.kind == "activation":
            hooks.append(quantizer.register_forward_pre_hook(
                lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def onnx_codes(model: onnx.ModelProto, name: str, x: torch.Tensor) -> np.ndarray:
    """Run the exported ``<name>/Clip -> <name>/QuantizeLinear`` of one quantizer in ORT on ``x``."""
    by_name = {n.name: n for n in model.graph.node}
    clip, quant = by_name[f"{name}/Clip"], by_name[f"{name}/QuantizeLinear"]
    consts = {t.name: t for t in model.graph.initializer}
    used = [consts[i] for i in [*clip.input[1:], *quant.input[1:]]]
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", *clip.input[1:]], ["c"]), helper.make_node("QuantizeLinear", ["c", *quant.input[1:]], ["q"])],
        "one_quantizer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", onnx.TensorProto.INT8, list(x.shape))], used)
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def test_build_fuses_qdq_into_integer_kernels(built):
    made = built(loud=True, w_bits=4, a_bits=4)
    source = onnx.load(str(made.onnx))
    producers = {n.output[0]: n.op_type for n in source.graph.node}
    quantized = [n for n in source.graph.node if n.op_type == "MatMul"
                 and all(producers.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(quantized) == 12  # per block: qkv, proj, fc1, fc2 and both attention matmuls
    assert made.build.integer_kernels == {"com.microsoft:MatMulIntegerToFloat": len(quantized)}
    assert "DequantizeLinear" not in made.build.engine_ops  # every DQ was absorbed by a kernel
    engine = onnx.load(str(made.engine))
    assert op_counts(engine) == made.build.engine_ops
    meta = {p.key: p.value for p in engine.metadata_props}
    assert meta["2dq.engine.source_sha256"] == sha256_file(made.onnx) and meta["2dq.engine.level"] == "extended"
    runner = OrtTileRunner(made.engine, threads=2)
    # spandrel's SwinIR pads to its window itself: its LR sides need no multiple (1)
    assert (runner.tile, runner.scale, runner.multiple) == (16, 2, 1)
    assert (runner.scale, runner.multiple) == (info_of(made.model).scale, info_of(made.model).multiple_of)


def test_bias_adds_move_into_the_integer_kernels(built, tile_batch, tmp_path):
    """qkv, proj and fc2 biases become MatMulIntegerToFloat's bias input (fc1's goes into BiasGelu);
    the engine computes the same as ORT's own optimized graph with the separate adds."""
    made = built(loud=True, w_bits=8, a_bits=8)
    engine = onnx.load(str(made.engine))
    kernels = [n for n in engine.graph.node if n.op_type == "MatMulIntegerToFloat"]
    with_bias = [n for n in kernels if len(n.input) == 7 and n.input[6]]
    assert made.build.fused_bias_adds == len(with_bias) == 6  # 2 blocks x (qkv, proj, fc2)
    consts = {t.name: t for t in engine.graph.initializer}
    for node in with_bias:
        assert list(consts[node.input[6]].dims) == [consts[node.input[1]].dims[1]]
    kernel_outputs = {n.output[0] for n in kernels}
    vectors = {name for name, t in consts.items() if len(t.dims) == 1}
    assert not any(n.op_type == "Add" and set(n.input) & kernel_outputs and set(n.input) & vectors
                   for n in engine.graph.node)  # the attention's position-bias adds (4-D) stay
    unfused = tmp_path / "unfused.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(unfused)
    ort.InferenceSession(str(made.onnx), options, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "Add" for n in onnx.load(str(unfused)).graph.node) \
        == made.build.engine_ops["Add"] + made.build.fused_bias_adds
    fused_out = OrtTileRunner(made.engine, threads=1)(tile_batch)
    plain_out = OrtTileRunner(unfused, threads=1)(tile_batch)
    torch.testing.assert_close(fused_out, plain_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", range(2, 9))
def test_engine_equals_fake_quant(built, tile_batch, loud_float_engine, perturbed, bits):
    """Codes of every quantizer and the whole output, on the loud model (quantization shows: on the plain tiny
    model a float engine clears the whole-model check at W8A8, 93.8 dB, 99.65 % identical). Both checks fail
    the broken engines: the float engine (measured 18.7 dB at W2A2 ... 52.5 dB at W8A8) and the export with its
    first quantizer's scale one step wider (19.1 ... 58.2 dB; its codes differ at that quantizer)."""
    made = built(loud=True, w_bits=bits, a_bits=bits)
    model = onnx.load(str(made.onnx))
    for name, x in quantizer_inputs(made.model, tile_batch).items():
        quantizer = quantizers(made.model)[name]
        expected = grid.integer_codes(x, quantizer.lower, quantizer.upper, bits, quantizer.symmetric).numpy()
        codes = onnx_codes(model, name, x)
        assert np.abs(codes.astype(int) - expected).max() <= CODE_ATOL, name
    runner = OrtTileRunner(made.engine, threads=2)
    with torch.no_grad():
        reference = made.model(tile_batch)
    db, identical = outputs_agree(runner(tile_batch), reference)
    assert db >= ORT_MIN_PSNR and identical >= ORT_MIN_IDENTICAL, (bits, db, identical)
    broken = perturbed(made)
    quantizer, x = quantizers(made.model)[broken.quantizer], quantizer_inputs(made.model, tile_batch)[broken.quantizer]
    expected = grid.integer_codes(x, quantizer.lower, quantizer.upper, bits, quantizer.symmetric).numpy()
    codes = onnx_codes(onnx.load(str(broken.graph)), broken.quantizer, x)
    assert np.abs(codes.astype(int) - expected).max() > CODE_ATOL  # the per-quantizer check fails the perturbed export
    for engine in (loud_float_engine, broken.engine):
        db, identical = outputs_agree(OrtTileRunner(engine, threads=2)(tile_batch), reference)
        assert db < ORT_MIN_PSNR and identical < ORT_MIN_IDENTICAL, (bits, engine.name, db, identical)


def test_mixed_precision_engine_equals_fake_quant(built, tile_batch, loud_float_engine):
    """``bits_overrides``: block 1 at W8A8 inside a W3A3 model; every quantizer exports its own grid. Loud: the
    float engine fails the whole-model check (measured 26.8 dB, 13 % identical)."""
    from export.lint import lint_model

    made = built(loud=True, w_bits=3, a_bits=3, bits_overrides=("*.blocks.1.*=8",))
    model = onnx.load(str(made.onnx))
    assert lint_model(model) == []
    found = quantizers(made.model)
    assert {q.bits for n, q in found.items() if ".blocks.1." in n} == {8}
    assert {q.bits for n, q in found.items() if ".blocks.0." in n} == {3}
    for name, x in quantizer_inputs(made.model, tile_batch).items():
        quantizer = found[name]
        expected = grid.integer_codes(x, quantizer.lower, quantizer.upper, quantizer.bits, quantizer.symmetric).numpy()
        assert np.abs(onnx_codes(model, name, x).astype(int) - expected).max() <= CODE_ATOL, name
    with torch.no_grad():
        reference = made.model(tile_batch)
    db, identical = outputs_agree(OrtTileRunner(made.engine, threads=2)(tile_batch), reference)
    assert db >= ORT_MIN_PSNR and identical >= ORT_MIN_IDENTICAL, (db, identical)
    db, identical = outputs_agree(OrtTileRunner(loud_float_engine, threads=2)(tile_batch), reference)
    assert db < ORT_MIN_PSNR and identical < ORT_MIN_IDENTICAL, (db, identical)


def test_int4_weight_only_graph_runs_in_ort(built, tile_batch, loud_float_engine):
    """Blocked int4 weights, float activations. Loud: the float engine fails the whole-model check (measured
    36.7 dB, 20 % identical)."""
    made = built(float_dtype="fp32", loud=True, w_bits=4, a_bits=4, target="trt-int4", weight_granularity="per-channel")
    source = onnx.load(str(made.onnx))
    assert any(t.data_type == onnx.TensorProto.INT4 for t in source.graph.initializer)
    assert made.build.integer_kernels == {"com.microsoft:MatMulNBits": 8}  # the 8 linears, blocked int4
    with torch.no_grad():
        reference = made.model(tile_batch)
    db, identical = outputs_agree(OrtTileRunner(made.engine, threads=2)(tile_batch), reference)
    assert db >= ORT_MIN_PSNR and identical >= ORT_MIN_IDENTICAL, (db, identical)
    db, identical = outputs_agree(OrtTileRunner(loud_float_engine, threads=2)(tile_batch), reference)
    assert db < ORT_MIN_PSNR and identical < ORT_MIN_IDENTICAL, (db, identical)


def test_ort_format_engine(built, tile_batch, tmp_path):
    made = built(loud=True, w_bits=4, a_bits=4)
    ort_file = tmp_path / "engine.ort"
    build_ort_engine(made.onnx, ort_file, threads=2)
    assert ort_file.read_bytes()[4:8] == b"ORTM"  # ORT format's flatbuffer identifier
    from_ort, from_onnx = OrtTileRunner(ort_file, threads=2), OrtTileRunner(made.engine, threads=2)
    assert from_ort.tile == 16
    torch.testing.assert_close(from_ort(tile_batch), from_onnx(tile_batch), rtol=0, atol=1e-6)


def test_runner_refuses_what_it_cannot_run(built, tmp_path):
    made = built(loud=True, w_bits=4, a_bits=4)
    runner = OrtTileRunner(made.engine, threads=2)
    with pytest.raises(ValueError, match=r"expected tiles \(N, 3, 16, 16\)"):
        runner(torch.rand(1, 3, 24, 24))
    plain = onnx.load(str(made.onnx))
    del plain.metadata_props[:]
    stripped = tmp_path / "no_meta.onnx"
    onnx.save(plain, str(stripped))
    with pytest.raises(ValueError, match=r"no_meta\.onnx: metadata 2dq\.arch missing \(not a 2dq export"):
        OrtTileRunner(stripped)
    with pytest.raises(ValueError, match="not a 2dq export"):
        build_ort_engine(stripped, tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        OrtTileRunner(tmp_path / "missing.onnx")


def test_build_engine_command(built, tmp_path, capsys):
    made = built(loud=True, w_bits=4, a_bits=4)
    out, report = tmp_path / "cli_engine.onnx", tmp_path / "build.json"
    assert build_main(["--backend", "ort", "--onnx", str(made.onnx), "--out", str(out), "--threads", "2",
                       "--json", str(report), "-q"]) == 0
    assert "MatMulIntegerToFloat" in capsys.readouterr().out
    summary = json.loads(report.read_text())
    assert summary["build"]["integer_kernels"] == {"com.microsoft:MatMulIntegerToFloat": 12}
    assert build_main(["--onnx", str(made.onnx), "--out", str(out), "--verify"]) == 2  # needs --weights etc.


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_fails_clearly(built, tmp_path, capsys):
    made = built(loud=True, w_bits=4, a_bits=4)
    code = build_main(["--backend", "trt", "--onnx", str(made.onnx), "--out", str(tmp_path / "x.plan")])
    assert code == 1
    assert "tensorrt" in capsys.readouterr().err.lower()


def test_static_batch_engine_pads_and_matches(built, tile_batch, tmp_path):
    """A graph traced for a fixed number of tiles (``ExportOptions(batch=3)``, what a model whose code fixes
    the batch gets) builds, runs any number of tiles by padding, and equals the dynamic engine; a dynamic
    engine fed the same tiles agrees, and feeding a static graph directly with another batch fails."""
    from export.onnx_export import ExportOptions, export_onnx

    made = built(loud=True, w_bits=4, a_bits=4)
    static_onnx = tmp_path / "static.onnx"
    result = export_onnx(made.checkpoint, made.artifact, static_onnx, ExportOptions(tile=TILE, batch=3))
    assert ExportMetadata.from_props(result.metadata, static_onnx).batch == 3
    assert onnx.load(str(static_onnx)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    engine = tmp_path / "static.ort.onnx"
    build_ort_engine(static_onnx, engine)
    static, dynamic = OrtTileRunner(engine, threads=1), OrtTileRunner(made.engine, threads=1)
    assert static.static_batch == 3 and dynamic.static_batch is None
    for count in (1, 3, 5, 8):
        torch.testing.assert_close(static(tile_batch[:count]), dynamic(tile_batch[:count]), rtol=0, atol=1e-5)
    with pytest.raises(Exception):
        static.session.run(["output"], {"input": tile_batch[:2].numpy()})


def test_default_graph_passes_change_the_graph_not_the_engine_output(tmp_path):
    """The builders' exact passes (export.speed_passes: one Transpose per chain of movements) rewrite a tiny
    DAT's head splits and leave ORT's output bit-identical to the engine built without them; OpenVINO alike."""
    graph = tiny_dat_export(tmp_path / "dat.onnx")
    tiles = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(4))
    passes = build_ort_engine(graph, tmp_path / "passes.ort.onnx", threads=2)
    plain = build_ort_engine(graph, tmp_path / "plain.ort.onnx", threads=2, graph_passes=())
    assert passes.graph_passes["compose_movements"] > 0 and plain.graph_passes == {}
    assert passes.engine_ops["Transpose"] < plain.engine_ops["Transpose"]
    assert torch.equal(OrtTileRunner(passes.engine, threads=2)(tiles), OrtTileRunner(plain.engine, threads=2)(tiles))
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine

    runs = {}
    for name, passes in (("passes", DEFAULT_PASSES), ("plain", ())):
        build = build_openvino_engine(graph, tmp_path / f"{name}.ov.xml", threads=2, graph_passes=passes)
        assert bool(build.graph_passes) == bool(passes)
        runs[name] = OpenVinoTileRunner(build.engine, threads=2)(tiles)
    assert torch.equal(runs["passes"], runs["plain"])


def test_graph_passes_flag(built, tmp_path, capsys):
    made = built(loud=True, w_bits=4, a_bits=4)
    out = tmp_path / "e.ort.onnx"
    assert build_main(["--onnx", str(made.onnx), "--out", str(out), "--graph-passes", "none", "-q",
                       "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["build"]["graph_passes"] == {}
    assert build_main(["--onnx", str(made.onnx), "--out", str(out), "--graph-passes", "compose_movements,nope"]) == 2
    assert "--graph-passes: unknown pass nope" in capsys.readouterr().err
