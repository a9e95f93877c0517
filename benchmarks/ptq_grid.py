"""PTQ results grid through the user-facing tools: ``2dq-calibrate`` then ``2dq-eval`` per cell.

Each cell (scale, method, bits) calibrates an artifact on the training images and evaluates the
fake-quant model on the test sets; results go to a JSON file after every cell (a rerun skips the
cells already there, so a killed run resumes; a DQC run killed mid-cell continues from its
checkpoint), and ``--markdown`` renders the table with the paper's Table 3 rows (SwinIR-light)
beside it for context. Artifacts live in ``--work``; one lost there (a new machine) is made again
for the row's remaining sets and must hold the same bounds as the first run (:func:`reconcile`),
which it does on the same CPU model and thread count (each calibration records its CPU).

    python benchmarks/ptq_grid.py --weights ../shared/models/NGswin/NGswin_x{scale}.pth --scales 2,3 \\
        --methods minmax,percentile,dobi --bits 4,3,2 --sets Set5,Set14 \\
        --out benchmarks/results/ngswin_ptq_grid.json
    python benchmarks/ptq_grid.py --out benchmarks/results/ngswin_ptq_grid.json --markdown benchmarks/ngswin_ptq.md
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calib.dqc_cli import CHECKPOINT_SUFFIX

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PAPER = SHARED / "reference" / "paper_table3.csv"
LATER = SHARED / "reference" / "later_ptq_swinir_light.csv"


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _bin(name: str) -> str:
    """The console script ``name`` beside this Python, else the one on ``PATH`` (a machine where the
    project is importable but not pip-installed, e.g. a lent GPU, puts small wrappers there)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or str(beside))


def calibrate(args: argparse.Namespace, scale: int, method: str, bits: int, data: dict) -> Path:
    """The cell's artifact in ``--work`` (calibrated once; its time, command and bounds hash recorded in ``data``).

    An artifact lost from ``--work`` (a new machine) is made again for the row's remaining sets; see
    :func:`reconcile` for how the remake is checked against the first run.
    """
    key = f"x{scale}_{method.partition('=')[0]}_w{bits}a{bits}"
    artifact = args.work / f"{key}.safetensors"
    recorded = data["calibrations"].get(key)
    if recorded is not None and artifact.exists():
        return artifact
    threads = ["--threads", str(args.threads)] if args.threads else []
    label, _, options = method.partition("=")
    chosen = shlex.split(options) if options else ["--method", label]
    # a DQC run killed mid-cell left its checkpoint beside the artifact: continue it (the same bounds
    # as an uninterrupted run); a finished checkpoint whose artifact was lost gives its best step back
    resume = ["--resume"] if artifact.with_name(key + CHECKPOINT_SUFFIX).exists() else []
    cmd = [_bin("2dq-calibrate"), "--weights", _weights(args, scale), "--calib-images", str(args.calib_images),
           *chosen, "--bits", str(bits), "--out", str(artifact), "--no-progress", "-q",
           *threads, *shlex.split(args.calib_extra), *resume]
    seconds = round(_run(cmd), 1)
    run = {"seconds": seconds, "cmd": shlex.join(cmd), "bounds_sha256": bounds_digest(artifact), "cpu": cpu_model()}
    data["calibrations"][key] = reconcile(key, recorded, run)
    return artifact


def cpu_model() -> str:
    """The CPU model and the kernel level PyTorch uses on it, e.g. ``AMD EPYC (AVX512)``.

    Recorded per calibration: float results are bit-reproducible only on the same CPU kernels, and
    DQC's trajectory carries a last-bit difference on to different bounds.
    """
    import torch

    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    gpu = f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}{gpu})"


def bounds_digest(artifact: Path) -> str:
    """SHA-256 of the artifact's tensors (names, dtypes, shapes, bytes, in name order).

    Not the file's hash: safetensors writes its metadata map in no fixed order, so two runs with
    equal bounds can differ byte for byte (and the sidecar has a creation time).
    """
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(artifact)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reconcile(key: str, recorded: dict | None, run: dict) -> dict:
    """The calibration record of ``key`` after a run of it: the first run's record, with a remake noted.

    The cells already in the results came from the first artifact, so a remade one must hold the
    same bounds (calibration is seeded and deterministic on one CPU model and thread count): a
    different hash stops the grid rather than mixing two artifacts in one row. A record from before
    hashes were kept cannot be checked; the remake is noted beside it with a warning.
    """
    if recorded is None:
        return run
    first = recorded.get("bounds_sha256")
    if first is not None and first != run["bounds_sha256"]:
        cpus = (f" on another CPU ({run.get('cpu')}; the first run: {recorded['cpu']})"
                if recorded.get("cpu", run.get("cpu")) != run.get("cpu") else "")
        raise SystemExit(f"{key}: the remade artifact's bounds (SHA-256 {run['bounds_sha256']}){cpus} differ from "
                         f"the first run's ({first}), whose cells are already in the results: remove that row's "
                         "cells to measure it again, or calibrate on the CPU and thread count of the first run")
    if first is None:
        print(f"warning: {key} was remade; its first run kept no bounds hash, so the row's earlier cells "
              "cannot be shown to come from the same bounds (re-evaluate one of them to check)", file=sys.stderr)
    return {**recorded, "remade": run}


def evaluate(args: argparse.Namespace, scale: int, method: str, bits: int, set_name: str,
             artifact: Path | None) -> dict:
    method = method.partition("=")[0]
    out = args.work / f"x{scale}_{method}_w{bits}a{bits}_{set_name}.eval.json"
    cmd = [_bin("2dq-eval"), "--weights", _weights(args, scale), "--data", str(args.data), "--sets", set_name,
           "--json", str(out), "--no-progress", "-q"]
    if artifact is not None:
        cmd += ["--calib", str(artifact)]
    cmd += shlex.split(args.eval_extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    (row,) = json.loads(out.read_text())["results"]
    return {"scale": scale, "method": method, "bits": bits, "set": set_name, "psnr": row["psnr"],
            "ssim": row["ssim"], "images": row["images"], "eval_s": round(seconds, 1), "cmd": shlex.join(cmd)}


def _weights(args: argparse.Namespace, scale: int) -> str:
    return args.weights.replace("{scale}", str(scale))


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"cells": [], "calibrations": {}, "machine": {}}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _include_spec(spec: str) -> tuple[dict, set[str] | None]:
    path, _, methods = spec.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"--include: no results file {path}")
    return load(Path(path)), set(methods.split(",")) if methods else None


def merge(data: dict, other: dict, methods: set[str] | None = None) -> None:
    """Add ``other``'s cells (and their calibrations) to ``data``; a cell already in ``data`` wins.

    A calibration in both with another bounds hash (or none recorded) is kept as ``data``'s, with
    ``other``'s noted under ``remade``. ``other``'s superseded rows (:func:`remake_table`) are added.
    """
    have = {(c["scale"], c["method"], c["bits"], c["set"]) for c in data["cells"]}
    for cell in other["cells"]:
        key = (cell["scale"], cell["method"], cell["bits"], cell["set"])
        if (methods is None or cell["method"] in methods) and key not in have:
            data["cells"].append(cell)
            have.add(key)
    for entry in other.get("superseded", []):
        if (methods is None or entry["cells"][0]["method"] in methods) and entry not in data.get("superseded", []):
            data.setdefault("superseded", []).append(entry)
    for key, calibration in other["calibrations"].items():
        mine = data["calibrations"].setdefault(key, calibration)
        if mine is not calibration and "remade" not in mine and mine.get("bounds_sha256") != calibration.get(
                "bounds_sha256"):
            mine["remade"] = calibration  # the same row calibrated again elsewhere (another --out)


def _paper() -> dict[tuple, dict]:
    lines = [line for line in PAPER.read_text().splitlines() if not line.startswith("#")]
    return {(int(r["scale"]), r["method"], int(r["bits"])): r for r in csv.DictReader(lines)}


ORDER = {"FP": 0, "minmax": 1, "percentile": 2, "dobi": 3, "2dquant": 4}
PAPER_NAME = {"FP": "FP", "minmax": "MinMax", "percentile": "Percentile", "dobi": "DOBI", "2dquant": "2DQuant"}
SETS = ("Set5", "Set14", "B100")


def markdown(data: dict) -> str:
    """One row per (scale, bits, method): ours per set, the paper's SwinIR-light per set, times."""
    sets = [s for s in SETS if any(c["set"] == s for c in data["cells"])]
    rows: dict[tuple, dict] = {}
    for cell in data["cells"]:
        rows.setdefault((cell["scale"], cell["bits"], cell["method"]), {})[cell["set"]] = cell
    paper = _paper()
    head = ("| scale | W/A | method | " + " | ".join(f"{s} PSNR / SSIM" for s in sets)
            + " | " + " | ".join(f"paper {s}" for s in sets)
            + " | drop from FP, ours / paper (" + ", ".join(sets) + ") | calibrate (s) | eval (s) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for scale, bits, method in sorted(rows, key=lambda k: (k[0], -k[1], ORDER.get(k[2], 9))):
        by_set = rows[(scale, bits, method)]
        ours = [f"{by_set[s]['psnr']:.2f} / {by_set[s]['ssim']:.4f}" if s in by_set else "–" for s in sets]
        ref = paper.get((scale, PAPER_NAME.get(method, ""), bits))
        theirs = [f"{ref[s + '_psnr']} / {ref[s + '_ssim']}" if ref else "–" for s in sets]
        fp_ours, fp_paper = rows.get((scale, 32, "FP"), {}), paper.get((scale, "FP", 32))
        drops = []
        for s in sets:
            mine = f"{fp_ours[s]['psnr'] - by_set[s]['psnr']:.2f}" if s in by_set and s in fp_ours else "–"
            published = f"{float(fp_paper[s + '_psnr']) - float(ref[s + '_psnr']):.2f}" if ref and fp_paper else "–"
            drops.append(f"{mine} / {published}")
        drop = "–" if method == "FP" else ", ".join(drops)
        calib = data["calibrations"].get(f"x{scale}_{method}_w{bits}a{bits}", {}).get("seconds", 0.0)
        evals = "+".join(f"{by_set[s]['eval_s']:.0f}" for s in sets if s in by_set)
        label = "FP" if bits == 32 else f"W{bits}A{bits}"
        out.append(f"| x{scale} | {label} | {method} | " + " | ".join(ours) + " | " + " | ".join(theirs)
                   + f" | {drop} | {calib:.0f} | {evals} |")
    return "\n".join(out) + "\n"


def later_table(data: dict) -> str:
    """Drop from FP (Set5/Set14/B100 PSNR, dB) of our best row per (scale, bits) beside the published
    SwinIR-light methods (2DQuant, CondiQuant, CompSRT; reference/later_ptq_swinir_light.csv)."""
    lines = [line for line in LATER.read_text().splitlines() if not line.startswith("#")]
    later = {(int(r["scale"]), r["method"], int(r["bits"])): r for r in csv.DictReader(lines)}
    paper = _paper()
    cells = {(c["scale"], c["method"], c["bits"], c["set"]): c["psnr"] for c in data["cells"]}
    out = ["Drop from FP in dB (Set5 / Set14 / B100): ours (best method per row, from our FP) beside the published "
           "SwinIR-light methods (from the paper's FP; `../shared/reference/later_ptq_swinir_light.csv`):", "",
           "| scale | W/A | ours (best) | 2DQuant | CondiQuant | CompSRT |", "|---|---|---|---|---|---|"]
    keys = sorted({(c["scale"], c["bits"]) for c in data["cells"] if c["bits"] != 32}, key=lambda k: (k[0], -k[1]))
    for scale, bits in keys:
        fp = {s: cells.get((scale, "FP", 32, s)) for s in SETS}
        methods = {m for (sc, m, b, _s) in cells if sc == scale and b == bits}
        best = max(methods, key=lambda m: cells.get((scale, m, bits, "Set5"), -1.0))
        ours = " / ".join(f"{fp[s] - cells[(scale, best, bits, s)]:.2f}" if fp[s] is not None and
                          (scale, best, bits, s) in cells else "–" for s in SETS)
        fp_paper = paper.get((scale, "FP", 32))
        published = []
        for name in ("2DQuant", "CondiQuant", "CompSRT"):
            row = later.get((scale, name, bits)) or (paper.get((scale, name, bits)) if name == "2DQuant" else None)
            if row is None or fp_paper is None:
                published.append("–")
                continue
            value = (lambda s: row.get(s) or row.get(f"{s}_psnr"))
            published.append(" / ".join(f"{float(fp_paper[s + '_psnr']) - float(value(s)):.2f}" for s in SETS))
        out.append(f"| x{scale} | W{bits}A{bits} | {ours} ({best}) | " + " | ".join(published) + " |")
    return "\n".join(out) + "\n"


def delta_table(data: dict, base: str) -> str:
    """One row per (scale, bits, set): FP and ``base`` PSNR, then every other method's PSNR minus ``base``'s."""
    cells = {(c["scale"], c["method"], c["bits"], c["set"]): c["psnr"] for c in data["cells"]}
    methods = [m for m in dict.fromkeys(c["method"] for c in data["cells"]) if m not in (base, "FP")]
    keys = sorted({(c["scale"], c["bits"], c["set"]) for c in data["cells"] if c["method"] == base},
                  key=lambda k: (k[0], -k[1], SETS.index(k[2]) if k[2] in SETS else 9))
    head = f"| scale | W/A | set | FP | {base} | " + " | ".join(f"{m} (Δ dB)" for m in methods) + " |"
    out = [f"PSNR difference from {base}, per cell (dB):", "", head, "|" + "---|" * (len(methods) + 5)]
    for scale, bits, set_name in keys:
        ref = cells[(scale, base, bits, set_name)]
        fp = cells.get((scale, "FP", 32, set_name))
        deltas = [f"{cells[(scale, m, bits, set_name)] - ref:+.2f}" if (scale, m, bits, set_name) in cells else "–"
                  for m in methods]
        out.append(f"| x{scale} | W{bits}A{bits} | {set_name} | {'–' if fp is None else f'{fp:.2f}'} | {ref:.2f} | "
                   + " | ".join(deltas) + " |")
    return "\n".join(out) + "\n"


def remake_table(data: dict) -> str:
    """The rows measured twice: the first run's cells (``data["superseded"]``) beside the remake's.

    A row whose artifact was lost and could not be remade bit for bit (another CPU) is measured again
    on the new artifact; its first cells move to ``superseded`` (``{"key", "reason", "calibration",
    "cells"}``) and this table shows both runs, the spread of one cell between two calibrations.
    """
    now = {(c["scale"], c["method"], c["bits"], c["set"]): c["psnr"] for c in data["cells"]}
    out = ["Rows calibrated twice (the first artifact lost; the remake did not reproduce it bit for bit), "
           "PSNR dB; the table above has the remake:", "",
           "| scale | W/A | method | set | first run | remake | remake - first |", "|---|---|---|---|---|---|---|"]
    for entry in data.get("superseded", []):
        for cell in sorted(entry["cells"], key=lambda c: SETS.index(c["set"]) if c["set"] in SETS else 9):
            again = now.get((cell["scale"], cell["method"], cell["bits"], cell["set"]))
            if again is not None:
                out.append(f"| x{cell['scale']} | W{cell['bits']}A{cell['bits']} | {cell['method']} | {cell['set']} | "
                           f"{cell['psnr']:.2f} | {again:.2f} | {again - cell['psnr']:+.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED / "models/NGswin/NGswin_x{scale}.pth"),
                        help="checkpoint path; {scale} is replaced by each scale")
    parser.add_argument("--scales", default="2")
    parser.add_argument("--methods", default="minmax,percentile,dobi",
                        help="comma-separated 2dq-calibrate methods, or ';'-separated LABEL=OPTIONS variants "
                        "(e.g. '2dquant+pc=--method 2dquant --granularity per-channel')")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--sets", default="Set5", help="comma-separated; each set is a separate, resumable cell")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets")
    parser.add_argument("--calib-images", type=Path, default=SHARED / "datasets/train")
    parser.add_argument("--calib-extra", default="", help="extra 2dq-calibrate options, one string")
    parser.add_argument("--eval-extra", default="", help="extra 2dq-eval options, one string (e.g. '--device cuda')")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--fp", action="store_true", help="also evaluate the float model per scale")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "2dq-grid",
                        help="where artifacts and per-cell outputs are kept (reused by later runs)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--markdown", type=Path, help="render the table of --out to this file and exit")
    parser.add_argument("--include", action="append", default=[], metavar="JSON[:METHODS]",
                        help="with --markdown: also the cells of another results file (only METHODS, "
                        "comma-separated, when given); repeatable")
    parser.add_argument("--later", action="store_true",
                        help="with --markdown: add the later published PTQ results on SwinIR-light (CondiQuant, "
                        "CompSRT) as drops from the paper's FP, beside ours from our FP")
    parser.add_argument("--delta-vs", metavar="METHOD",
                        help="with --markdown: also a table of every method's PSNR minus METHOD's, per cell")
    args = parser.parse_args()
    data = load(args.out)
    if args.markdown:
        for spec in args.include:
            merge(data, *_include_spec(spec))
        text = markdown(data)
        if args.delta_vs:
            text += "\n" + delta_table(data, args.delta_vs)
        if data.get("superseded"):
            text += "\n" + remake_table(data)
        if args.later:
            text += "\n" + later_table(data)
        args.markdown.write_text(text)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data["machine"] = {"platform": platform.platform(), "processor": cpu_model(),
                       "cpus": os.cpu_count(), "python": platform.python_version(), "threads": args.threads}
    done = {(c["scale"], c["method"], c["bits"], c["set"]) for c in data["cells"]}
    for set_name in args.sets.split(","):
        for scale in map(int, args.scales.split(",")):
            todo = [("FP", 32)] if args.fp else []
            methods = args.methods.split(";") if "=" in args.methods else args.methods.split(",")
            todo += [(m, int(b)) for b in args.bits.split(",") for m in methods]
            for method, bits in todo:
                if (scale, method.partition("=")[0], bits, set_name) in done:
                    continue
                artifact = None if method == "FP" else calibrate(args, scale, method, bits, data)
                cell = evaluate(args, scale, method, bits, set_name, artifact)
                data["cells"].append(cell)
                save(args.out, data)
                print(f"x{scale} {cell['method']} W{bits}A{bits} {set_name}: {cell['psnr']:.2f} dB / {cell['ssim']:.4f} "
                      f"(eval {cell['eval_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
