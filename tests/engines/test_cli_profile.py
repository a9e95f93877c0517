"""``2dq-profile`` (engines/cli_profile.py) where it can run without trtexec: argument errors, a missing
trtexec, the report printed from real trtexec output (the reference transcript, see test_trtexec.py), and
CPU engines (ONNX Runtime, OpenVINO) profiled for real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engines.cli_profile import format_report, main
from engines.trt.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path
from engines.trt.trtexec import STANDARD_LOCATIONS, parse_performance_summary, summarize_layer_info

DATA = Path(__file__).parent / "data"
NO_STANDARD_TRTEXEC = not any(os.path.exists(p) for p in STANDARD_LOCATIONS)


def write_plan(tmp_path: Path) -> Path:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a real plan")
    sidecar_path(plan).write_text(
        json.dumps(
            {
                "format": SIDECAR_FORMAT,
                "version": SIDECAR_VERSION,
                "plan_sha256": "0" * 64,
                "onnx": {"sha256": "1" * 64},
                "tensorrt_version": "10.13.0.35",
                "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"},
                "precision": "int8",
                "tile": 64,
                "scale": 2,
                "input": {"name": "input"},
                "output": {"name": "output"},
                "profile": {"min_batch": 1, "opt_batch": 4, "max_batch": 8},
            }
        )
    )
    return plan


@pytest.mark.skipif(not NO_STANDARD_TRTEXEC, reason="a trtexec is installed in a standard location")
def test_missing_trtexec_exits_1_naming_the_search(tmp_path, monkeypatch, capsys):
    plan = write_plan(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main([str(plan)]) == 1
    err = capsys.readouterr().err
    assert "trtexec not found" in err and str(empty) in err and "--trtexec" in err


def test_explicit_trtexec_that_does_not_exist_exits_1(tmp_path, capsys):
    plan = write_plan(tmp_path)
    assert main([str(plan), "--trtexec", str(tmp_path / "trtexec")]) == 1
    assert f"--trtexec {tmp_path / 'trtexec'} is not an executable file" in capsys.readouterr().err


def test_missing_plan_and_bad_batch(tmp_path, capsys):
    assert main([str(tmp_path / "none.plan")]) == 1
    assert "engine not found" in capsys.readouterr().err
    assert main([str(write_plan(tmp_path)), "--batch", "0"]) == 2


def test_report_table_from_real_trtexec_output():
    summary = parse_performance_summary((DATA / "trtexec_transcript.txt").read_text())
    report = {
        "plan": "m.plan",
        "batch": 4,
        "tile": 64,
        "tensorrt_version": summary["tensorrt_version"],
        "timing": {"latency": summary["latency"], "gpu_compute": summary["gpu_compute"]},
        "throughput_qps": summary["throughput_qps"],
        "throughput_images_per_s": summary["throughput_qps"] * 4,
        "layers": summarize_layer_info(json.loads((DATA / "layer_info_sample.json").read_text())),
        "profile": None,
    }
    lines = format_report(report).splitlines()
    assert lines[0] == "m.plan  batch 4 x 3x64x64  (TensorRT 8.6.0)"
    assert lines[2].split() == ["latency", "0.049", "0.053", "0.052", "0.053", "0.054", "0.063", "0.617"]
    assert "21009.2 batches/s = 84036.8 tiles/s" in lines[4]
    assert lines[5] == "layers: 8 (FP16 4, FP32 2, INT8 2); reformat layers: 2"


def test_cpu_engine_profile_command(built, tmp_path, capsys):
    """An ORT engine profiled by the command: latency, throughput and its int8 kernels, as text and JSON."""
    made = built(w_bits=8, a_bits=8)
    out = tmp_path / "profile.json"
    assert main([str(made.engine), "--duration", "1", "--threads", "1", "--batch", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latency" in text and "int8" in text
    report = json.loads(out.read_text())
    assert report["backend"] == "ort" and report["batch"] == 2 and report["calls"] >= 5
    assert report["latency"]["min"] <= report["latency"]["median"] <= report["latency"]["max"]
    assert report["layers"]["by_precision"]["int8"] == made.build.integer_kernels["com.microsoft:MatMulIntegerToFloat"]
    assert main([str(made.engine), "--duration", "0"]) == 2
    assert main([str(tmp_path / "profile.json"), "--duration", "1"]) == 2   # not an engine suffix
