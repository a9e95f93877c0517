"""``2dq-profile``: benchmark an engine and summarize what runs in which precision.

A TensorRT plan (``.plan`` / ``.engine``) runs under ``trtexec --loadEngine=PLAN`` on a batch of tiles
(CUDA graph, no host<->device copies, the per-layer profile in a separate run): latency percentiles,
throughput (batches and images per second) and, from the exported layer information, how many layers
run in INT8 / FP16 / FP32 and how many reformat layers TensorRT inserted (tile and input name from the
plan's sidecar). A CPU engine (ONNX Runtime ``.onnx`` / ``.ort``, OpenVINO ``.xml``) runs in this
process on random tiles for ``--duration`` seconds: latency percentiles, throughput, and from the
runtime's own per-node profiler how many nodes (and milliseconds) run in int8 and in fp32
(:mod:`engines.cpu_profile`).

Exit codes: 0 success, 1 trtexec missing or failed / unreadable output, 2 bad arguments.

    2dq-profile swinir_x2_w4a4.plan --batch 8 --json profile.json
    2dq-profile swinir_x2_w4a4.plan --json - | jq .throughput_images_per_s
    2dq-profile runs/dat_light_x4_w4a4.ov.xml --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.cli.common import EXIT_OK, UsageError, add_json_argument, add_logging_arguments, run_cli

from .cpu_profile import format_cpu_report, profile_cpu_engine

from .trt.sidecar import read_sidecar
from .trt.trtexec import (
    TrtexecOutputError,
    find_trtexec,
    parse_performance_summary,
    profile_command,
    summarize_layer_info,
    summarize_profile,
)

log = logging.getLogger("2dq.profile")
OUTPUT_TAIL = 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-profile",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A plan must have its <plan>.json sidecar (written by 2dq-build-engine --backend trt).",
    )
    parser.add_argument("plan", type=Path, metavar="ENGINE", help="engine: .plan/.engine (TensorRT), .onnx/.ort "
                        "(ONNX Runtime), .xml (OpenVINO IR)")
    parser.add_argument(
        "--trtexec",
        default=None,
        help="trtexec executable (default: search PATH, then /opt/tensorrt/bin, /usr/src/tensorrt/bin)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="tiles per model call (default: the plan's optimization batch; "
        "1 for CPU engines)"
    )
    parser.add_argument("--duration", type=int, default=3, help="seconds of timed inference (default: 3)")
    parser.add_argument("--threads", type=int, help="CPU threads of the CPU engines (ort, openvino) (default: all "
                        "cores)")
    add_json_argument(parser, "the summary")
    parser.add_argument(
        "--keep", type=Path, default=None, metavar="DIR",
        help="directory to keep trtexec's log and exported JSON files in",
    )
    add_logging_arguments(parser)
    return parser


def _latency_row(name: str, stats: Any) -> str:
    cells = [stats.min, stats.mean, stats.median, stats.p90, stats.p95, stats.p99, stats.max]
    return f"{name:<18}" + "".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in cells)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of a :func:`profile_plan` report."""
    lines = [
        f"{report['plan']}  batch {report['batch']} x 3x{report['tile']}x{report['tile']}"
        f"  (TensorRT {report['tensorrt_version']})",
        f"{'ms':<18}" + "".join(f"{h:>9}" for h in ("min", "mean", "median", "p90", "p95", "p99", "max")),
    ]
    for key, name in (("latency", "latency"), ("gpu_compute", "GPU compute")):
        lines.append(_latency_row(name, report["timing"][key]))
    lines.append(
        f"throughput: {report['throughput_qps']:.1f} batches/s = {report['throughput_images_per_s']:.1f} tiles/s"
    )
    layers = report["layers"]
    if layers["detailed"]:
        by = ", ".join(f"{k} {v}" for k, v in layers["by_precision"].items())
        lines.append(f"layers: {layers['layers']} ({by}); reformat layers: {layers['reformat_layers']}")
    else:
        lines.append(f"layers: {layers['layers']} (no precisions: plan built without detailed profiling verbosity)")
    if report.get("profile"):
        prof = report["profile"]
        lines.append(
            f"per-layer profile: {prof['layer_time_ms']:.3f} ms per inference,"
            f" reformats {prof['reformat_time_ms']:.3f} ms"
        )
    return "\n".join(lines)


def profile_plan(plan: Path, trtexec: Path, batch: int | None, duration: int, workdir: Path) -> dict[str, Any]:
    """Run trtexec on ``plan`` in ``workdir`` and return the summary (raises on failure)."""
    record = read_sidecar(plan)
    batch = batch or int(record["profile"]["opt_batch"])
    max_batch = int(record["profile"]["max_batch"])
    if not 1 <= batch <= max_batch:
        raise ValueError(f"--batch {batch} is outside the plan's profile [1, {max_batch}]")
    tile = int(record["tile"])
    profile_json, layer_json = workdir / "profile.json", workdir / "layer_info.json"
    cmd = profile_command(
        trtexec,
        plan,
        input_name=record["input"]["name"],
        batch=batch,
        tile=tile,
        profile_json=profile_json,
        layer_info_json=layer_json,
        duration_s=duration,
    )
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    (workdir / "trtexec.log").write_text(output)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-OUTPUT_TAIL:])
        raise RuntimeError(f"trtexec exited with {proc.returncode}:\n{tail}")
    summary = parse_performance_summary(output)
    if not layer_json.is_file():
        raise TrtexecOutputError(f"trtexec wrote no layer information to {layer_json}")
    layers = summarize_layer_info(json.loads(layer_json.read_text()))
    prof = summarize_profile(json.loads(profile_json.read_text())) if profile_json.is_file() else None
    return {
        "plan": str(plan),
        "batch": batch,
        "tile": tile,
        "trtexec": str(trtexec),
        "command": cmd,
        "tensorrt_version": summary["tensorrt_version"] or record["tensorrt_version"],
        "timing": {k: summary[k] for k in ("latency", "gpu_compute", "enqueue", "h2d", "d2h") if k in summary},
        "throughput_qps": summary["throughput_qps"],
        "throughput_images_per_s": summary["throughput_qps"] * batch,
        "layers": layers,
        "profile": prof,
    }


def _jsonable(report: dict[str, Any]) -> dict[str, Any]:
    out = dict(report)
    out["timing"] = {k: v.to_dict() for k, v in report["timing"].items()}
    return out


def _main(args: argparse.Namespace) -> int:
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.duration < 1:
        raise UsageError(f"--duration must be >= 1 second, got {args.duration}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if not args.plan.is_file():
        raise FileNotFoundError(f"engine not found: {args.plan}")
    from .upscalers import engine_backend

    try:
        backend = engine_backend(str(args.plan))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if backend != "trt":
        report = profile_cpu_engine(args.plan, backend, args.batch or 1, args.duration, args.threads)
        print(format_cpu_report(report))
        if args.json:
            args.json.write({**report, "latency": report["latency"].to_dict()})
        return EXIT_OK
    # TrtexecNotFound (an OSError) and TrtexecOutputError (a ValueError) exit 1 through run_cli
    trtexec = find_trtexec(args.trtexec)
    with tempfile.TemporaryDirectory(prefix="2dq-profile-") as tmp:
        workdir = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        report = profile_plan(args.plan, trtexec, args.batch, args.duration, workdir)
    print(format_report(report))
    if args.json:
        args.json.write(_jsonable(report))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
