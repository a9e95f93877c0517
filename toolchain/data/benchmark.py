"""The SR test sets in BasicSR's layout: HR images and their MATLAB-bicubic LR images.

Layout under ``root`` (e.g. ``../shared/datasets``)::

    <Set>/HR/<name>.png
    <Set>/LR_bicubic/X<s>/<name>x<s>.png

Pairs are listed sorted by name; HR is mod-cropped to a multiple of the scale when loaded, and the
LR must then be exactly ``1/scale`` of it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imresize import mod_crop
from .io import IMAGE_SUFFIXES, read_image

_SCALE_DIR = re.compile(r"^X(\d+)$")


@dataclass(frozen=True)
class Pair:
    """One test image: its name, LR file, HR file and SR scale."""

    name: str
    lr_path: Path
    hr_path: Path
    scale: int


def available_sets(root: str | os.PathLike) -> list[str]:
    """Names of the folders under ``root`` that hold an ``HR`` folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark root {root} is not a directory")
    return sorted(p.name for p in root.iterdir() if (p / "HR").is_dir())


def available_scales(root: str | os.PathLike, set_name: str) -> list[int]:
    """Scales ``s`` with an ``LR_bicubic/X<s>`` folder in the set, ascending."""
    lr_root = Path(root) / set_name / "LR_bicubic"
    if not lr_root.is_dir():
        return []
    found = (_SCALE_DIR.match(p.name) for p in lr_root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _images(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` keyed by stem (one file per stem)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in files:
                raise ValueError(f"{folder}: two images named {path.stem!r} ({files[path.stem].name}, {path.name})")
            files[path.stem] = path
    return files


def benchmark_pairs(root: str | os.PathLike, set_name: str, scale: int) -> list[Pair]:
    """The ``(LR, HR)`` pairs of one test set at one scale, sorted by name.

    Raises:
        FileNotFoundError: the set or its ``X<scale>`` folder is missing (the message lists what
            exists), or an HR image has no LR image.
        ValueError: the LR folder holds images with no HR image, or the set is empty.

    >>> from toolchain.defaults import DEFAULT_DATA
    >>> [p.name for p in benchmark_pairs(DEFAULT_DATA, "Set5", 4)]
    ['baby', 'bird', 'butterfly', 'head', 'woman']
    """
    root = Path(root)
    set_dir = root / set_name
    if not (set_dir / "HR").is_dir():
        raise FileNotFoundError(f"no test set {set_name!r} under {root} (expected {set_dir}/HR); "
                                f"sets found: {available_sets(root) or 'none'}")
    lr_dir = set_dir / "LR_bicubic" / f"X{scale}"
    if not lr_dir.is_dir():
        raise FileNotFoundError(f"{set_name} has no LR images for scale {scale} (expected {lr_dir}); "
                                f"scales found: {available_scales(root, set_name) or 'none'}")
    hr_files = _images(set_dir / "HR")
    lr_files = _images(lr_dir)
    if not hr_files:
        raise ValueError(f"{set_dir / 'HR'} holds no images")
    pairs = []
    for name, hr_path in hr_files.items():
        lr_path = lr_files.pop(f"{name}x{scale}", None)
        if lr_path is None:
            raise FileNotFoundError(f"{hr_path}: no LR image {name}x{scale}.<png|...> in {lr_dir}")
        pairs.append(Pair(name=name, lr_path=lr_path, hr_path=hr_path, scale=scale))
    if lr_files:
        raise ValueError(f"{lr_dir}: LR images without an HR image: {sorted(p.name for p in lr_files.values())}")
    return pairs


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair: LR ``(h, w, 3)`` and HR mod-cropped to ``(scale*h, scale*w, 3)``, float32 [0, 1].

    Raises:
        ValueError: the LR size times the scale is not the mod-cropped HR size.
    """
    lr = read_image(pair.lr_path)
    hr_full = read_image(pair.hr_path)
    hr = np.ascontiguousarray(mod_crop(hr_full, pair.scale))
    expected = (lr.shape[0] * pair.scale, lr.shape[1] * pair.scale)
    if hr.shape[:2] != expected:
        raise ValueError(f"size mismatch at scale {pair.scale}: LR {pair.lr_path} is "
                         f"{lr.shape[1]}x{lr.shape[0]} (WxH), so HR should be {expected[1]}x{expected[0]}, "
                         f"but {pair.hr_path} is {hr_full.shape[1]}x{hr_full.shape[0]} "
                         f"({hr.shape[1]}x{hr.shape[0]} mod-cropped)")
    return lr, hr
