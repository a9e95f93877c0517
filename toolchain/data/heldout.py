"""The held-out split of the shipped training images that quality claims are checked on (never a test set).

The images of a folder, sorted by name: the last ``held_out`` are the check, each as a centred
``crop`` x ``crop`` HR crop and its MATLAB-bicubic LR at ``scale``, laid out as the benchmark set
``Heldout`` (``<root>/Heldout/HR``, ``<root>/Heldout/LR_bicubic/X<scale>``) that ``2dq-eval --sets Heldout``
reads; the others are copied to the calibration folder. ``tests/test_quality_direction.py`` and the
ablation benchmarks (``benchmarks/rotation_ablation.py``, ``benchmarks/bit_budget.md``) share it, so their
held-out numbers are of the same images.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..files import atomic_path
from .imresize import imresize
from .io import read_image, to_uint8, write_image

HELD_OUT = 4
HR_CROP = 128
SET_NAME = "Heldout"


def write_crop_pair(image: Path, folder: Path, name: str, *, crop: int, scale: int) -> None:
    """``image``'s centred ``crop`` x ``crop`` HR crop and its MATLAB-bicubic LR at ``scale``, as
    ``folder/HR/<name>.png`` and ``folder/LR_bicubic/X<scale>/<name>x<scale>.png`` (the benchmark layout
    ``2dq-eval`` reads). ``ValueError`` naming the image if it is smaller than ``crop``."""
    hr = to_uint8(read_image(image))
    if min(hr.shape[:2]) < crop:
        raise ValueError(f"{image}: {hr.shape[1]}x{hr.shape[0]} is smaller than the held-out crop {crop}")
    top, left = (hr.shape[0] - crop) // 2, (hr.shape[1] - crop) // 2
    hr = hr[top:top + crop, left:left + crop]
    write_image(folder / "HR" / f"{name}.png", hr)
    write_image(folder / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png", imresize(hr, 1 / scale))


def make_heldout_split(images: Path, work: Path, *, held_out: int = HELD_OUT, crop: int = HR_CROP,
                       scale: int = 4) -> tuple[Path, Path]:
    """(calibration folder, benchmark root holding the set ``Heldout``) under ``work``; made once (an existing
    complete split is reused). ``ValueError`` if ``images`` has too few PNGs or one is smaller than ``crop``.

    Safe when several processes make the same split at once: every file is written under a temporary name
    of its own and renamed into place, and the first complete ``Heldout`` folder wins."""
    calib, root = work / "calib", work / "heldout"
    done = root / SET_NAME / "LR_bicubic" / f"X{scale}"
    if calib.is_dir() and done.is_dir():
        return calib, root
    paths = sorted(Path(images).glob("*.png"))
    if len(paths) <= held_out:
        raise ValueError(f"{images}: {len(paths)} PNG images, need more than {held_out} (held-out check + calibration)")
    if crop % scale:
        raise ValueError(f"held-out crop {crop} is not a multiple of the scale {scale}")
    calib.mkdir(parents=True, exist_ok=True)
    for path in paths[:-held_out]:
        with atomic_path(calib / path.name) as partial:
            shutil.copyfile(path, partial)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SET_NAME}.", suffix=".partial", dir=root))  # this process's own
    try:
        for path in paths[-held_out:]:
            write_crop_pair(path, staging, path.stem, crop=crop, scale=scale)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(root / SET_NAME)  # fails when the folder is there (another process's, or a leftover)
    except OSError:
        if done.is_dir():  # another process completed the same split meanwhile: keep it
            shutil.rmtree(staging)
        else:  # the leftover of an interrupted run
            shutil.rmtree(root / SET_NAME, ignore_errors=True)
            staging.rename(root / SET_NAME)
    return calib, root
