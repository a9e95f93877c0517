"""Pack the training images into one compact, lossless ``.npz`` that can travel to a GPU machine.

A device call carries at most 64 MiB (working tree, data and resume checkpoint together), while
``../shared/datasets/train`` decodes to about 122 MiB of uint8 pixels and its PNG/BMP files take
about 79 MiB. Deflate of the raw pixels (as ``np.savez_compressed``) gives 90 MiB, so each image is
stored as a reversible uint8 residual that LZMA compresses well:

1. colour decorrelation: planes ``(R - G, G, B - G) mod 256``;
2. planar layout ``(3, H, W)``;
3. 2-D difference (the plane predictor ``left + up - up_left``), ``mod 256``.

Decoding is two wrapping uint8 cumulative sums and the inverse colour step, all vectorized, and
exact. The archive is a standard ``.npz`` (a zip of ``.npy`` members, here LZMA-compressed), read
with ``np.load(..., allow_pickle=False)``: ``names`` (relative paths), ``shapes`` ``(n, 2)`` and
``res00000``... residuals. A SHA-256 over names, shapes and pixels is stored and checked on read;
the same fingerprint is computed for a folder, so a training run can resume from either.

Usage::

    python scripts/pack_train_data.py ../shared/datasets/train -o runs/train_x4.npz --min-size 256
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from toolchain.data import list_images, read_image, to_uint8
from toolchain.files import atomic_path

log = logging.getLogger("pack_train_data")

CODEC = "2dq-train-pack-v1: planes (R-G, G, B-G) mod 256, 2-D difference mod 256, LZMA zip"
#: folder names of the benchmark test sets: never pack or train on them
TEST_SETS = ("Set5", "Set14", "B100", "BSD100", "Urban100", "Manga109")


@dataclass(frozen=True)
class ImageSet:
    """Training images in memory: ``names`` (relative posix paths, sorted), uint8 ``(H, W, 3)`` arrays."""

    names: list[str]
    images: list[np.ndarray]
    sha256: str


def fingerprint(names: list[str], images: list[np.ndarray]) -> str:
    """SHA-256 over every name, shape and pixel, in order (the data identity a checkpoint records)."""
    digest = hashlib.sha256()
    for name, image in zip(names, images):
        digest.update(f"{name}\0{image.shape[0]}x{image.shape[1]}\0".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def refuse_test_sets(root: Path, names: list[str]) -> None:
    """Raise if ``root`` or any image under it lies in a benchmark test-set folder."""
    for name in [root.resolve().name, *names]:
        hit = [part for part in Path(name).parts if part in TEST_SETS]
        if hit:
            raise ValueError(f"{root}: {name} is in the test set {hit[0]}; training data must come "
                             "from datasets/train only")


def load_folder(root: str | os.PathLike, min_size: int = 0, progress: bool = True) -> ImageSet:
    """Every image under ``root`` as uint8 RGB, skipping those whose shorter side is under ``min_size``."""
    root = Path(root)
    files = list_images(root)
    if not files:
        raise ValueError(f"{root}: no image files (png, bmp, jpg, tif)")
    names = [path.relative_to(root).as_posix() for path in files]
    refuse_test_sets(root, names)
    kept_names, images = [], []
    for name, path in tqdm(list(zip(names, files)), desc="reading images", unit="img", disable=not progress):
        image = to_uint8(read_image(path))
        if min(image.shape[:2]) >= min_size:
            kept_names.append(name)
            images.append(image)
    if len(kept_names) < len(names):
        log.info("skipped %d of %d images with a side under %d px", len(names) - len(kept_names), len(names), min_size)
    if not images:
        raise ValueError(f"{root}: no image has both sides >= {min_size} px")
    return ImageSet(kept_names, images, fingerprint(kept_names, images))


def encode(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB -> uint8 residual ``(3, H, W)`` (see the module docstring)."""
    x = image.astype(np.int16).transpose(2, 0, 1)
    planes = np.stack([x[0] - x[1], x[1], x[2] - x[1]])
    residual = np.diff(np.diff(planes, axis=2, prepend=0), axis=1, prepend=0)
    return (residual & 0xFF).astype(np.uint8)


def decode(residual: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode`: uint8 ``(3, H, W)`` -> uint8 ``(H, W, 3)``; uint8 sums wrap mod 256."""
    planes = np.cumsum(np.cumsum(residual, axis=1, dtype=np.uint8), axis=2, dtype=np.uint8)
    green = planes[1]
    return np.stack([planes[0] + green, green, planes[2] + green], axis=-1)


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
        # ascontiguousarray would turn 0-d arrays (meta) into 1-d ones
        np.lib.format.write_array(handle, array if array.flags.c_contiguous else array.copy(), allow_pickle=False)


def write_pack(path: str | os.PathLike, data: ImageSet, source: str = "", progress: bool = True) -> Path:
    """Write ``data`` to ``path`` (``.npz``) atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: the pack must be a .npz file")
    meta = {"codec": CODEC, "sha256": data.sha256, "source": source, "images": len(data.names)}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
            _write_member(archive, "meta", np.array(json.dumps(meta)))
            _write_member(archive, "names", np.array(data.names))
            _write_member(archive, "shapes", np.array([im.shape[:2] for im in data.images], np.int64))
            for k, image in enumerate(tqdm(data.images, desc="compressing", unit="img", disable=not progress)):
                _write_member(archive, f"res{k:05d}", encode(image))
    return path


def read_pack(path: str | os.PathLike) -> ImageSet:
    """The images of a pack written by :func:`write_pack`, checked against its stored SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training pack not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as pack:
            meta = json.loads(pack["meta"].item())
            names = [str(n) for n in pack["names"]]
            shapes = pack["shapes"]
            images = [decode(pack[f"res{k:05d}"]) for k in range(len(names))]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable training pack ({type(err).__name__}: {err})") from err
    if meta.get("codec") != CODEC:
        raise ValueError(f"{path}: unknown pack codec {meta.get('codec')!r}; expected {CODEC!r}")
    if any(tuple(im.shape[:2]) != tuple(s) for im, s in zip(images, shapes)):
        raise ValueError(f"{path}: image shapes disagree with the stored shapes")
    sha = fingerprint(names, images)
    if sha != meta["sha256"]:
        raise ValueError(f"{path}: pixel checksum mismatch (stored {meta['sha256'][:12]}, got {sha[:12]})")
    return ImageSet(names, images, sha)


def load_images(source: str | os.PathLike, progress: bool = True) -> ImageSet:
    """Training images from a pack (``.npz``) or an image folder."""
    source = Path(source)
    if source.is_dir():
        return load_folder(source, progress=progress)
    if source.suffix == ".npz":
        return read_pack(source)
    raise ValueError(f"--data {source}: expected an image folder or a .npz pack from pack_train_data.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="image folder, e.g. ../shared/datasets/train")
    parser.add_argument("-o", "--out", required=True, help="output .npz")
    parser.add_argument("--min-size", type=int, default=0,
                        help="skip images whose shorter side is below this (x4 with 64 px LR patches "
                             "can use only images >= 256 px)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        start = time.monotonic()
        data = load_folder(args.folder, args.min_size)
        path = write_pack(args.out, data, source=str(args.folder))
        raw = sum(im.nbytes for im in data.images)
        print(json.dumps({
            "out": str(path), "images": len(data.names), "raw_mib": round(raw / 2**20, 2),
            "packed_mib": round(path.stat().st_size / 2**20, 2), "sha256": data.sha256,
            "seconds": round(time.monotonic() - start, 1),
        }))
    except (ValueError, OSError) as err:
        print(f"pack_train_data: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
