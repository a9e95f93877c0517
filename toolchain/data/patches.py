"""Seeded random (LR, HR) patches from HR images, for calibration and training.

Each patch is an HR crop of ``patch_size * scale`` pixels (optionally flipped and transposed, as
BasicSR augments) and its LR made by :func:`~toolchain.data.imresize.bicubic_degrade`, the same
MATLAB bicubic the test sets' LR went through. Patch ``i`` depends only on ``(seed, i)`` and the
sorted file list: its random numbers come from its own ``SeedSequence(seed, spawn_key=(i,))``
(``SeedSequence(seed).spawn(n)[i]``), so any process, in any order, on any shard, draws the same
patch, and no global RNG is touched.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .imresize import bicubic_degrade
from .io import IMAGE_SUFFIXES, read_image, to_uint8

log = logging.getLogger(__name__)

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files (png, bmp, jpg, jpeg, tif, tiff) under ``root``, recursively, sorted by relative path.

    Hidden files and folders (names starting with ``.``) are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")
    found = [
        path for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def resolve_paths(paths: PathsLike) -> list[Path]:
    """A directory (scanned with :func:`list_images`), one file, or a list of files -> file list."""
    if isinstance(paths, (str, os.PathLike)):
        single = Path(paths)
        return list_images(single) if single.is_dir() else [single]
    return [Path(p) for p in paths]


def split_train_val(paths: PathsLike, val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split a file list into training and held-out validation files, deterministically.

    The files are sorted, shuffled by a generator seeded with ``seed``, and the first
    ``round(val_fraction * n)`` (at least one) become validation. Both lists come back sorted.

    >>> from toolchain.defaults import DEFAULT_CALIB_IMAGES
    >>> train, val = split_train_val(DEFAULT_CALIB_IMAGES, 0.1, seed=0)
    >>> len(train), [p.name for p in val]
    (25, ['0805.png', '0811.png', '0820.png'])
    """
    files = sorted(resolve_paths(paths), key=lambda p: p.as_posix())
    if len(set(files)) != len(files):
        raise ValueError("split_train_val: the file list holds duplicates")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = max(1, round(val_fraction * len(files)))
    if n_val >= len(files):
        raise ValueError(f"cannot hold out {val_fraction:.0%} of {len(files)} files and keep any for training")
    order = np.random.Generator(np.random.PCG64(_check_seed(seed))).permutation(len(files))
    val = sorted((files[k] for k in order[:n_val]), key=lambda p: p.as_posix())
    train = sorted((files[k] for k in order[n_val:]), key=lambda p: p.as_posix())
    return train, val


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PatchDataset(Dataset):
    """``length`` random (LR, HR) patches over images held in memory; item ``i`` is a function of ``(seed, i)``.

    ``dataset[i]`` is ``(lr, hr)``: float32 tensors ``(3, p, p)`` and ``(3, p*s, p*s)`` in [0, 1],
    with ``p = patch_size`` and ``s = scale``. Images smaller than the HR crop are skipped with a
    warning. Images are decoded once, kept as uint8 ``(H, W, 3)`` arrays.

    >>> from toolchain.defaults import DEFAULT_CALIB_IMAGES
    >>> data = PatchDataset(DEFAULT_CALIB_IMAGES, 64, 4, seed=0, length=32)
    >>> lr, hr = data[0]; lr.shape, hr.shape
    (torch.Size([3, 64, 64]), torch.Size([3, 256, 256]))
    >>> again = PatchDataset(DEFAULT_CALIB_IMAGES, 64, 4, seed=0, length=32)
    >>> len(again), torch.equal(again[5][0], data[5][0])    # the same seed and index: the same patch
    (32, True)
    """

    def __init__(self, paths: PathsLike, patch_size: int, scale: int, seed: int, length: int,
                 augment: bool = True, progress: bool = False) -> None:
        self.patch_size = _check_positive("patch_size", patch_size)
        self.scale = _check_positive("scale", scale)
        self.seed = _check_seed(seed)
        self.length = _check_positive("length", length)
        self.augment = augment
        crop = self.patch_size * self.scale
        files = resolve_paths(paths)
        if not files:
            raise ValueError(f"PatchDataset: no image files in {paths!r}")
        self.paths: list[Path] = []
        self.images: list[np.ndarray] = []
        skipped = []
        for path in tqdm(files, desc="loading images", unit="img", disable=not progress):
            image = to_uint8(read_image(path))
            if image.shape[0] < crop or image.shape[1] < crop:
                skipped.append(f"{path} ({image.shape[1]}x{image.shape[0]})")
                continue
            self.paths.append(path)
            self.images.append(image)
        if skipped:
            log.warning("skipped %d image(s) smaller than the %dx%d HR crop: %s%s", len(skipped), crop,
                        crop, ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
        if not self.images:
            raise ValueError(f"PatchDataset: none of the {len(files)} images is at least {crop}x{crop} "
                             f"(patch_size {self.patch_size} x scale {self.scale})")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"patch index {index} out of range for {self.length} patches")
        hr = self.hr_crop(index)
        lr = bicubic_degrade(hr, self.scale)
        return _to_chw(lr), _to_chw(hr.astype(np.float32) / np.float32(255.0))

    def hr_crop(self, index: int) -> np.ndarray:
        """The uint8 HR crop ``(p*s, p*s, 3)`` of patch ``index`` (after augmentation)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(index,))))
        crop = self.patch_size * self.scale
        image = self.images[int(rng.integers(len(self.images)))]
        top = int(rng.integers(image.shape[0] - crop + 1))
        left = int(rng.integers(image.shape[1] - crop + 1))
        # drawn even without augmentation, so that the crops do not depend on the flag
        hflip, vflip, transpose = rng.random(3) < 0.5
        patch = image[top:top + crop, left:left + crop]
        if self.augment:
            if hflip:
                patch = patch[:, ::-1]
            if vflip:
                patch = patch[::-1]
            if transpose:
                patch = patch.transpose(1, 0, 2)
        return np.ascontiguousarray(patch)


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` float32 -> ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def sample_patches(paths: PathsLike, n: int, patch_size: int, scale: int, seed: int,
                   augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random patches as batches: LR ``(n, 3, p, p)`` and HR ``(n, 3, p*s, p*s)``, float32 [0, 1].

    The same as stacking ``PatchDataset(paths, patch_size, scale, seed, n, augment)[i]``.

    >>> from toolchain.defaults import DEFAULT_CALIB_IMAGES
    >>> lr, hr = sample_patches(DEFAULT_CALIB_IMAGES, 32, 64, 4, seed=0)
    >>> lr.shape, hr.shape
    (torch.Size([32, 3, 64, 64]), torch.Size([32, 3, 256, 256]))
    """
    dataset = PatchDataset(paths, patch_size, scale, seed, length=n, augment=augment)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([lr for lr, _ in items]), torch.stack([hr for _, hr in items])
