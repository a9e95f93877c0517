"""Profiling CPU engines: latency statistics, and the per-node precision split that shows integer work."""
from __future__ import annotations

import pytest

from engines.cpu_profile import format_cpu_report, latency_stats, profile_cpu_engine
from engines.ort_engine import build_ort_engine
from export.onnx_export import ExportOptions, Provenance, export_model
from toolchain import load_model

from ..export.conftest import TILE


def test_latency_stats_by_hand():
    stats = latency_stats([0.004, 0.001, 0.002, 0.003, 0.010])
    assert (stats.min, stats.median, stats.max) == pytest.approx((1.0, 3.0, 10.0))
    assert stats.mean == pytest.approx(4.0)
    assert stats.p90 == pytest.approx(7.6)        # numpy's linear interpolation between 4 and 10 ms


@pytest.fixture(scope="module")
def engines(built, tmp_path_factory):
    """The ORT engine of a W8A8 export, and of the same model exported unquantized (no integer work at all)."""
    made = built(w_bits=8, a_bits=8)
    folder = tmp_path_factory.mktemp("profile")
    float_onnx = folder / "float.onnx"
    export_model(load_model(made.checkpoint), float_onnx, ExportOptions(tile=TILE), Provenance("0" * 64, "", {}))
    float_engine = folder / "float.ort.onnx"
    build_ort_engine(float_onnx, float_engine, threads=1)
    return made, float_engine


def test_ort_profile_shows_the_integer_kernels_and_none_in_a_float_engine(engines):
    made, float_engine = engines
    report = profile_cpu_engine(made.engine, "ort", batch=2, duration=0.2, threads=1)
    assert report["calls"] >= 5 and report["tile"] == TILE and report["batch"] == 2
    assert report["latency"].min <= report["latency"].median <= report["latency"].max
    assert report["layers"]["by_precision"]["int8"] == made.build.integer_kernels["com.microsoft:MatMulIntegerToFloat"]
    assert "int8" in format_cpu_report(report)
    plain = profile_cpu_engine(float_engine, "ort", batch=2, duration=0.2, threads=1)
    assert "int8" not in plain["layers"]["by_precision"]


def test_openvino_profile_shows_int8_kernels(engines, tmp_path):
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    from engines.openvino_engine import build_openvino_engine

    made, _ = engines
    ir = tmp_path / "w8a8.ov.xml"
    build_openvino_engine(made.onnx, ir, threads=1)
    report = profile_cpu_engine(ir, "openvino", batch=1, duration=0.2, threads=1)
    assert report["layers"]["by_precision"].get("int8", 0) >= 8     # at least the 8 linears
    assert report["throughput_tiles_per_s"] > 0


def test_refuses_bad_arguments(engines):
    made, _ = engines
    with pytest.raises(ValueError, match="CPU profiling covers"):
        profile_cpu_engine(made.engine, "trt")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        profile_cpu_engine(made.engine, "ort", batch=0)
