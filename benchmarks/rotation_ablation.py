"""Input rotations on and off (issue 22 item 3): DAT-light x4 through ``2dq-calibrate`` and ``2dq-eval``.

Held-out protocol of ``tests/test_quality_direction.py``: the 28 shipped training images sorted by name,
the first 24 are the calibration folder, the last 4 the held-out check (a centred 128x128 HR crop and its
MATLAB-bicubic x4 LR, laid out as the benchmark set ``Heldout``). Never the test sets: ``--set5`` evaluates
named cells on the shipped Set5 once, after the choice was made on the held-out images.

Every cell (configuration x bits x patches x patch-sampling seed) runs ``2dq-calibrate`` then ``2dq-eval`` on
the fake-quant model and is appended to ``--out`` (JSON, written atomically after every cell; a rerun skips
the cells already there). Every new cell is also evaluated on ``heldout_large.py``'s 100 training images that no
cell calibrates on, as centred 256x256 crops (``--large-crop``; 64x64 LR, the engines' tile): the four 128x128
crops alone rewarded DQC refinements that lose at the deployed size (``reconstruct.md``, sessions 44-45)::

    python benchmarks/rotation_ablation.py --out benchmarks/results/rotation_ablation.json \\
        --configs dobi,dobi+rotate --bits 4 --patches 8,16,32 --seeds 0,1,2
    python benchmarks/rotation_ablation.py --out benchmarks/results/rotation_ablation.json \\
        --set5 'dobi+pc+smooth+shifts+rotate/w4a4/p32/s0'
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_WEIGHTS
from toolchain.data.heldout import make_heldout_split
from toolchain.files import atomic_path

log = logging.getLogger("rotation_ablation")

TRANSFORMS = ["--granularity", "per-channel", "--smooth", "all", "--shifts"]
ROTATE = ["--rotate", "inputs"]
#: the deployed W4A4 recipe at 200 steps per block (best_rows.py), base of the DQC refinements in REFINED
BASE_W4 = "dobi+pc+smooth+shifts+rotate+recon+round(drop)+budget(200)"
#: the deployed W2A2 recipe (best_rows.py), base of the W2A2 DQC refinements in REFINED
BASE_W2 = "dobi+pc+smooth+shifts+rotate+recon+round+affine(200)"
#: configuration name -> 2dq-calibrate options
CONFIGS = {
    "dobi": ["--method", "dobi"],
    "dobi+rotate": ["--method", "dobi", *ROTATE],
    "dobi+rotate(all)": ["--method", "dobi", "--rotate", "all"],
    "dobi+rotate(qk)": ["--method", "dobi", "--rotate", "qk"],
    "dobi+rotate(signed)": ["--method", "dobi", *ROTATE, "--rotation", "signed-hadamard"],
    "dobi+rotate(random)": ["--method", "dobi", *ROTATE, "--rotation", "random"],
    "dobi+pc": ["--method", "dobi", "--granularity", "per-channel"],
    "dobi+pc+rotate": ["--method", "dobi", "--granularity", "per-channel", *ROTATE],
    "dobi+pc+smooth+shifts": ["--method", "dobi", *TRANSFORMS],
    "dobi+pc+smooth+shifts+rotate": ["--method", "dobi", *TRANSFORMS, *ROTATE],
    "dobi+pc+smooth+shifts+rotate(all)": ["--method", "dobi", *TRANSFORMS, "--rotate", "all"],
    "dobi+pc+smooth+shifts+gptq": ["--method", "dobi", *TRANSFORMS, "--gptq"],
    "dobi+pc+smooth+shifts+rotate+gptq": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--gptq"],
    # block reconstruction (calib/reconstruct.py): the bounds, or the bounds and the weights' rounding (AdaRound)
    "dobi+pc+smooth+shifts+rotate+recon": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct"],
    "dobi+pc+smooth+shifts+rotate+recon+gptq": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--gptq"],
    "dobi+pc+smooth+shifts+rotate+recon+round": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                 "--learned-rounding"],
    "dobi+pc+smooth+shifts+rotate+recon(drop)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                 "--reconstruct-drop", "0.5"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                       "--learned-rounding", "--reconstruct-drop", "0.5"],
    # DQC (40 CPU steps, the command's default) on the rotated recipe, without and with learned rounding inside it
    "2dquant+pc+smooth+shifts+rotate": ["--method", "2dquant", *TRANSFORMS, *ROTATE],
    "2dquant+pc+smooth+shifts+rotate+round": ["--method", "2dquant", *TRANSFORMS, *ROTATE, "--learned-rounding"],
    # mixed precision under a bit budget equal to the cell's bits (calib/bit_budget.py) on top of the best recipe
    "dobi+pc+smooth+shifts+rotate+gptq+budget": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--gptq", "--bit-budget",
                                                 "{bits}"],
    "dobi+pc+smooth+shifts+gptq+budget": ["--method", "dobi", *TRANSFORMS, "--gptq", "--bit-budget", "{bits}"],
    "dobi+pc+smooth+shifts+rotate+recon+round+budget": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                        "--learned-rounding", "--bit-budget", "{bits}"],
    "dobi+pc+smooth+shifts+rotate+recon+round+budget(200)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                             "--learned-rounding", "--bit-budget", "{bits}",
                                                             "--reconstruct-iters", "200"],
    # ... and the blocks' float biases and LayerNorm affines trained with them (calib/float_affine.py)
    "dobi+pc+smooth+shifts+rotate+recon+round+affine": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                        "--learned-rounding", "--reconstruct-affine"],
    "dobi+pc+smooth+shifts+rotate+recon+round+affine(0.1)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                             "--learned-rounding", "--reconstruct-affine",
                                                             "--affine-lr", "0.1"],
    "dobi+pc+smooth+shifts+rotate+recon+round+affine(200)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                             "--learned-rounding", "--reconstruct-affine",
                                                             "--reconstruct-iters", "200"],
    "dobi+pc+smooth+shifts+rotate+recon+round+affine+budget": ["--method", "dobi", *TRANSFORMS, *ROTATE,
                                                               "--reconstruct", "--learned-rounding",
                                                               "--reconstruct-affine", "--bit-budget", "{bits}"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+budget": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct",
                                                              "--learned-rounding", "--reconstruct-drop", "0.5",
                                                              "--bit-budget", "{bits}"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+budget(200)": ["--method", "dobi", *TRANSFORMS, *ROTATE,
                                                                   "--reconstruct", "--learned-rounding",
                                                                   "--reconstruct-drop", "0.5", "--bit-budget", "{bits}",
                                                                   "--reconstruct-iters", "200"],
    # the same with the budget's sensitivities measured on the transformed model (--bit-budget-on transformed)
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+budget(transformed)(200)": [
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--bit-budget", "{bits}", "--bit-budget-on", "transformed", "--reconstruct-iters", "200"],
    # the weights' grids trained with their rounding (--rounding-grids), at the default and a 10x grid learning rate
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+grids+budget(200)": [
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--rounding-grids", "--bit-budget", "{bits}", "--reconstruct-iters", "200"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+grids(1e-2)+budget(200)": [
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--rounding-grids", "--grid-lr", "1e-2", "--bit-budget", "{bits}", "--reconstruct-iters", "200"],
    "dobi+pc+smooth+shifts+rotate+recon+round+grids(1e-2)+affine(200)": [   # on the W2A2 recipe (BASE_W2)
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--rounding-grids",
        "--grid-lr", "1e-2", "--reconstruct-affine", "--reconstruct-iters", "200"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+budget(300)": [
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--bit-budget", "{bits}", "--reconstruct-iters", "300"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+affine+budget(200)": [
        "--method", "dobi", *TRANSFORMS, *ROTATE, "--reconstruct", "--learned-rounding", "--reconstruct-drop", "0.5",
        "--reconstruct-affine", "--bit-budget", "{bits}", "--reconstruct-iters", "200"],
    "dobi+pc+smooth+shifts+rotate+recon+round(drop)+affine+budget": ["--method", "dobi", *TRANSFORMS, *ROTATE,
                                                                     "--reconstruct", "--learned-rounding",
                                                                     "--reconstruct-drop", "0.5",
                                                                     "--reconstruct-affine", "--bit-budget", "{bits}"],
    "dobi+rotate(attn)": ["--method", "dobi", *ROTATE, "--rotate-only", "*.attn.qkv,*.attn.proj"],
    "dobi+rotate(ffn)": ["--method", "dobi", *ROTATE, "--rotate-only", "*.ffn.fc1,*.ffn.fc2"],
    **{f"dobi+rotate({name})": ["--method", "dobi", *ROTATE, "--rotate-only", f"*.{name}"]
       for name in ("qkv", "proj", "fc1", "fc2")},
    "dobi+pc+smooth+shifts+rotate(ffn)": ["--method", "dobi", *TRANSFORMS, *ROTATE, "--rotate-only",
                                          "*.ffn.fc1,*.ffn.fc2"],
    # bounds, not deployable rows ([qk-float]): the spatial attentions' q and k unquantized, what a perfect
    # q/k quantizer (e.g. a folded q/k rotation) could give at most
    "dobi[qk-float]": ["--method", "dobi", "--exclude", "*.attns.*.matmul.0.*"],
    "dobi+rotate[qk-float]": ["--method", "dobi", *ROTATE, "--exclude", "*.attns.*.matmul.0.*"],
}


#: configuration name -> (base configuration, options of a second ``2dq-calibrate --method 2dquant --init``): DQC of
#: the bounds from the base cell's artifact (run first when ``--work`` does not hold it), e.g. after block
#: reconstruction; the cell's calibration seconds are the second run's, the base cell's are in ``base_calibrate_s``
REFINED = {
    **{f"{BASE_W4}+dqc({lr})": (BASE_W4, ["--dqc-lr", lr]) for lr in ("1e-3", "3e-3")},
    # DQC's patches (training and validation) at the engines' 64x64 LR tile instead of its default 48x48
    f"{BASE_W4}+dqc64(3e-3)": (BASE_W4, ["--dqc-lr", "3e-3", "--dqc-patch-size", "64"]),
    f"{BASE_W2}+dqc64(3e-3)": (BASE_W2, ["--dqc-lr", "3e-3", "--dqc-patch-size", "64"]),
}


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(cmd: list[str]) -> float:
    """Run ``cmd``; its wall seconds (a failure raises with its stderr)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def make_split(work: Path) -> tuple[Path, Path]:
    """(calibration folder of 24 images, benchmark root holding the set ``Heldout``), made once under ``work``."""
    return make_heldout_split(DEFAULT_CALIB_IMAGES, work / "split")


def evaluate(artifact: Path | None, data: Path | None, sets: str, report: Path, threads: int) -> tuple[dict, float]:
    cmd = [_tool("2dq-eval"), "--weights", str(DEFAULT_WEIGHTS), "--sets", sets, "--no-progress", "--json",
           str(report), "--threads", str(threads)]
    cmd += ["--calib", str(artifact)] if artifact is not None else []
    cmd += ["--data", str(data)] if data is not None else []
    seconds = _run(cmd)
    (row,) = json.loads(report.read_text())["results"]
    return row, seconds


def _artifact(args: argparse.Namespace, config: str, bits: int, patches: int, seed: int) -> Path:
    name = f"{config}/w{bits}a{bits}/p{patches}/s{seed}"
    return args.work / "artifacts" / (re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".safetensors")


def cell(args: argparse.Namespace, calib: Path, heldout: Path, config: str, bits: int, patches: int,
         seed: int) -> dict:
    artifact = _artifact(args, config, bits, patches, seed)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    common = ["--calib-images", str(calib), "--seed", str(seed), "--threads", str(args.threads), "--no-progress", "-q",
              "--out", str(artifact)]
    extra = {}
    if config in REFINED:
        base, options = REFINED[config]
        source = _artifact(args, base, bits, patches, seed)
        if not source.is_file():
            extra["base_calibrate_s"] = cell(args, calib, heldout, base, bits, patches, seed)["calibrate_s"]
        extra["base_artifact"] = str(source)
        options = ["--method", "2dquant", "--init", str(source), *options]
        calibrate_s = _run([_tool("2dq-calibrate"), *common, *options])
    else:
        options = [option.replace("{bits}", str(bits)) for option in CONFIGS[config]]  # e.g. --bit-budget {bits}
        calibrate_s = _run([_tool("2dq-calibrate"), *common, "--bits", str(bits), "--patches", str(patches), *options])
    row, eval_s = evaluate(artifact, heldout, "Heldout", artifact.with_suffix(".eval.json"), args.threads)
    if args.large_root is not None:   # the 100-image check at --large-crop (heldout_large.py)
        large, _ = evaluate(artifact, args.large_root, args.large_set, artifact.with_suffix(".large.eval.json"),
                            args.threads)
        extra.update(heldout_large_psnr=large["psnr"], heldout_large_ssim=large["ssim"],
                     heldout_large_crop=args.large_crop)
    meta = json.loads(artifact.with_suffix(".json").read_text())
    return {"config": config, "options": options, "bits": bits, "patches": patches, "seed": seed,
            "heldout_psnr": row["psnr"], "heldout_ssim": row["ssim"], "calibrate_s": round(calibrate_s, 1),
            "eval_s": round(eval_s, 1), "artifact": str(artifact),
            "transforms": meta["method_options"].get("transforms", {}), **extra}


def cpu_name() -> str:
    """The CPU model and core count, for the results' ``machine`` record (also ``best_rows.py``)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {len(names) or '?'} cores"


def _summary(values: list[float]) -> str:
    spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread} ({', '.join(f'{v:.3f}' for v in values)})"


def table(data: dict, only: frozenset[str] = frozenset()) -> str:
    """Markdown: held-out PSNR per configuration, bits and patches, mean +- sample sd over the seeds run
    (the configurations in ``only``, or all), and on the 100 larger crops where the cells have them."""
    rows: dict[tuple, list[dict]] = {}
    for entry in data["cells"].values():
        if not only or entry["config"] in only:
            rows.setdefault((entry["config"], entry["bits"], entry["patches"]), []).append(entry)
    lines = ["| W/A | patches | configuration | held-out PSNR (dB), 4 crops: mean (seeds) | from FP (dB) | "
             "100 larger crops (dB): mean (seeds) |", "|---|---|---|---|---|---|"]
    for (config, bits, patches), entries in sorted(rows.items(), key=lambda kv: (-kv[0][1], kv[0][2], kv[0][0])):
        values = [e["heldout_psnr"] for e in entries]
        crops = {e["heldout_large_crop"] for e in entries if "heldout_large_psnr" in e}
        large = "-" if not crops else "mixed crop sizes" if len(crops) > 1 else None
        if large is None:   # one crop size: mean over the seeds, and how far from the float model on the same crops
            (crop,), psnr = crops, [e["heldout_large_psnr"] for e in entries if "heldout_large_psnr" in e]
            fp = data.get("fp_large", {}).get(str(crop), {}).get("psnr")
            behind = f", {fp - statistics.fmean(psnr):.2f} from FP" if fp else ""
            large = f"{_summary(psnr)} at {crop}x{crop}{behind}"
        lines.append(f"| W{bits}A{bits} | {patches} | {config} | {_summary(values)} | "
                     f"{data['fp']['heldout_psnr'] - statistics.fmean(values):.2f} | {large} |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}, "set5": {}}


def save(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (appended cell by cell)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rotation_ablation"),
                        help="split and artifacts (default: %(default)s)")
    parser.add_argument("--configs", default="dobi,dobi+rotate",
                        help=f"comma-separated, from {', '.join([*CONFIGS, *REFINED])}")
    parser.add_argument("--bits", default="4", help="comma-separated bit widths (weights = activations)")
    parser.add_argument("--patches", default="8,16,32", help="comma-separated calibration patch counts")
    parser.add_argument("--seeds", default="0", help="comma-separated patch-sampling seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every tool (default: %(default)s)")
    parser.add_argument("--set5", default="", help="comma-separated cell names to evaluate on the shipped Set5 "
                        "(after the held-out choice), plus 'fp' for the float model")
    parser.add_argument("--large-crop", type=int, default=256,
                        help="also evaluate every new cell on heldout_large.py's 100 training images (never "
                        "calibrated on) as centred crops of this side, a multiple of 4; 0: off (default: "
                        "%(default)s, 64x64 LR, the engines' tile: the 4 small crops alone favoured levers that "
                        "do not hold at that size, reconstruct.md)")
    parser.add_argument("--train", type=Path, default=None,
                        help="with --large-crop: the training images folder (default: ../shared/datasets/train)")
    parser.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--only", default="", help="with --markdown: comma-separated configurations to show")
    args = parser.parse_args()
    if args.markdown:
        print(table(load(args.out), frozenset(filter(None, args.only.split(",")))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load(args.out)
    data["machine"] = {"cpu": cpu_name(), "python": platform.python_version(),
                       "note": "shared 2-core CPU machine, other jobs running: seconds are indicative"}
    calib, heldout = make_split(args.work)
    args.large_root = None
    if args.large_crop and not args.set5:   # --set5 evaluates cells already run
        from heldout_large import SCALE, SET_NAME, SHARED_TRAIN, build, images

        train, args.large_set = args.train or SHARED_TRAIN, SET_NAME
        if args.large_crop % SCALE or args.large_crop < 0 or not images(train):
            parser.error(f"--large-crop {args.large_crop}: needs a positive multiple of 4 and the training images "
                         f"of {train} (--train; 0 turns the larger check off)")
        args.large_root = build(train, args.work / f"large{args.large_crop}", args.large_crop)
        fp_large = data.setdefault("fp_large", {})
        if str(args.large_crop) not in fp_large:
            row, seconds = evaluate(None, args.large_root, SET_NAME, args.work / f"fp.large{args.large_crop}.eval.json",
                                    args.threads)
            fp_large[str(args.large_crop)] = {"psnr": row["psnr"], "ssim": row["ssim"], "eval_s": round(seconds, 1)}
            save(args.out, data)
    if "fp" not in data:
        row, seconds = evaluate(None, heldout, "Heldout", args.work / "fp.eval.json", args.threads)
        data["fp"] = {"heldout_psnr": row["psnr"], "heldout_ssim": row["ssim"], "eval_s": round(seconds, 1)}
        save(args.out, data)
    for name in filter(None, args.set5.split(",")):
        artifact = None if name == "fp" else Path(data["cells"][name]["artifact"])
        row, seconds = evaluate(artifact, None, "Set5", args.work / "set5.eval.json", args.threads)
        data["set5"][name] = {"psnr": row["psnr"], "ssim": row["ssim"], "eval_s": round(seconds, 1)}
        log.info("Set5 %s: %.3f dB", name, row["psnr"])
        save(args.out, data)
    if args.set5:
        return
    for config in args.configs.split(","):
        if config not in CONFIGS and config not in REFINED:
            parser.error(f"--configs: unknown {config!r}; choose from {', '.join([*CONFIGS, *REFINED])}")
        for bits in map(int, args.bits.split(",")):
            for patches in map(int, args.patches.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    name = f"{config}/w{bits}a{bits}/p{patches}/s{seed}"
                    if name in data["cells"]:
                        continue
                    data["cells"][name] = cell(args, calib, heldout, config, bits, patches, seed)
                    log.info("%s: held-out %.3f dB (calibrate %.0f s)", name, data["cells"][name]["heldout_psnr"],
                             data["cells"][name]["calibrate_s"])
                    save(args.out, data)


if __name__ == "__main__":
    main()
