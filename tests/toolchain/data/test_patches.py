"""Seeded patches: shapes, LR made by MATLAB bicubic, crops of the sources, determinism across
instances, access orders and processes; file listing and the train/validation split."""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.data.imresize import bicubic_degrade
from toolchain.data.io import write_image
from toolchain.data.patches import PatchDataset, list_images, sample_patches, split_train_val

PATCH, SCALE = 6, 2
CROP = PATCH * SCALE


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four random RGB images (two big enough for a 12x12 crop in a subfolder, one too small)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for rel, (h, w) in {"a.png": (20, 17), "sub/b.bmp": (14, 30), "sub/c.PNG": (12, 12), "tiny.png": (8, 40)}.items():
        write_image(root / rel, rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
    return root


def dihedral(patch: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/transposes of a square ``(n, n, 3)`` patch."""
    rotations = [np.rot90(patch, k) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


def to_uint8_hr(hr: torch.Tensor) -> np.ndarray:
    return np.round(hr.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def test_list_images(tmp_path: Path) -> None:
    for rel in ("b/z.bmp", "a.png", "b/y.JPG", "c.tiff", ".hidden/d.png", "b/.e.png"):
        write_image(tmp_path / rel, np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.png", "b/y.JPG", "b/z.bmp", "c.tiff"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_patches_are_degraded_crops_of_the_sources(image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = PatchDataset(image_dir, PATCH, SCALE, seed=3, length=24)
    assert "tiny.png" in caplog.text and len(data.images) == 3
    for i in range(len(data)):
        lr, hr = data[i]
        assert lr.shape == (3, PATCH, PATCH) and hr.shape == (3, CROP, CROP)
        assert lr.dtype == hr.dtype == torch.float32
        assert 0 <= float(lr.min()) and float(hr.max()) <= 1
        hr8 = to_uint8_hr(hr)
        np.testing.assert_array_equal(lr.permute(1, 2, 0).numpy(), bicubic_degrade(hr8, SCALE))
        crops = [img[t:t + CROP, l:l + CROP] for img in data.images
                 for t in range(img.shape[0] - CROP + 1) for l in range(img.shape[1] - CROP + 1)]
        assert any(np.array_equal(hr8, v) for c in crops for v in dihedral(c))


def test_augmentation_only_reorients_the_same_crop(image_dir: Path) -> None:
    plain = PatchDataset(image_dir, PATCH, SCALE, seed=5, length=16, augment=False)
    augmented = PatchDataset(image_dir, PATCH, SCALE, seed=5, length=16)
    changed = 0
    for i in range(16):
        base, aug = plain.hr_crop(i), augmented.hr_crop(i)
        assert any(np.array_equal(aug, v) for v in dihedral(base))
        changed += not np.array_equal(aug, base)
    assert changed > 0


def test_deterministic_in_any_order_and_seed_dependent(image_dir: Path) -> None:
    first = PatchDataset(image_dir, PATCH, SCALE, seed=7, length=10)
    second = PatchDataset(image_dir, PATCH, SCALE, seed=7, length=10)
    forward = [first[i] for i in range(10)]
    backward = [second[i] for i in reversed(range(10))][::-1]
    for (lr_a, hr_a), (lr_b, hr_b) in zip(forward, backward):
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)
    other = PatchDataset(image_dir, PATCH, SCALE, seed=8, length=10)
    assert not all(torch.equal(other[i][1], forward[i][1]) for i in range(10))
    lr, hr = sample_patches(image_dir, 10, PATCH, SCALE, seed=7)
    assert lr.shape == (10, 3, PATCH, PATCH) and hr.shape == (10, 3, CROP, CROP)
    assert torch.equal(lr, torch.stack([f[0] for f in forward]))
    assert torch.equal(hr, torch.stack([f[1] for f in forward]))
    with pytest.raises(IndexError):
        first[10]


def test_same_patch_in_another_process(image_dir: Path) -> None:
    script = (
        "import hashlib, sys\n"
        "from toolchain.data.patches import PatchDataset\n"
        f"lr, hr = PatchDataset(sys.argv[1], {PATCH}, {SCALE}, seed=11, length=50)[37]\n"
        "print(hashlib.sha256(lr.numpy().tobytes() + hr.numpy().tobytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(image_dir)], capture_output=True, text=True,
                            check=True)
    lr, hr = PatchDataset(image_dir, PATCH, SCALE, seed=11, length=50)[37]
    assert result.stdout.strip() == hashlib.sha256(lr.numpy().tobytes() + hr.numpy().tobytes()).hexdigest()


def test_no_usable_image(image_dir: Path) -> None:
    with pytest.raises(ValueError, match="none of the 4 images is at least 40x40"):
        PatchDataset(image_dir, 20, 2, seed=0, length=1)
    with pytest.raises(ValueError, match="patch_size"):
        PatchDataset(image_dir, 0, 2, seed=0, length=1)


def test_split_train_val(tmp_path: Path) -> None:
    files = [tmp_path / f"{k:02d}.png" for k in range(20)]
    train, val = split_train_val(files[::-1], 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == files and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert split_train_val(files, 0.25, seed=0) == (train, val)
    assert split_train_val(files, 0.25, seed=1)[1] != val
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(files, 1.0, seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        split_train_val(files + files[:1], 0.25, seed=0)
