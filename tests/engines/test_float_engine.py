"""The float baseline through the tools: ``2dq-export --float`` writes the float model's graph (no Q/DQ, no artifact
recorded) and ``2dq-build-engine --verify`` holds its engine to the float model of ``--weights``, with the same
criterion as the quantized engines. On the loud tiny model, whose quantization shows, the float reference tells a
quantized engine apart: the same check fails the model's W4A4 engine."""
from __future__ import annotations

import json

import onnx
import pytest

from engines.cli_build import main as build
from engines.compare import Verdict, benchmark_images, verify_engine
from engines.ort_engine import OrtTileRunner
from export.cli import main as export
from export.metadata import ExportMetadata
from toolchain.tolerances import ORT_MIN_PSNR

from ..export.conftest import TILE


@pytest.fixture(scope="module")
def float_export(built, tmp_path_factory):
    made = built(loud=True, w_bits=4, a_bits=4)
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    assert export(["--float", "--weights", str(made.checkpoint), "--onnx", str(path), "--tile", str(TILE), "-q"]) == 0
    return made, path


def test_float_export_has_no_quantizer_and_records_no_artifact(float_export):
    made, path = float_export
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert {"MatMul", "Conv"} <= ops
    meta = ExportMetadata.read(path)
    assert meta.artifact_sha256 == "" and meta.quant_config == {} and meta.tile == TILE
    assert ExportMetadata.read(made.onnx).artifact_sha256   # the QDQ export of the same model records its artifact


def test_float_engine_passes_verify_against_the_float_model(float_export, datasets_dir, tmp_path):
    made, path = float_export
    engine, report = tmp_path / "float.ort.onnx", tmp_path / "build.json"
    assert build(["--onnx", str(path), "--out", str(engine), "--verify", "--weights", str(made.checkpoint),
                  "--data", str(datasets_dir), "--sets", "Set5", "--overlap", "4", "--noise-draws", "1", "--no-progress",
                  "--json", str(report), "-q"]) == 0
    record = json.loads(report.read_text())
    assert record["build"]["integer_kernels"] == {}   # a float engine
    verdict = record["verification"]
    assert verdict["passed"] and verdict["floor"] == ORT_MIN_PSNR


def test_the_float_reference_fails_the_quantized_engine(float_export, datasets_dir):
    """The negative control: the loud model's W4A4 engine, held to the float model as a float engine is."""
    made, _ = float_export
    images = benchmark_images(datasets_dir, ["Set5"], 2)[:2]
    agreement = verify_engine(OrtTileRunner(made.engine), made.checkpoint, None, images, overlap=4)
    verdict = Verdict(agreement, ORT_MIN_PSNR, None, 1.0, 0.0, None)
    assert not verdict.passed
    assert float(agreement.psnr_vs_reference) < ORT_MIN_PSNR - 10


def test_float_usage_errors_leave_nothing_behind(float_export, datasets_dir, tmp_path, capsys):
    made, path = float_export
    assert export(["--float", "--weights", str(made.checkpoint), "--calib", str(made.artifact),
                   "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "--float exports the float model" in capsys.readouterr().err
    engine = tmp_path / "e.ort.onnx"
    assert build(["--onnx", str(path), "--out", str(engine), "--verify", "--weights", str(made.checkpoint),
                  "--calib", str(made.artifact), "--data", str(datasets_dir), "--sets", "Set5"]) == 2
    assert "is a float export" in capsys.readouterr().err
    assert not engine.exists() and not (tmp_path / "x.onnx").exists()
