"""The BasicSR test-set layout: listing pairs, mod-cropping HR, and the errors for broken layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.data.benchmark import Pair, available_scales, benchmark_pairs, load_pair
from toolchain.data.io import write_image


def make_set(root: Path, hr_sizes: dict[str, tuple[int, int]], scale: int,
             lr_sizes: dict[str, tuple[int, int]] | None = None) -> None:
    """Write ``root/Mini`` with random HR images (H, W) and LR images (default: HR mod-cropped / scale)."""
    rng = np.random.default_rng(0)
    for name, (height, width) in hr_sizes.items():
        write_image(root / "Mini" / "HR" / f"{name}.png", rng.integers(0, 256, (height, width, 3)).astype(np.uint8))
    for name, (height, width) in (lr_sizes or {n: (h // scale, w // scale) for n, (h, w) in hr_sizes.items()}).items():
        write_image(root / "Mini" / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png",
                    rng.integers(0, 256, (height, width, 3)).astype(np.uint8))


def test_set5_pairs_sorted_and_mod_cropped(datasets_dir: Path) -> None:
    pairs = benchmark_pairs(datasets_dir, "Set5", 3)
    assert [p.name for p in pairs] == ["baby", "bird", "butterfly", "head", "woman"]
    set5 = datasets_dir / "Set5"
    assert pairs[0] == Pair("baby", set5 / "LR_bicubic/X3/babyx3.png", set5 / "HR/baby.png", 3)
    lr, hr = load_pair(pairs[0])  # baby is 512x512: mod-crop to 510x510
    assert lr.shape == (170, 170, 3) and hr.shape == (510, 510, 3)
    assert lr.dtype == hr.dtype == np.float32
    assert available_scales(datasets_dir, "Set5") == [2, 3, 4, 8]


def test_grayscale_test_image_has_three_channels(datasets_dir: Path) -> None:
    bridge = next(p for p in benchmark_pairs(datasets_dir, "Set14", 2) if p.name == "bridge")
    lr, hr = load_pair(bridge)
    assert hr.shape == (512, 512, 3) and lr.shape == (256, 256, 3)
    np.testing.assert_array_equal(hr[:, :, 0], hr[:, :, 2])


def test_missing_set_and_scale_list_what_exists(tmp_path: Path) -> None:
    make_set(tmp_path, {"a": (8, 12)}, scale=2)
    with pytest.raises(FileNotFoundError, match=r"no test set 'Set5'.*\['Mini'\]"):
        benchmark_pairs(tmp_path, "Set5", 2)
    with pytest.raises(FileNotFoundError, match=r"scale 4.*scales found: \[2\]"):
        benchmark_pairs(tmp_path, "Mini", 4)


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    make_set(tmp_path, {"a": (9, 12)}, scale=2, lr_sizes={"a": (5, 6)})
    (pair,) = benchmark_pairs(tmp_path, "Mini", 2)
    with pytest.raises(ValueError, match=r"ax2\.png.*HR should be 12x10.*a\.png is 12x9 \(12x8 mod-cropped\)"):
        load_pair(pair)


def test_unpaired_files(tmp_path: Path) -> None:
    make_set(tmp_path, {"a": (8, 8), "b": (8, 8)}, scale=2, lr_sizes={"a": (4, 4)})
    with pytest.raises(FileNotFoundError, match=r"b\.png: no LR image bx2"):
        benchmark_pairs(tmp_path, "Mini", 2)
    make_set(tmp_path, {}, scale=2, lr_sizes={"b": (4, 4), "c": (4, 4)})
    with pytest.raises(ValueError, match=r"without an HR image: \['cx2\.png'\]"):
        benchmark_pairs(tmp_path, "Mini", 2)


def test_odd_sizes_load(tmp_path: Path) -> None:
    make_set(tmp_path, {"b": (13, 10), "a": (9, 7)}, scale=3)
    pairs = benchmark_pairs(tmp_path, "Mini", 3)
    assert [p.name for p in pairs] == ["a", "b"]
    shapes = [tuple(x.shape for x in load_pair(p)) for p in pairs]
    assert shapes == [((3, 2, 3), (9, 6, 3)), ((4, 3, 3), (12, 9, 3))]
