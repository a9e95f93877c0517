"""The best recipe of each row of issue 22 on DAT-light, deployed: calibrate, export, ORT engine, --verify, eval.

Each row (scale x bit width) runs the console scripts as a user would, one process at a time:

1. ``2dq-calibrate`` with the row's recipe (:data:`RECIPES`, chosen on the held-out split of the shipped
   training images, ``benchmarks/rotation_ablation.md``; never on a test set) on ``--calib-images``;
2. ``2dq-export --onnx --tile 64`` (the QDQ graph), ``2dq-build-engine --backend ort --verify`` (the engine
   against the fake-quant reference on Set5, the criterion of ARCHITECTURE.md section 7);
3. ``2dq-eval --backend ort`` on Set5, Set14, B100: PSNR / SSIM of the deployed engine (64x64 tiles, overlap 16);
4. ``2dq-eval --calib`` on whole Set5 images: the fake-quant model without tiles (re-checked by
   ``tests/benchmarks/test_best_artifacts.py`` on the committed artifacts).

The artifact of each row is copied to ``benchmarks/artifacts/dat_light_x<s>_w<b>a<b>.safetensors`` (+ ``.json``)
so that anyone can export, build and evaluate it again. Results go to ``--out`` after every step (atomic;
a rerun skips finished steps, so the script resumes)::

    python benchmarks/best_rows.py --rows x4w4,x4w3,x4w2 --threads 1 \\
        --out benchmarks/results/best_rows.json --markdown benchmarks/best_rows_table.md
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from toolchain.files import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_grid import LATER, _paper  # noqa: E402  (the published tables, read once for every benchmark)
from rotation_ablation import cpu_name  # noqa: E402

log = logging.getLogger("best_rows")

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = "DAT-light/DAT_light_x{scale}.pth"
TRANSFORMS = ["--method", "dobi", "--granularity", "per-channel", "--smooth", "all", "--shifts"]
#: bits -> 2dq-calibrate options: the held-out winner of each width (rotation_ablation.md, reconstruct.md):
#: W4 the rotated recipe with GPTQ under a 4-bit budget (mixed precision), W3 the rotated recipe with block
#: reconstruction and learned rounding under a 3-bit budget, W2 the same without the budget (at 2 bits no
#: quantizer can go lower to pay for another's higher width: a 2-bit budget is the uniform model)
RECIPES = {
    4: [*TRANSFORMS, "--rotate", "inputs", "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--bit-budget", "4", "--reconstruct-iters", "200"],
    3: [*TRANSFORMS, "--rotate", "inputs", "--reconstruct", "--learned-rounding", "--bit-budget", "3",
        "--reconstruct-iters", "200"],
    2: [*TRANSFORMS, "--rotate", "inputs", "--reconstruct", "--learned-rounding", "--reconstruct-affine",
        "--reconstruct-iters", "200"],
}
#: FP PSNR / SSIM of our evaluator (benchmarks/dat_light_ptq.md, results/dat_light_ptq_*.json; equal to the
#: published figures within 0.01 dB)
FP = {4: {"Set5": 32.571, "Set14": 28.869, "B100": 27.749}, 2: {"Set5": 38.236, "Set14": 34.013, "B100": 32.350}}
SETS = "Set5,Set14,B100"
TILE = 64


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def save(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def parse_row(text: str) -> tuple[int, int]:
    """``x4w3`` -> (4, 3)."""
    try:
        scale, bits = text.lower().removeprefix("x").split("w")
        return int(scale), int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows: {text!r} is not like x4w4") from None


def run_row(scale: int, bits: int, args: argparse.Namespace, data: dict) -> None:
    key = f"x{scale}w{bits}a{bits}"
    row = data["rows"].setdefault(key, {"scale": scale, "bits": bits, "recipe": RECIPES[bits], "seconds": {},
                                        "commands": {}})
    work = args.work / key
    work.mkdir(parents=True, exist_ok=True)
    weights = args.shared / "models" / WEIGHTS.format(scale=scale)
    artifact, onnx_file, engine = work / "artifact.safetensors", work / "model.onnx", work / "engine.ort.onnx"
    t = str(args.threads)
    steps = {
        "calibrate": [_tool("2dq-calibrate"), "--weights", str(weights), "--calib-images", str(args.calib_images),
                      "--bits", str(bits), "--patches", str(args.patches), "--seed", "0", "--threads", t,
                      "--no-progress", "--out", str(artifact), *RECIPES[bits]],
        "export": [_tool("2dq-export"), "--onnx", str(onnx_file), "--weights", str(weights), "--calib", str(artifact),
                   "--tile", str(TILE)],
        "build": [_tool("2dq-build-engine"), "--backend", "ort", "--onnx", str(onnx_file), "--out", str(engine),
                  "--threads", t, "--verify", "--weights", str(weights), "--calib", str(artifact),
                  "--data", str(args.shared / "datasets"), "--sets", "Set5"],
        "eval": [_tool("2dq-eval"), "--backend", "ort", "--engine", str(engine), "--data",
                 str(args.shared / "datasets"), "--sets", SETS, "--threads", t, "--no-progress"],
        # the fake-quant model on whole Set5 images (no tiles): what tests/benchmarks/test_best_artifacts.py re-checks
        "fakequant": [_tool("2dq-eval"), "--weights", str(weights), "--calib", str(artifact), "--data",
                      str(args.shared / "datasets"), "--sets", "Set5", "--threads", t, "--no-progress"],
    }
    for step, cmd in steps.items():
        if step in row["seconds"]:
            continue
        report = work / f"{step}.json"
        cmd = [*cmd, "--json", str(report)]
        row["commands"][step] = " ".join([Path(cmd[0]).name, *cmd[1:]])
        log.info("%s %s", key, step)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode not in (0, 1) or not report.is_file():
            raise RuntimeError(f"{key} {step}: exit {done.returncode}\n{done.stderr[-3000:]}")
        row["seconds"][step] = round(time.perf_counter() - started, 1)
        row["threads"] = args.threads
        summary = json.loads(report.read_text())
        if step == "calibrate":
            row["calibrate_s"] = summary.get("seconds")
            meta = json.loads(artifact.with_suffix(".json").read_text())
            row["transforms"] = meta.get("method_options", {}).get("transforms", {})
            budget = meta.get("method_options", {}).get("bit_budget")
            if budget:  # mixed precision: the averages the budget held (weights per parameter, activations per element)
                row["average_bits"] = budget["average_bits"]
        elif step == "build":
            row["verify"] = summary.get("verification", summary.get("verify"))
            row["verify_passed"] = done.returncode == 0
        elif step == "eval":
            row["results"] = {r["set"]: {"psnr": r["psnr"], "ssim": r["ssim"]} for r in summary["results"]}
        elif step == "fakequant":
            (result,) = summary["results"]
            row["fakequant_set5_whole"] = {"psnr": result["psnr"], "ssim": result["ssim"]}
        save(args.out, data)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    target = args.artifacts / f"dat_light_x{scale}_w{bits}a{bits}"
    shutil.copyfile(artifact, target.with_suffix(".safetensors"))
    shutil.copyfile(artifact.with_suffix(".json"), target.with_suffix(".json"))
    row["artifact"] = str(target.with_suffix(".safetensors").relative_to(args.artifacts.parent.parent))
    save(args.out, data)


def width(row: dict) -> str:
    """``W4A4``, or for a mixed-precision row ``W4A4 mixed (avg 4.00 / 4.00)`` (weights / activations)."""
    label = f"W{row['bits']}A{row['bits']}"
    average = row.get("average_bits")
    return f"{label} mixed (avg {average['weight']:.2f} / {average['activation']:.2f})" if average else label


def table(data: dict) -> str:
    lines = ["| scale | W/A | recipe | Set5 PSNR / SSIM | Set14 PSNR / SSIM | B100 PSNR / SSIM | drop from FP (Set5 / "
             "Set14 / B100) | Set5 fake quant, whole images | --verify (engine vs reference / floor) | calibrate (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in sorted(data["rows"].items(), key=lambda kv: (kv[1]["scale"], -kv[1]["bits"])):
        results = row.get("results", {})
        fp = FP.get(row["scale"], {})
        cells = [f"{results[s]['psnr']:.2f} / {results[s]['ssim']:.4f}" if s in results else "–" for s in SETS.split(",")]
        drops = [f"{fp[s] - results[s]['psnr']:.2f}" if s in results and s in fp else "–" for s in SETS.split(",")]
        verify = {True: "PASS", False: "FAIL"}.get(row.get("verify_passed"), "–")
        check = row.get("verify") or {}
        if "psnr_vs_reference" in check:
            verify += f" ({check['psnr_vs_reference']:.1f} / {check['floor']:.1f} dB)"
        recipe = " ".join(o for o in row["recipe"] if o not in ("--method",))
        seconds = f"{row['calibrate_s']:.0f}" if row.get("calibrate_s") is not None else "–"
        if row.get("threads", 1) != 1 and row.get("calibrate_s") is not None:
            seconds += f" ({row['threads']} threads)"
        fq = row.get("fakequant_set5_whole")
        whole = f"{fq['psnr']:.2f} / {fq['ssim']:.4f}" if fq else "–"
        lines.append(f"| x{row['scale']} | {width(row)} | `{recipe}` | {' | '.join(cells)} | "
                     f"{' / '.join(drops)} | {whole} | {verify} | {seconds} |")
    return "\n".join(lines)


def published_table(data: dict) -> str:
    """Drop from FP (dB, Set5 / Set14 / B100) of each row beside the published SwinIR-light methods at the same
    scale and bits (from the 2DQuant paper's FP; ``../shared/reference``)."""
    lines = [line for line in LATER.read_text().splitlines() if not line.startswith("#")]
    later = {(int(r["scale"]), r["method"], int(r["bits"])): r for r in csv.DictReader(lines)}
    paper = _paper()
    out = ["| scale | W/A | ours (deployed ORT engine) | 2DQuant | CondiQuant | CompSRT (fake quant) |",
           "|---|---|---|---|---|---|"]
    for row in sorted(data["rows"].values(), key=lambda r: (r["scale"], -r["bits"])):
        scale, bits, results = row["scale"], row["bits"], row.get("results", {})
        ours = " / ".join(f"{FP[scale][s] - results[s]['psnr']:.2f}" if s in results else "–" for s in SETS.split(","))
        fp_paper = paper[(scale, "FP", 32)]
        cells = []
        for name in ("2DQuant", "CondiQuant", "CompSRT"):
            ref = paper.get((scale, name, bits)) if name == "2DQuant" else later.get((scale, name, bits))
            cells.append("–" if ref is None else " / ".join(
                f"{float(fp_paper[s + '_psnr']) - float(ref.get(s) or ref[s + '_psnr']):.2f}" for s in SETS.split(",")))
        out.append(f"| x{scale} | {width(row)} | {ours} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="x4w4,x4w3,x4w2", help="comma-separated rows, e.g. x4w4,x2w4")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumable)")
    parser.add_argument("--markdown", type=Path, help="also write the table there")
    parser.add_argument("--shared", type=Path, default=SHARED, help="data room (default: %(default)s)")
    parser.add_argument("--calib-images", type=Path, help="calibration images (default: <shared>/datasets/train)")
    parser.add_argument("--patches", type=int, default=32, help="calibration patches (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads of every tool (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/best_rows"), help="scratch (default: %(default)s)")
    parser.add_argument("--artifacts", type=Path, default=Path(__file__).resolve().parent / "artifacts",
                        help="where each row's artifact is copied (default: benchmarks/artifacts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.calib_images = args.calib_images or args.shared / "datasets" / "train"
    rows = [parse_row(r) for r in args.rows.split(",") if r]
    for scale, bits in rows:
        if bits not in RECIPES or scale not in FP:
            parser.error(f"--rows: no recipe for x{scale} W{bits}A{bits}")
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    data["machine"] = {"cpu": cpu_name(), "python": platform.python_version(), "threads": args.threads}
    for scale, bits in rows:
        run_row(scale, bits, args, data)
    text = table(data) + "\n\n" + published_table(data)
    print(text)
    if args.markdown:
        with atomic_path(args.markdown) as tmp:
            tmp.write_text(text + "\n")



if __name__ == "__main__":
    main()
