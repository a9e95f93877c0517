"""OpenVINO engines: the QDQ export converted to IR runs the quantized model on the CPU plugin.

The engine-against-reference checks on a model whose quantization shows (and their negative
controls: the float graph and a perturbed scale) are in ``test_negative_controls.py``.
"""
from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch

from engines.cli_build import main as build_main
from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine, ir_weights
from export.metadata import ExportMetadata
from toolchain.cli.eval import main as eval_main
from toolchain.extras import MissingExtraError
from toolchain.metrics import output_difference
from toolchain.tolerances import ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ..export.conftest import TILE

pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra (pip install '2dq[openvino]')")


@pytest.fixture(scope="module")
def w8a8(built, tmp_path_factory):
    made = built(w_bits=8, a_bits=8)
    engine = tmp_path_factory.mktemp("openvino") / "w8a8.ov.xml"
    return made, engine, build_openvino_engine(made.onnx, engine, threads=2)


def test_build_writes_ir_with_the_exports_metadata_and_int8_layers(w8a8):
    made, engine, build = w8a8
    assert sorted(p.name for p in engine.parent.iterdir()) == ["w8a8.ov.bin", "w8a8.ov.xml"]  # no temporary left
    assert build.weights == str(ir_weights(engine))
    assert build.int8_layers.get("FullyConnected") == 8   # every linear of the two blocks runs in int8
    runner = OpenVinoTileRunner(engine, threads=2)
    assert runner.export == ExportMetadata.read(made.onnx)
    assert runner.metadata["2dq.engine.source_sha256"] == build.source_sha256
    assert (runner.tile, runner.scale) == (TILE, 2)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_engine_equals_fake_quant(built, tile_batch, loud_float_engine, perturbed, tmp_path, bits):
    """On the loud model (quantization shows: its float graph is 18-53 dB from the reference) the OpenVINO
    engine meets the ORT floors; the same model's float graph and its export with one scale one step wider,
    converted the same way, fail them."""
    made = built(loud=True, w_bits=bits, a_bits=bits)
    with torch.no_grad():
        reference = made.model(tile_batch)

    def agreement(graph, name):
        build = build_openvino_engine(graph, tmp_path / f"{name}.xml", threads=2)
        return build, output_difference(OpenVinoTileRunner(tmp_path / f"{name}.xml", threads=2)(tile_batch), reference)

    build, difference = agreement(made.onnx, "engine")
    assert build.int8_layers
    assert difference.psnr >= ORT_MIN_PSNR and difference.identical_pixels >= ORT_MIN_IDENTICAL, (bits, difference)
    for name, graph in (("float", loud_float_engine.with_name("float.onnx")), ("perturbed", perturbed(made).graph)):
        _, broken = agreement(graph, name)
        assert broken.psnr < ORT_MIN_PSNR, (bits, name, broken)


def test_fixed_batch_pads_the_last_call(w8a8, tile_batch):
    """The compiled batch is static: 8 tiles in calls of 3 (the last padded) equal one call of 8."""
    _, engine, _ = w8a8
    torch.testing.assert_close(OpenVinoTileRunner(engine, batch=3)(tile_batch),
                               OpenVinoTileRunner(engine, batch=8)(tile_batch), rtol=0, atol=1e-6)


def test_a_qdq_export_runs_directly(w8a8, tile_batch):
    made, engine, _ = w8a8
    torch.testing.assert_close(OpenVinoTileRunner(made.onnx, threads=2)(tile_batch),
                               OpenVinoTileRunner(engine, threads=2)(tile_batch), rtol=0, atol=1e-6)


def test_refuses_what_it_cannot_build_or_run(w8a8, tmp_path):
    made, engine, _ = w8a8
    with pytest.raises(ValueError, match=r"name it <name>\.xml"):
        build_openvino_engine(made.onnx, tmp_path / "e.onnx")
    plain = onnx.load(str(made.onnx))
    del plain.metadata_props[:]
    stripped = tmp_path / "no_meta.onnx"
    onnx.save(plain, str(stripped))
    with pytest.raises(ValueError, match="not a 2dq export"):
        build_openvino_engine(stripped, tmp_path / "x.xml")
    assert not (tmp_path / "x.xml").exists() and not (tmp_path / "x.bin").exists()
    with pytest.raises(ValueError, match=r"no_meta\.onnx: metadata 2dq\.arch missing"):
        OpenVinoTileRunner(stripped)
    with pytest.raises(FileNotFoundError):
        OpenVinoTileRunner(tmp_path / "missing.xml")
    with pytest.raises(ValueError, match=r"expected tiles \(N, 3, 16, 16\)"):
        OpenVinoTileRunner(engine, batch=2)(torch.rand(1, 3, 24, 24))


def _runtime_precisions(runner: OpenVinoTileRunner) -> set[str]:
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in runner.compiled.get_runtime_model().get_ops()}


def test_bf16_float_layers_are_an_option_the_engine_records(w8a8, tile_batch, tmp_path):
    """``float_precision="bf16"`` is stored in the IR: every runner of it compiles the float layers in bf16
    (the f32 engine has none), and its output differs from the f32 engine's; the default stays f32."""
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 arithmetic for OpenVINO")
    made, engine, build = w8a8
    half = tmp_path / "bf16.ov.xml"
    assert build_openvino_engine(made.onnx, half, threads=2, float_precision="bf16").float_precision == "bf16"
    runner, exact = OpenVinoTileRunner(half, threads=2), OpenVinoTileRunner(engine, threads=2)
    assert (runner.float_precision, exact.float_precision, build.float_precision) == ("bf16", "f32", "f32")
    assert runner.metadata["2dq.engine.float_precision"] == "bf16"
    assert "bf16" in _runtime_precisions(runner) and "bf16" not in _runtime_precisions(exact)
    assert not torch.equal(runner(tile_batch), exact(tile_batch))


def test_float_precision_is_checked(w8a8, tmp_path, capsys):
    made, _, _ = w8a8
    with pytest.raises(ValueError, match=r"float precision 'fp16': expected one of f32, bf16"):
        build_openvino_engine(made.onnx, tmp_path / "e.xml", float_precision="fp16")
    assert not (tmp_path / "e.xml").exists()
    assert build_main(["--backend", "ort", "--onnx", str(made.onnx), "--out", str(tmp_path / "e.onnx"),
                       "--float-precision", "bf16"]) == 2
    assert "--float-precision bf16 is an OpenVINO option" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()


def test_without_openvino_the_backend_says_how_to_install_it(w8a8, tmp_path, monkeypatch):
    made, _, _ = w8a8
    monkeypatch.setitem(sys.modules, "openvino", None)  # what a missing package looks like to import
    with pytest.raises(MissingExtraError, match=r"needs openvino: pip install '2dq\[openvino\]'"):
        build_openvino_engine(made.onnx, tmp_path / "e.xml")


def test_build_verify_and_eval_commands(built, tmp_path, capsys):
    """``2dq-build-engine --backend openvino --verify`` passes the criterion; ``2dq-eval`` takes the IR by suffix."""
    made = built(w_bits=4, a_bits=4)
    engine, report = tmp_path / "w4a4.ov.xml", tmp_path / "build.json"
    assert build_main(["--backend", "openvino", "--onnx", str(made.onnx), "--out", str(engine), "--threads", "2",
                       "--verify", "--weights", str(made.checkpoint), "--calib", str(made.artifact),
                       "--noise-draws", "2", "--overlap", "4", "--no-progress", "--json", str(report), "-q"]) == 0
    summary = json.loads(report.read_text())
    assert summary["backend"] == "openvino" and summary["verification"]["passed"]
    assert summary["build"]["int8_layers"]
    results = tmp_path / "eval.json"
    assert eval_main(["--engine", str(engine), "--threads", "2", "--overlap", "4", "--no-progress", "--json", str(results), "-q"]) == 0
    (row,) = json.loads(results.read_text())["results"]
    # the same tiles as --verify's engine pass: 2dq-eval's PSNR is the verification's engine task PSNR
    assert row["set"] == "Set5" and row["scale"] == 2
    assert row["psnr"] == pytest.approx(summary["verification"]["task"]["engine_psnr"], abs=1e-6)
    capsys.readouterr()
