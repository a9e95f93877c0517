"""MATLAB bicubic: against a per-pixel transcription of MATLAB's algorithm, and against the MATLAB-made
LR images of Set5."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.imresize import bicubic_degrade, imresize, mod_crop, output_size
from toolchain.data.io import to_uint8
from toolchain.tolerances import (IMRESIZE_FLOAT_PATH_MAX_LEVELS, IMRESIZE_FLOAT_PATH_MIN_EXACT,
                                  IMRESIZE_REFERENCE_ATOL)


def reference_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def reference_resize_1d(signal: np.ndarray, scale: float, antialiasing: bool) -> np.ndarray:
    """One output sample at a time, written from MATLAB's imresize documentation of the algorithm."""
    size = len(signal)
    out = np.empty(math.ceil(round(scale * size, 9)))
    shrink = scale < 1 and antialiasing
    width = 4 / scale if shrink else 4
    for x in range(1, len(out) + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        first = math.floor(u - width / 2)
        total = weight_sum = 0.0
        for j in range(first, first + math.ceil(width) + 2):
            w = scale * reference_cubic(scale * (u - j)) if shrink else reference_cubic(u - j)
            k = j  # mirror into 1..size, repeating the edge sample
            while k < 1 or k > size:
                k = 1 - k if k < 1 else 2 * size + 1 - k
            total += w * signal[k - 1]
            weight_sum += w
        out[x - 1] = total / weight_sum
    return out


def reference_resize(img: np.ndarray, scale: float, antialiasing: bool) -> np.ndarray:
    rows = np.stack([reference_resize_1d(img[:, c], scale, antialiasing) for c in range(img.shape[1])], axis=1)
    return np.stack([reference_resize_1d(rows[r], scale, antialiasing) for r in range(rows.shape[0])], axis=0)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.7, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("antialiasing", [True, False])
def test_matches_per_pixel_reference(scale: float, antialiasing: bool) -> None:
    img = np.random.default_rng(0).random((13, 10))
    expected = reference_resize(img, scale, antialiasing)
    np.testing.assert_allclose(imresize(img, scale, antialiasing), expected, rtol=0, atol=IMRESIZE_REFERENCE_ATOL)


def test_output_size_rule() -> None:
    assert output_size(255, 1 / 3) == 85  # (1/3) * 255 is 85.00000000000001 in floats
    assert output_size(7, 0.5) == 4 and output_size(10, 1 / 3) == 4 and output_size(5, 1.5) == 8
    assert imresize(np.zeros((10, 7, 3)), 1 / 3).shape == (4, 3, 3)


def test_dtypes_channels_and_constants() -> None:
    img = np.random.default_rng(1).random((12, 9, 3)).astype(np.float32)
    out = imresize(img, 0.5)
    assert out.dtype == np.float32 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(imresize(img[:, :, 1], 0.5), out[:, :, 1])
    np.testing.assert_allclose(imresize(np.full((9, 9), 0.3), 1 / 3), 0.3, rtol=0, atol=1e-15)
    assert (imresize(np.full((9, 6, 3), 77, np.uint8), 2.0) == 77).all()
    with pytest.raises(TypeError, match="float or uint8"):
        imresize(np.zeros((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError, match="scale"):
        imresize(np.zeros((4, 4)), 0.0)


def test_uint8_path_rounds_after_each_axis() -> None:
    """MATLAB's uint8 path: rows, round half away from zero and saturate; then columns, the same."""
    img = np.random.default_rng(2).integers(0, 256, (12, 8)).astype(np.uint8)

    def to_uint8_matlab(values: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(values + 0.5), 0, 255)

    rows = to_uint8_matlab(np.stack([reference_resize_1d(img[:, c].astype(float), 0.5, True)
                                     for c in range(img.shape[1])], axis=1))
    expected = to_uint8_matlab(np.stack([reference_resize_1d(row, 0.5, True) for row in rows], axis=0))
    out = imresize(img, 0.5)
    assert out.dtype == np.uint8 and out.shape == (6, 4)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, to_uint8_matlab(reference_resize(img.astype(float), 0.5, True)))


def test_bicubic_degrade_levels_and_checks() -> None:
    hr = np.random.default_rng(3).integers(0, 256, (24, 36, 3)).astype(np.uint8)
    lr = bicubic_degrade(hr, 3)
    assert lr.dtype == np.float32 and lr.shape == (8, 12, 3)
    np.testing.assert_array_equal(lr, imresize(hr, 1 / 3) / np.float32(255))
    np.testing.assert_array_equal(bicubic_degrade(hr.astype(np.float32) / 255, 3), lr)
    with pytest.raises(ValueError, match="mod_crop"):
        bicubic_degrade(hr[:23], 3)
    assert mod_crop(hr[:23, :35], 4).shape == (20, 32, 3)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_lr_reproduced(datasets_dir: Path, scale: int) -> None:
    """Our LR from Set5 HR against the MATLAB-made LR files."""
    exact = floating_exact = total = 0
    floating_max = 0
    for pair in benchmark_pairs(datasets_dir, "Set5", scale):
        lr, hr = load_pair(pair)
        matlab = to_uint8(lr).astype(np.int16)
        ours = to_uint8(bicubic_degrade(hr, scale)).astype(np.int16)
        floating = to_uint8(imresize(hr.astype(np.float64), 1 / scale)).astype(np.int16)
        exact += int((ours == matlab).sum())
        floating_exact += int((floating == matlab).sum())
        floating_max = max(floating_max, int(np.abs(floating - matlab).max()))
        total += matlab.size
    assert exact == total  # MATLAB's uint8 path: bit-exact
    assert floating_exact / total >= IMRESIZE_FLOAT_PATH_MIN_EXACT
    assert floating_max <= IMRESIZE_FLOAT_PATH_MAX_LEVELS
