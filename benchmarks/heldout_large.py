"""A larger held-out check for the ablation cells: 100 training images the cells never calibrated on.

``rotation_ablation.py`` calibrates on the first 24 of the 28 shipped training images and checks on the last 4
(centred 128x128 crops): four crops decide between recipes whose differences are a tenth of a dB. This script
builds a second held-out set from ``../shared/datasets/train``, fixed before any result was read: the 72
``DIV2K_valid_256`` images that are not among the shipped 28 (0829-0900) and the first 28 ``BSD200`` images by
name, each as its centred 128x128 HR crop (``--crop``) and its MATLAB-bicubic x4 LR (the layout of ``toolchain.data.heldout``),
and evaluates the given artifacts' fake-quant models on it with ``2dq-eval`` (never a test set)::

    python benchmarks/heldout_large.py --work /tmp/heldout_large --json /tmp/heldout_large.json \\
        --threads 1 ARTIFACT [ARTIFACT ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from toolchain.data.heldout import write_crop_pair
from toolchain.defaults import DEFAULT_CALIB_IMAGES
from toolchain.files import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotation_ablation import cpu_name, evaluate  # noqa: E402

SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "train"
SET_NAME = "HeldoutLarge"
CROP, SCALE = 128, 4


def images(train: Path) -> list[Path]:
    shipped = {p.name for p in DEFAULT_CALIB_IMAGES.glob("*.png")}
    div2k = [p for p in sorted((train / "DIV2K_valid_256").glob("*.png")) if p.name not in shipped]
    return div2k + sorted((train / "BSD200").glob("*.png"))[:28]


def build(train: Path, root: Path, crop: int = CROP) -> Path:
    """``root`` holding the set :data:`SET_NAME` of ``crop`` x ``crop`` HR crops (made once)."""
    if (root / SET_NAME / "LR_bicubic" / f"X{SCALE}").is_dir():
        return root
    staging = root / f".{SET_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)   # an interrupted run's
    for path in images(train):
        write_crop_pair(path, staging, f"{path.parent.name}_{path.stem}", crop=crop, scale=SCALE)
    shutil.rmtree(root / SET_NAME, ignore_errors=True)
    staging.rename(root / SET_NAME)   # complete or absent
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/heldout_large"))
    parser.add_argument("--train", type=Path, default=SHARED_TRAIN)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--crop", type=int, default=CROP, help="HR crop side, a multiple of 4 (default: %(default)s; "
                        "256: the whole DIV2K images, 64x64 LR like the engines' tiles)")
    parser.add_argument("--json", type=Path, required=True, help="results (merged with an existing file)")
    args = parser.parse_args()
    if args.crop % SCALE or args.crop < SCALE:
        parser.error(f"--crop {args.crop}: a positive multiple of {SCALE}")
    root = build(args.train, args.work / f"set{args.crop}", args.crop)
    data = json.loads(args.json.read_text()) if args.json.is_file() else {"cells": {}}
    data["set"] = {"images": len(images(args.train)), "crop": args.crop, "scale": SCALE, "machine": cpu_name()}
    for artifact in args.artifacts:
        report = args.work / f"{artifact.stem}.eval.json"
        row, seconds = evaluate(artifact, root, SET_NAME, report, args.threads)
        data["cells"][artifact.stem] = {"psnr": row["psnr"], "ssim": row["ssim"], "eval_s": round(seconds, 1),
                                        "artifact": str(artifact)}
        print(f"{artifact.stem}: {row['psnr']:.3f} dB", flush=True)
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
