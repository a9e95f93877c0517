"""Deployment check through the user-facing tools: ``2dq-export`` -> ``2dq-build-engine --verify`` per artifact.

For each calibration artifact: export the QDQ graph (the TensorRT-rules lint runs on every export),
build the ONNX Runtime CPU engine, run it and the PyTorch fake-quant reference on the real LR images
of the chosen sets, and record the agreement (PSNR of the engine's output against the reference,
share of identical uint8 pixels, largest absolute error), the engine's integer kernels and the wall
times. Artifacts are made with ``2dq-calibrate`` when missing (``--make 'NAME=OPTIONS'``).

    python benchmarks/ort_verify.py --weights ../shared/models/NGswin/NGswin_x2.pth --work /tmp/ortv \\
        --make "dobi-w8a8=--method dobi --bits 8" --make "dobi-w4a4=--method dobi --bits 4" \\
        --out benchmarks/results/ngswin_x2_ort_verify.json --markdown benchmarks/ort_verify.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return round(time.perf_counter() - start, 1)


def verify(args: argparse.Namespace, name: str, artifact: Path) -> dict:
    onnx_path, engine = args.work / f"{name}.onnx", args.work / f"{name}.ort.onnx"
    report = args.work / f"{name}.verify.json"
    export = [_bin("2dq-export"), "--onnx", str(onnx_path), "--weights", args.weights, "--calib", str(artifact),
              "--tile", str(args.tile), "-q"]
    build = [_bin("2dq-build-engine"), "--backend", "ort", "--onnx", str(onnx_path), "--out", str(engine),
             "--verify", "--weights", args.weights, "--calib", str(artifact), "--data", str(args.data),
             "--sets", args.sets, "--json", str(report), "--no-progress", "-q"]
    if args.threads:
        build += ["--threads", str(args.threads)]
    if args.noise_floor:
        build += ["--noise-floor", str(args.noise_floor)]
    if args.floor_margin is not None:
        build += ["--floor-margin", str(args.floor_margin)]
    export_s = _timed(export)
    start = time.perf_counter()
    done = subprocess.run(build)  # exit 1 when below the thresholds: still recorded
    build_s = round(time.perf_counter() - start, 1)
    data = json.loads(report.read_text())
    meta = json.loads(artifact.with_suffix(".json").read_text())
    return {"name": name, "quant_config": meta["quant_config"], "method": meta["method"],
            "transforms": meta["method_options"].get("transforms", {}), "exit_code": done.returncode,
            "export_s": export_s, "build_verify_s": build_s, "report": data,
            "commands": [shlex.join(export), shlex.join(build)]}


def _passed(verification: dict) -> str:
    if not verification["passed"]:
        return "NO"
    return "yes, at the noise floor" if verification.get("passed_by") == "noise floor" else "yes"


def markdown(rows: list[dict]) -> str:
    out = ["| artifact | W/A | weights | transforms | PSNR vs reference (dB) | identical uint8 pixels | "
           "max abs error | passed | noise floor: reference vs itself, input noise (dB / identical) | "
           "integer kernels | export + build/verify (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        config, verification = row["quant_config"], row["report"]["verification"]
        smoothing = row["transforms"].get("smoothing", {}).get("groups", {})
        folds = ", ".join(f"{k} {v}" for k, v in smoothing.items() if v)
        shifts = sum(row["transforms"].get("shifts", {}).values())
        input_shifts = row["transforms"].get("input_shifts", 0)
        transforms = "; ".join(filter(None, [f"smoothing ({folds})" if folds else "",
                                             f"shifts {shifts}" if shifts else "",
                                             f"input shifts {input_shifts}" if input_shifts else ""])) or "–"
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(row["report"]["build"].get("integer_kernels", {}).items()))
        psnr = verification["psnr_vs_reference"]
        psnr_text = "inf (identical)" if psnr is None or psnr == float("inf") else f"{psnr:.2f}"
        floor = verification.get("noise_floor")
        floor_text = (f"{floor['psnr_vs_reference']:.2f} / {100 * floor['identical_pixels']:.3f}% "
                      f"(sigma {floor['sigma']:g})" if floor else "–")
        out.append(f"| {row['name']} ({row['method']}) | W{config['w_bits']}A{config['a_bits']} | "
                   f"{config['weight_granularity']} | {transforms} | {psnr_text} | "
                   f"{100 * verification['identical_pixels']:.3f}% | {verification['max_abs_error']:.3g} | "
                   f"{_passed(verification)} | {floor_text} | {kernels or '–'} | "
                   f"{row['export_s']:.0f} + {row['build_verify_s']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models/NGswin/NGswin_x2.pth"))
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="an existing artifact to verify (repeatable)")
    parser.add_argument("--make", action="append", default=[], metavar="NAME=OPTIONS",
                        help="calibrate an artifact with these 2dq-calibrate options first (repeatable)")
    parser.add_argument("--calib-images", type=Path, default=SHARED / "datasets/train")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets")
    parser.add_argument("--sets", default="Set5")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--noise-floor", type=float, default=0.0, metavar="SIGMA",
                        help="also measure the reference against itself under input noise SIGMA (e.g. 1e-6)")
    parser.add_argument("--floor-margin", type=float, metavar="DB",
                        help="with --noise-floor: pass within DB of the noise floor (2dq-build-engine --floor-margin)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (entries already there are skipped)")
    parser.add_argument("--markdown", type=Path, help="also render the table here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    done = {row["name"] for row in rows}
    todo = [tuple(a.split("=", 1)) for a in args.artifact]
    for item in args.make:
        name, options = item.split("=", 1)
        artifact = args.work / f"{name}.safetensors"
        if name not in done and not artifact.exists():
            subprocess.run([_bin("2dq-calibrate"), "--weights", args.weights, "--calib-images", str(args.calib_images),
                            "--out", str(artifact), "--no-progress", "-q", *shlex.split(options)], check=True)
        todo.append((name, str(artifact)))
    for name, path in todo:
        if name in done:
            continue
        rows.append(verify(args, name, Path(path)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"weights": args.weights, "sets": args.sets, "tile": args.tile,
                                        "rows": rows}, indent=1))
        v = rows[-1]["report"]["verification"]
        print(f"{name}: {v['psnr_vs_reference']} dB, {100 * v['identical_pixels']:.3f}% identical, "
              f"passed={v['passed']}", flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(rows))


if __name__ == "__main__":
    main()
