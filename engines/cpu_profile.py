"""Profile a CPU engine (ONNX Runtime or OpenVINO): latency percentiles, throughput, and where the time goes.

What ``trtexec`` reports for a TensorRT plan, for the CPU engines ``2dq-build-engine`` makes:
:func:`profile_cpu_engine` runs the engine on random tiles for ``duration`` seconds (after warm-up
calls), then once more with the runtime's own per-node profiler, and summarizes the nodes by the
precision they ran in (``int8`` integer kernels, ``fp32`` float ones, and ``qdq`` for the
quantize/dequantize left standalone) and by node type.

The precision of a node is what the runtime reports: OpenVINO's ``exec_type`` names the kernel and
its precision (``brgemm_avx512_i8``, ``jit_avx512_f32``); ONNX Runtime's profiler names the op
(``MatMulIntegerToFloat`` is an integer kernel, :data:`engines.ort_engine.INTEGER_OPS`).
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .ort_engine import INTEGER_OPS, session_options
from .trt.trtexec import LatencyStats

#: warm-up calls before timing (first calls allocate and pick kernels)
WARMUP_CALLS = 2
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
#: OpenVINO exec_type suffixes -> precision names of the report
OPENVINO_PRECISIONS = {"I8": "int8", "U8": "int8", "I32": "int32", "FP32": "fp32", "F32": "fp32", "BF16": "bf16",
                       "FP16": "fp16", "F16": "fp16"}


def latency_stats(seconds: list[float]) -> LatencyStats:
    """Milliseconds: min, mean, median, p90, p95, p99, max of per-call wall times."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p90, p95, p99 = (float(np.percentile(ms, q)) for q in (90, 95, 99))
    return LatencyStats(float(ms.min()), float(ms.mean()), float(statistics.median(ms)), p90, p95, p99, float(ms.max()))


def time_calls(call: Callable[[], Any], duration: float, min_calls: int = 5) -> list[float]:
    """Per-call seconds of ``call`` repeated for ``duration`` seconds (at least ``min_calls`` calls)."""
    for _ in range(WARMUP_CALLS):
        call()
    samples: list[float] = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end or len(samples) < min_calls:
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def _summary(nodes: list[tuple[str, str, float]]) -> dict[str, Any]:
    """``nodes``: (node type, precision, milliseconds) of one inference -> counts and times by precision/type."""
    count: collections.Counter = collections.Counter()
    ms: collections.Counter = collections.Counter()
    by_type: collections.Counter = collections.Counter()
    for kind, precision, milliseconds in nodes:
        count[precision] += 1
        ms[precision] += milliseconds
        by_type[f"{kind} ({precision})"] += milliseconds
    return {"nodes": len(nodes), "by_precision": dict(count.most_common()),
            "time_ms_by_precision": {k: round(v, 3) for k, v in ms.most_common()},
            "slowest_types": [{"type": k, "ms": round(v, 3)} for k, v in by_type.most_common(8)]}


def _openvino(path: Path, batch: int, threads: Optional[int]) -> tuple[Callable[[], Any], Callable[[], dict], int]:
    from .openvino_engine import OpenVinoTileRunner

    runner = OpenVinoTileRunner(path, threads=threads, batch=batch)
    x = np.random.default_rng(0).random((batch, 3, runner.tile, runner.tile), dtype=np.float32)
    request = runner.request

    def layers() -> dict:
        # the per-node profiler is a compile option (off in the timed engine): the same engine compiled with it on
        profiler = OpenVinoTileRunner(path, threads=threads, batch=batch, profile=True).request
        profiler.infer({0: x})
        nodes = [(info.node_type, OPENVINO_PRECISIONS.get(info.exec_type.rsplit("_", 1)[-1].upper(), "other"),
                  info.real_time.total_seconds() * 1000.0)
                 for info in profiler.profiling_info if str(info.status).endswith("EXECUTED")]
        return _summary(nodes)

    return (lambda: request.infer({0: x})), layers, runner.tile


def _onnxruntime(path: Path, batch: int, threads: Optional[int]) -> tuple[Callable[[], Any], Callable[[], dict], int]:
    import onnxruntime as ort

    from .ort_engine import DISABLED_OPTIMIZERS, OrtTileRunner

    runner = OrtTileRunner(path, threads=threads)
    if runner.static_batch is not None and runner.static_batch != batch:
        raise ValueError(f"{path}: a static-batch engine of {runner.static_batch} tiles; profile it with --batch "
                         f"{runner.static_batch}")
    x = np.random.default_rng(0).random((batch, 3, runner.tile, runner.tile), dtype=np.float32)
    session = runner.session

    def layers() -> dict:
        with tempfile.TemporaryDirectory(prefix="2dq-profile-") as scratch:
            options = session_options("all", threads)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(scratch, "ort")
            profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))
            profiled.run(None, {"input": x})          # warm-up, dropped below
            profiled.run(None, {"input": x})
            events = json.loads(Path(profiled.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        kernels = kernels[len(kernels) // 2:]
        nodes = []
        for event in kernels:
            op = event["args"]["op_name"]
            precision = "int8" if op in INTEGER_OPS else "qdq" if op in QDQ_OPS else "fp32"
            nodes.append((op, precision, event["dur"] / 1000.0))
        return _summary(nodes)

    return (lambda: session.run(None, {"input": x})), layers, runner.tile


def profile_cpu_engine(path: str | os.PathLike, backend: str, batch: int = 1, duration: float = 3.0,
                       threads: Optional[int] = None) -> dict[str, Any]:
    """Time the engine ``path`` (``backend`` ``ort`` or ``openvino``) on ``batch`` random tiles per call.

    Returns the engine, backend, batch, tile, threads, number of timed calls, ``latency``
    (:class:`~engines.trt.trtexec.LatencyStats`, ms per call), throughput (calls and tiles per
    second) and ``layers``: node counts and milliseconds by precision and the slowest node types of
    one profiled call.
    """
    path = Path(path)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    makers = {"openvino": _openvino, "ort": _onnxruntime}
    if backend not in makers:
        raise ValueError(f"CPU profiling covers {', '.join(makers)}, not {backend!r}")
    call, layers, tile = makers[backend](path, batch, threads)
    samples = time_calls(call, duration)
    latency = latency_stats(samples)
    per_second = len(samples) / sum(samples)
    return {"engine": str(path), "backend": backend, "batch": batch, "tile": tile,
            "threads": threads, "calls": len(samples), "latency": latency,
            "throughput_calls_per_s": per_second, "throughput_tiles_per_s": per_second * batch,
            "layers": layers()}


def format_cpu_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`profile_cpu_engine`."""
    lat = report["latency"]
    layers = report["layers"]
    threads = report["threads"] or "all"
    lines = [f"{report['engine']}  {report['backend']}, batch {report['batch']} x 3x{report['tile']}x{report['tile']}, "
             f"threads {threads}, {report['calls']} calls",
             f"{'ms':<10}" + "".join(f"{h:>9}" for h in ("min", "mean", "median", "p90", "p95", "p99", "max")),
             f"{'latency':<10}" + "".join(f"{v:>9.2f}" for v in (lat.min, lat.mean, lat.median, lat.p90, lat.p95,
                                                                   lat.p99, lat.max)),
             f"throughput: {report['throughput_calls_per_s']:.2f} calls/s = {report['throughput_tiles_per_s']:.2f} "
             "tiles/s",
             "nodes by precision: " + ", ".join(f"{k} {v} ({layers['time_ms_by_precision'][k]:.1f} ms)"
                                                for k, v in layers["by_precision"].items()),
             "slowest node types: " + ", ".join(f"{row['type']} {row['ms']:.1f} ms" for row in layers["slowest_types"])]
    return "\n".join(lines)
