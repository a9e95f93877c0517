"""``2dq-profile``: benchmark a TensorRT plan with trtexec and summarize what runs in which precision.

Runs ``trtexec --loadEngine=PLAN`` on a batch of tiles (CUDA graph, no host<->device copies, the
per-layer profile in a separate run) and prints latency percentiles, throughput (batches and images
per second) and, from the exported layer information, how many layers run in INT8 / FP16 / FP32 and
how many reformat layers TensorRT inserted. The tile size and input name come from the plan's sidecar.

Exit codes: 0 success, 1 trtexec missing or failed / unreadable output, 2 bad arguments.

    2dq-profile swinir_x2_w4a4.plan --batch 8 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from toolchain.files import atomic_path

from .trt.sidecar import read_sidecar
from .trt.trtexec import (
    TrtexecNotFound,
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
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The plan must have its <plan>.json sidecar (written by 2dq-build-engine --backend trt).",
    )
    parser.add_argument("plan", type=Path, help="TensorRT plan file")
    parser.add_argument(
        "--trtexec",
        default=None,
        help="trtexec executable (default: search PATH, then /opt/tensorrt/bin, /usr/src/tensorrt/bin)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="tiles per inference (default: the plan's optimization batch)"
    )
    parser.add_argument("--duration", type=int, default=3, help="seconds of timed inference (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON to this file")
    parser.add_argument(
        "--keep", type=Path, default=None, help="directory to keep trtexec's log and exported JSON files in"
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.batch is not None and args.batch < 1:
        print(f"2dq-profile: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    if not args.plan.is_file():
        print(f"2dq-profile: plan not found: {args.plan}", file=sys.stderr)
        return 1
    try:
        trtexec = find_trtexec(args.trtexec)
        with tempfile.TemporaryDirectory(prefix="2dq-profile-") as tmp:
            workdir = Path(tmp)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                workdir = args.keep
            report = profile_plan(args.plan, trtexec, args.batch, args.duration, workdir)
    except (TrtexecNotFound, TrtexecOutputError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"2dq-profile: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json is not None:
        with atomic_path(args.json) as tmp_json:
            tmp_json.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
