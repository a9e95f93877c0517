"""trtexec, TensorRT's command-line benchmark: build the commands, find the binary, read its output.

Used by ``2dq-profile`` (:mod:`engines.cli_profile`) and by the manual recipes of the README. Three
outputs of ``trtexec --loadEngine=PLAN ...`` are read:

- stdout's ``=== Performance summary ===`` block: ``Throughput: X qps`` and lines such as
  ``Latency: min = a ms, max = b ms, mean = c ms, median = d ms, percentile(90%) = e ms, ...``
  (:func:`parse_performance_summary`);
- the ``--exportLayerInfo`` JSON (engine inspector format: ``{"Layers": [...], "Bindings": [...]}``
  in 10.x, ``"I/O Tensors"`` replacing ``"Bindings"`` in 11.x; each layer has ``Name``,
  ``LayerType``, ``Inputs``/``Outputs`` whose tensors carry ``"Format/Datatype"`` (10.x) or
  ``"DataType"``/``"Format"``) -> per-layer precision and reformat counts (:func:`summarize_layer_info`).
  Layer details exist only when the plan was built with ``ProfilingVerbosity.DETAILED`` (the 2dq
  builder sets it); otherwise ``Layers`` is a list of names;
- the ``--exportProfile`` JSON: ``[{"count": N}, {"name", "timeMs", "averageMs", "medianMs",
  "percentage"}, ...]`` (:func:`summarize_profile`).

A layer's precision is read, as NVIDIA's TREx engine explorer does, from the data type of its first
input (its first output when it has no inputs). Reformat layers are those of ``LayerType``
``Reformat`` or whose name contains ``Reformat`` (e.g. ``Reformatting CopyNode for Input Tensor 0 to ...``).

Flags checked against ``trtexec --help`` of TensorRT 10.6 as published in NVIDIA's TensorRT cookbook
(https://github.com/NVIDIA/trt-samples-for-hackathon-cn, cookbook/07-Tool/trtexec/Help.txt) and the
docs: Command-Line Programs (https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html),
Performance Benchmarking using trtexec (https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/benchmarking.html),
trtexec 10.x -> 11.x migration (https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html:
precision flags removed, ``--stronglyTyped`` always on) and the IEngineInspector JSON migration
(https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html).
Not run against a real trtexec here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: where NVIDIA's containers and packages put trtexec when it is not on PATH
STANDARD_LOCATIONS = ("/opt/tensorrt/bin/trtexec", "/usr/src/tensorrt/bin/trtexec")
PERCENTILES = (90, 95, 99)


class TrtexecNotFound(FileNotFoundError):
    """No trtexec executable at the given path, on PATH or in the standard locations."""


class TrtexecOutputError(ValueError):
    """trtexec's output lacks what 2dq-profile reads (a failed run, or an unknown format)."""


def _executable(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_trtexec(explicit: str | None = None, search_path: str | None = None) -> Path:
    """The trtexec to run: ``explicit`` if given, else the first on ``search_path`` (default: $PATH),
    else a standard location. Raises :class:`TrtexecNotFound` naming every place searched."""
    if explicit is not None:
        if _executable(explicit):
            return Path(explicit)
        raise TrtexecNotFound(f"trtexec not found: --trtexec {explicit} is not an executable file")
    search_path = os.environ.get("PATH", "") if search_path is None else search_path
    found = shutil.which("trtexec", path=search_path)
    if found:
        return Path(found)
    for candidate in STANDARD_LOCATIONS:
        if _executable(candidate):
            return Path(candidate)
    dirs = [d for d in search_path.split(os.pathsep) if d]
    raise TrtexecNotFound(
        "trtexec not found: searched PATH ("
        + (os.pathsep.join(dirs) or "empty")
        + ") and "
        + ", ".join(STANDARD_LOCATIONS)
        + "; install TensorRT or pass --trtexec PATH"
    )


def shape_spec(name: str, *dims: int) -> str:
    """trtexec shape syntax: ``input:4x3x64x64``."""
    return f"{name}:" + "x".join(str(d) for d in dims)


def profile_command(
    trtexec: str | os.PathLike,
    plan: str | os.PathLike,
    *,
    input_name: str,
    batch: int,
    tile: int,
    profile_json: str | os.PathLike,
    layer_info_json: str | os.PathLike,
    duration_s: int = 3,
    warmup_ms: int = 200,
) -> list[str]:
    """Benchmark a built plan: CUDA graph, no host<->device copies, per-layer profile in a second run.

    ``--separateProfileRun`` keeps the per-layer profiler out of the timed run (with the profiler
    attached trtexec does not report end-to-end timings). ``--exportLayerInfo`` only has layer
    precisions when the plan was built with detailed profiling verbosity (a build-time setting:
    ``--profilingVerbosity`` has no effect on a loaded plan).
    """
    if batch < 1 or tile < 1:
        raise ValueError(f"batch and tile must be positive, got batch={batch}, tile={tile}")
    return [
        str(trtexec),
        f"--loadEngine={plan}",
        f"--shapes={shape_spec(input_name, batch, 3, tile, tile)}",
        "--useCudaGraph",
        "--noDataTransfers",
        "--separateProfileRun",
        "--dumpProfile",
        f"--exportProfile={profile_json}",
        f"--exportLayerInfo={layer_info_json}",
        f"--percentile={','.join(str(p) for p in PERCENTILES)}",
        f"--duration={duration_s}",
        f"--warmUp={warmup_ms}",
    ]


def build_command(
    trtexec: str | os.PathLike,
    onnx: str | os.PathLike,
    plan: str | os.PathLike,
    *,
    input_name: str,
    tile: int,
    max_batch: int,
    opt_batch: int | None = None,
    strongly_typed: bool = True,
    builder_flags: Sequence[str] = (),
    tensorrt_major: int = 10,
    workspace_mb: int = 4096,
    builder_optimization_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
) -> list[str]:
    """The trtexec equivalent of :func:`engines.trt.builder.build_engine` (for building by hand).

    ``strongly_typed``/``builder_flags`` come from :func:`engines.trt.builder.build_mode`; on
    TensorRT 11 (``tensorrt_major >= 11``) strong typing is always on, so no flag is passed.
    """
    if strongly_typed and builder_flags:
        raise ValueError(
            "a strongly typed build takes no precision flags (trtexec rejects --int8/--fp16 with --stronglyTyped)"
        )
    cmd = [
        str(trtexec),
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--minShapes={shape_spec(input_name, 1, 3, tile, tile)}",
        f"--optShapes={shape_spec(input_name, opt_batch or max_batch, 3, tile, tile)}",
        f"--maxShapes={shape_spec(input_name, max_batch, 3, tile, tile)}",
        f"--memPoolSize=workspace:{workspace_mb}M",
        f"--builderOptimizationLevel={builder_optimization_level}",
        "--profilingVerbosity=detailed",
        "--skipInference",
    ]
    if strongly_typed and tensorrt_major < 11:
        cmd.append("--stronglyTyped")
    cmd += [f"--{flag.lower()}" for flag in builder_flags]
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


@dataclass(frozen=True)
class LatencyStats:
    """One trtexec timing line in milliseconds; percentiles trtexec did not print are ``None``."""

    min: float
    mean: float
    median: float
    p90: float | None
    p95: float | None
    p99: float | None
    max: float

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


_SUMMARY_LINE = re.compile(r"\[I\]\s+(?P<label>[A-Za-z0-9/ -]+?):\s+(?P<body>min = .*)$")
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\)) = ([-+0-9.eE]+) ms")
_LABELS = {
    "Latency": "latency",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
    "End-to-End Host Latency": "end_to_end",
}


def _latency(body: str) -> LatencyStats:
    values: dict[str, float] = {}
    for key, pct, number in _STAT.findall(body):
        values[f"p{float(pct):g}" if pct else key] = float(number)
    missing = [k for k in ("min", "max", "mean", "median") if k not in values]
    if missing:
        raise TrtexecOutputError(f"timing line lacks {', '.join(missing)}: {body!r}")
    return LatencyStats(
        values["min"],
        values["mean"],
        values["median"],
        values.get("p90"),
        values.get("p95"),
        values.get("p99"),
        values["max"],
    )


def parse_performance_summary(text: str) -> dict[str, Any]:
    """Read trtexec's ``=== Performance summary ===`` block.

    Returns ``throughput_qps`` (inferences, i.e. batches, per second), one :class:`LatencyStats` per
    timing line found (keys ``latency``, ``enqueue``, ``h2d``, ``gpu_compute``, ``d2h``),
    ``total_host_walltime_s``, ``total_gpu_compute_s`` and ``tensorrt_version`` when printed.
    """
    marker = text.find("=== Performance summary ===")
    if marker < 0:
        raise TrtexecOutputError("trtexec output has no '=== Performance summary ===' block (did the run fail?)")
    result: dict[str, Any] = {}
    version = re.search(r"TensorRT version: (\S+)", text) or re.search(r"\[TensorRT v(\d+)\]", text)
    result["tensorrt_version"] = version[1] if version else None
    for line in text[marker:].splitlines()[1:]:
        if "===" in line:  # the next section (e.g. the per-layer profile)
            break
        if (match := re.search(r"Throughput: ([-+0-9.eE]+) qps", line)) is not None:
            result["throughput_qps"] = float(match[1])
        elif (match := re.search(r"Total Host Walltime: ([-+0-9.eE]+) s", line)) is not None:
            result["total_host_walltime_s"] = float(match[1])
        elif (match := re.search(r"Total GPU Compute Time: ([-+0-9.eE]+) s", line)) is not None:
            result["total_gpu_compute_s"] = float(match[1])
        elif (match := _SUMMARY_LINE.search(line)) is not None and match["label"] in _LABELS:
            result[_LABELS[match["label"]]] = _latency(match["body"])
    for key in ("throughput_qps", "latency", "gpu_compute"):
        if key not in result:
            raise TrtexecOutputError(f"trtexec performance summary lacks {key}")
    return result


_DTYPE_TOKENS = {
    "int8": "INT8",
    "uint8": "UINT8",
    "int4": "INT4",
    "fp8": "FP8",
    "fp4": "FP4",
    "fp16": "FP16",
    "half": "FP16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "fp32": "FP32",
    "float": "FP32",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
}


def tensor_precision(tensor: Mapping[str, Any]) -> str:
    """Precision of one layer-info tensor: ``"INT8"``, ``"FP16"``, ``"FP32"``, ... or ``"UNKNOWN"``.

    Reads ``DataType`` or else ``Format/Datatype`` (e.g. ``"Int8"``, ``"Half"``, ``"Channel major FP16
    format where channel % 8 == 0"``, ``"Row major linear FP32"``).
    """
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or "")
    for token in re.findall(r"[A-Za-z0-9]+", text):
        if token.lower() in _DTYPE_TOKENS:
            return _DTYPE_TOKENS[token.lower()]
    return "UNKNOWN"


def is_reformat(layer: Mapping[str, Any]) -> bool:
    return layer.get("LayerType") == "Reformat" or "reformat" in str(layer.get("Name", "")).lower()


def summarize_layer_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """Layer count per precision and the reformat layers of an ``--exportLayerInfo`` JSON."""
    if not isinstance(info, Mapping) or not isinstance(info.get("Layers"), list):
        raise TrtexecOutputError("layer info JSON has no 'Layers' list")
    layers = info["Layers"]
    if layers and all(isinstance(layer, str) for layer in layers):
        return {
            "layers": len(layers),
            "by_precision": {},
            "reformat_layers": sum("reformat" in name.lower() for name in layers),
            "reformat_names": [name for name in layers if "reformat" in name.lower()],
            "detailed": False,
        }
    counts: Counter[str] = Counter()
    reformats = []
    for layer in layers:
        tensors = layer.get("Inputs") or layer.get("Outputs") or []
        counts[tensor_precision(tensors[0]) if tensors else "UNKNOWN"] += 1
        if is_reformat(layer):
            reformats.append(layer.get("Name", ""))
    return {
        "layers": len(layers),
        "by_precision": dict(sorted(counts.items())),
        "reformat_layers": len(reformats),
        "reformat_names": reformats,
        "detailed": True,
    }


def summarize_profile(profile: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-iteration time of all layers and of reformat layers from an ``--exportProfile`` JSON."""
    if not isinstance(profile, list):
        raise TrtexecOutputError("profile JSON is not a list")
    count = next((int(row["count"]) for row in profile if "count" in row), None)
    layers = [row for row in profile if "name" in row]
    total = sum(float(row.get("averageMs", 0.0)) for row in layers)
    reformat = sum(float(row.get("averageMs", 0.0)) for row in layers if "reformat" in str(row["name"]).lower())
    slowest = sorted(layers, key=lambda row: float(row.get("averageMs", 0.0)), reverse=True)[:5]
    return {
        "iterations": count,
        "layer_time_ms": total,
        "reformat_time_ms": reformat,
        "slowest": [{"name": row["name"], "average_ms": float(row.get("averageMs", 0.0))} for row in slowest],
    }
