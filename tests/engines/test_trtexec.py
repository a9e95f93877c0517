"""trtexec command lines and output parsing (engines/trt/trtexec.py), without TensorRT.

Data files (tests/engines/data/), with their provenance:

- ``trtexec_transcript.txt``: real trtexec output, an excerpt of NVIDIA's published reference log
  ``cookbook/07-Tool/trtexec/result-03.log`` of https://github.com/NVIDIA/trt-samples-for-hackathon-cn
  (commit 32c8646ceae5eb115e0fbb4aeeb1b84913ae8daf; TensorRT 8.6.0, ``trtexec --loadEngine ... --shapes``).
  Kept verbatim: the header, device information, three of the trace lines, the whole
  ``=== Performance summary ===`` block and the first two explanation lines; the plugin registration
  list, most trace lines and the rest of the explanations are left out. The docs.nvidia.com trtexec
  pages (Command-Line Programs; Performance Benchmarking using trtexec) describe these metrics, but
  their example output could not be retrieved through the search tool, so NVIDIA's cookbook log is
  the source.
- ``trtexec_help_excerpt.txt``: the option lines 2dq uses, verbatim from ``trtexec --help`` of
  TensorRT 10.6 (``cookbook/07-Tool/trtexec/Help.txt``, same repository, commit
  1c8b6b6c460908bb07765156f72ebc2996c9b0c0).
- ``layer_info_sample.json``: NOT trtexec output. Built by hand to the documented
  ``--exportLayerInfo`` / engine inspector JSON format of TensorRT 10.x (``{"Layers": [{"Name",
  "LayerType", "Inputs"/"Outputs": [{"Name", "Location", "Dimensions", "Format/Datatype"}], ...}],
  "Bindings": [...]}``, as in NVIDIA's cookbook ``model-trained-exportLayerInfo.log``), with format
  strings taken from TREx's list of TensorRT format descriptions
  (NVIDIA/TensorRT tools/experimental/trt-engine-explorer/trex/activations.py) and layer names of our
  own; the layer types ``Quantize``/``gemm`` are illustrative.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from engines.trt.trtexec import (
    STANDARD_LOCATIONS,
    LatencyStats,
    TrtexecNotFound,
    TrtexecOutputError,
    build_command,
    find_trtexec,
    parse_performance_summary,
    profile_command,
    summarize_layer_info,
    summarize_profile,
    tensor_precision,
)

DATA = Path(__file__).parent / "data"
TRANSCRIPT = (DATA / "trtexec_transcript.txt").read_text()
HELP = (DATA / "trtexec_help_excerpt.txt").read_text()
DOCUMENTED_FLAGS = set(re.findall(r"^\s+(--[A-Za-z0-9]+)", HELP, flags=re.M))
NO_STANDARD_TRTEXEC = not any(os.path.exists(p) for p in STANDARD_LOCATIONS)


def flag_names(cmd):
    return {arg.split("=", 1)[0] for arg in cmd[1:]}


def test_profile_command():
    cmd = profile_command(
        "/opt/trt/bin/trtexec",
        "m.plan",
        input_name="input",
        batch=8,
        tile=64,
        profile_json="/tmp/p.json",
        layer_info_json="/tmp/l.json",
    )
    assert cmd == [
        "/opt/trt/bin/trtexec",
        "--loadEngine=m.plan",
        "--shapes=input:8x3x64x64",
        "--useCudaGraph",
        "--noDataTransfers",
        "--separateProfileRun",
        "--dumpProfile",
        "--exportProfile=/tmp/p.json",
        "--exportLayerInfo=/tmp/l.json",
        "--percentile=90,95,99",
        "--duration=3",
        "--warmUp=200",
    ]
    assert flag_names(cmd) <= DOCUMENTED_FLAGS
    with pytest.raises(ValueError, match="batch and tile must be positive"):
        profile_command(
            "trtexec", "m.plan", input_name="input", batch=0, tile=64, profile_json="p", layer_info_json="l"
        )


def test_build_command_strongly_typed_on_10x():
    cmd = build_command(
        "trtexec",
        "m.onnx",
        "m.plan",
        input_name="input",
        tile=64,
        max_batch=8,
        opt_batch=4,
        timing_cache="cache.bin",
        tensorrt_major=10,
    )
    assert cmd == [
        "trtexec",
        "--onnx=m.onnx",
        "--saveEngine=m.plan",
        "--minShapes=input:1x3x64x64",
        "--optShapes=input:4x3x64x64",
        "--maxShapes=input:8x3x64x64",
        "--memPoolSize=workspace:4096M",
        "--builderOptimizationLevel=3",
        "--profilingVerbosity=detailed",
        "--skipInference",
        "--stronglyTyped",
        "--timingCacheFile=cache.bin",
    ]
    assert flag_names(cmd) <= DOCUMENTED_FLAGS


def test_build_command_on_11_and_on_the_flag_path():
    strong11 = build_command("trtexec", "m.onnx", "m.plan", input_name="input", tile=64, max_batch=8, tensorrt_major=11)
    assert "--stronglyTyped" not in strong11 and "--optShapes=input:8x3x64x64" in strong11
    weak = build_command(
        "trtexec",
        "m.onnx",
        "m.plan",
        input_name="input",
        tile=64,
        max_batch=8,
        strongly_typed=False,
        builder_flags=("INT8", "FP16"),
    )
    assert weak[-2:] == ["--int8", "--fp16"] and "--stronglyTyped" not in weak
    assert flag_names(weak) <= DOCUMENTED_FLAGS
    with pytest.raises(ValueError, match="no precision flags"):
        build_command("trtexec", "m.onnx", "m.plan", input_name="input", tile=64, max_batch=8, builder_flags=("INT8",))


def test_performance_summary_of_the_reference_transcript():
    summary = parse_performance_summary(TRANSCRIPT)
    assert summary["throughput_qps"] == 21009.2
    assert summary["latency"] == LatencyStats(
        min=0.0490112, mean=0.0533242, median=0.0517578, p90=0.0532227, p95=0.053772, p99=0.0630798, max=0.617065
    )
    assert summary["gpu_compute"] == LatencyStats(
        min=0.041748, mean=0.0451127, median=0.0439453, p90=0.0449219, p95=0.045105, p99=0.0521851, max=0.609253
    )
    assert (
        summary["enqueue"].median == 0.0253906 and summary["h2d"].p99 == 0.00549316 and summary["d2h"].max == 0.0254517
    )
    assert summary["total_host_walltime_s"] == 3.00012 and summary["total_gpu_compute_s"] == 2.84346
    assert summary["tensorrt_version"] == "8.6.0"


def test_percentiles_that_were_not_printed_are_none():
    # the reference lines with the 90% and 95% percentiles removed (trtexec prints what --percentile asks for)
    text = re.sub(r" percentile\(9[05]%\) = [0-9.]+ ms,", "", TRANSCRIPT)
    summary = parse_performance_summary(text)
    assert (summary["latency"].p90, summary["latency"].p95, summary["latency"].p99) == (None, None, 0.0630798)


def test_output_without_a_summary_is_an_error():
    failed_run = TRANSCRIPT.split("=== Trace details ===")[0] + "&&&& FAILED TensorRT.trtexec [TensorRT v8600]\n"
    with pytest.raises(TrtexecOutputError, match="no '=== Performance summary ===' block"):
        parse_performance_summary(failed_run)


def test_layer_precisions_and_reformats_of_the_sample():
    summary = summarize_layer_info(json.loads((DATA / "layer_info_sample.json").read_text()))
    assert summary["layers"] == 8 and summary["detailed"]
    assert summary["by_precision"] == {"FP16": 4, "FP32": 2, "INT8": 2}
    assert summary["reformat_layers"] == 2
    assert summary["reformat_names"] == [
        "Reformatting CopyNode for Input Tensor 0 to conv_first",
        "Reformatting CopyNode for Input Tensor 0 to conv_last",
    ]


@pytest.mark.parametrize(
    "tensor, precision",
    [
        ({"Format/Datatype": "Four wide channel vectorized row major Int8 format"}, "INT8"),
        ({"Format/Datatype": "Channel major INT8 format where channel % 16 == 0"}, "INT8"),
        ({"Format/Datatype": "Row major linear UInt8 format"}, "UINT8"),
        ({"Format/Datatype": "Row major linear BFloat16 format"}, "BF16"),
        ({"Format/Datatype": "Row major linear FP32"}, "FP32"),
        ({"Format/Datatype": "Float"}, "FP32"),
        ({"DataType": "Half", "Format": "Row major linear FP16 format (kLINEAR)"}, "FP16"),
        ({"Format/Datatype": "Unknown format"}, "UNKNOWN"),
    ],
)
def test_tensor_precision(tensor, precision):
    assert tensor_precision(tensor) == precision


def test_layer_names_only_info_has_no_precisions():
    summary = summarize_layer_info(
        {"Layers": ["conv_first", "Reformatting CopyNode for Input Tensor 0 to x", "conv_last"]}
    )
    assert summary == {
        "layers": 3,
        "by_precision": {},
        "reformat_layers": 1,
        "reformat_names": ["Reformatting CopyNode for Input Tensor 0 to x"],
        "detailed": False,
    }
    with pytest.raises(TrtexecOutputError, match="no 'Layers' list"):
        summarize_layer_info({"Bindings": []})


def test_profile_summary():
    # the --exportProfile layout read by NVIDIA's cookbook parse_export_json.py: {"count"} then one row per layer
    profile = [
        {"count": 11},
        {"name": "conv_first", "timeMs": 2.2, "averageMs": 0.2, "medianMs": 0.2, "percentage": 20.0},
        {
            "name": "Reformatting CopyNode for Input Tensor 0 to conv_last",
            "timeMs": 1.1,
            "averageMs": 0.1,
            "medianMs": 0.1,
            "percentage": 10.0,
        },
        {"name": "attn", "timeMs": 7.7, "averageMs": 0.7, "medianMs": 0.7, "percentage": 70.0},
    ]
    summary = summarize_profile(profile)
    assert summary["iterations"] == 11
    assert summary["layer_time_ms"] == pytest.approx(1.0) and summary["reformat_time_ms"] == pytest.approx(0.1)
    assert [row["name"] for row in summary["slowest"]] == [
        "attn",
        "conv_first",
        "Reformatting CopyNode for Input Tensor 0 to conv_last",
    ]


def _executable(path: Path) -> Path:
    path.write_text("")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_trtexec_on_the_search_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    exe = _executable(tmp_path / "b" / "trtexec")
    assert find_trtexec(search_path=os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])) == exe
    assert find_trtexec(str(exe)) == exe


def test_find_trtexec_explicit_path_must_exist(tmp_path):
    with pytest.raises(TrtexecNotFound, match=f"--trtexec {re.escape(str(tmp_path / 'nope'))} is not an executable"):
        find_trtexec(str(tmp_path / "nope"))


@pytest.mark.skipif(not NO_STANDARD_TRTEXEC, reason="a trtexec is installed in a standard location")
def test_missing_trtexec_names_every_place_searched(tmp_path):
    with pytest.raises(TrtexecNotFound) as err:
        find_trtexec(search_path=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and all(p in message for p in STANDARD_LOCATIONS) and "--trtexec" in message
