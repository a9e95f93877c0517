"""PSNR / SSIM on the Y channel: hand-computed cases, a direct per-window SSIM, and the published
bicubic baseline on Set5."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.imresize import imresize
from toolchain.data.io import to_uint8
from toolchain.metrics import output_difference, psnr, psnr_from_mse, psnr_y, rgb_to_y, ssim_y
from toolchain.tolerances import MATLAB_SSIM_TOLERANCE, PUBLISHED_PSNR_TOLERANCE, SSIM_ATOL

#: bicubic Set5 PSNR-Y (ARCHITECTURE.md section 8) and SSIM-Y as published in the SR literature (e.g.
#: RCAN, ECCV 2018, Table 3); computed there in MATLAB, which rounds Y to 8 bits (we do not, as BasicSR)
SET5_BICUBIC = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


def luma(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[:, :, c].astype(np.float64) / 255 for c in range(3))
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM over every 11x11 window inside the image, each window's statistics summed directly."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
            var_a, var_b = (weights * (a - mu_a) ** 2).sum(), (weights * (b - mu_b) ** 2).sum()
            cov = (weights * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                          / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_identical_images() -> None:
    img = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    assert psnr_y(img, img.copy(), crop_border=2) == math.inf
    assert ssim_y(img, img.copy(), crop_border=2) == pytest.approx(1.0, abs=1e-12)


def test_luma_range() -> None:
    extremes = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(extremes), [[16.0, 235.0]], rtol=0, atol=1e-12)


def test_psnr_y_by_hand() -> None:
    hr = np.zeros((10, 10, 3), np.uint8)
    sr = hr.copy()
    sr[5, 5] = 255  # one white pixel: its Y differs by 235 - 16 = 219
    assert psnr_y(sr, hr, crop_border=0) == pytest.approx(10 * math.log10(255**2 * 100 / 219**2), abs=1e-10)
    assert psnr_y(sr, hr, crop_border=1) == pytest.approx(10 * math.log10(255**2 * 64 / 219**2), abs=1e-10)
    sr[5, 5] = 0
    sr[0, 3] = 255  # only inside the cropped border
    assert psnr_y(sr, hr, crop_border=1) == math.inf


def test_ssim_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (26, 23, 3)).astype(np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-30, 31, hr.shape), 0, 255).astype(np.uint8)
    expected = direct_ssim(luma(sr[2:-2, 2:-2]), luma(hr[2:-2, 2:-2]))
    assert ssim_y(sr, hr, crop_border=2) == pytest.approx(expected, abs=SSIM_ATOL)
    assert expected < 0.99


def test_input_checks() -> None:
    img = np.zeros((12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match=r"differ in shape: sr \(12, 12, 3\), hr \(12, 14, 3\)"):
        psnr_y(img, np.zeros((12, 14, 3), np.uint8), crop_border=0)
    with pytest.raises(ValueError, match="uint8"):
        ssim_y(img.astype(np.float32), img, crop_border=0)
    with pytest.raises(ValueError, match="crop_border 6"):
        psnr_y(img, img, crop_border=6)
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(img, img, crop_border=1)


def test_generic_psnr() -> None:
    a = np.zeros((2, 3), np.float32)
    assert psnr(a, np.full((2, 3), 0.1), data_range=1.0) == pytest.approx(20.0, abs=1e-9)
    assert psnr(torch.zeros(4), torch.full((4,), 25.5, requires_grad=True), data_range=255) == pytest.approx(20.0)
    assert psnr(a, a, data_range=1.0) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, np.zeros(6), data_range=1.0)


def test_psnr_from_mse_is_every_psnr() -> None:
    """One formula: the image PSNR-Y, the generic PSNR and the pooled statistics all reduce to it."""
    assert psnr_from_mse(0.01, 1.0) == pytest.approx(20.0, abs=1e-12)
    assert psnr_from_mse(255.0**2 / 1000, 255.0) == pytest.approx(30.0, abs=1e-12)
    assert psnr_from_mse(0.0, 1.0) == math.inf
    with pytest.raises(ValueError, match="negative"):
        psnr_from_mse(-1e-3, 1.0)
    rng = np.random.default_rng(4)
    a, b = rng.random((6, 7, 3)), rng.random((6, 7, 3))
    assert psnr(a, b, data_range=1.0) == psnr_from_mse(float(np.mean((a - b) ** 2)), 1.0)


def test_output_difference_by_hand() -> None:
    reference = np.full((4, 5, 3), 0.5, np.float32)
    output = reference.copy()
    output[0, 0, 0] = 0.625      # 1/8 off, exact in float32: 32 levels apart
    output[1, 1, 1] = 1.5        # far above the range: clipped to 1 for PSNR, raw for the absolute errors
    output[2, 2, 2] = 0.5 + 1e-4  # rounds to the same 8-bit level
    d = output_difference(output, reference, quantiles=(0.5, 1.0))
    assert (d.values, d.identical) == (60, 58)
    assert d.identical_pixels == 58 / 60
    assert d.squared_error == pytest.approx(1 / 64 + 1 / 4 + 1e-8, rel=1e-6)
    assert d.psnr == pytest.approx(10 * math.log10(60 / (1 / 64 + 1 / 4 + 1e-8)), rel=1e-6)
    assert d.max_abs_error == 1.0 and d.abs_error_quantiles == {0.5: 0.0, 1.0: 1.0}
    assert d.mean_abs_error == pytest.approx((0.125 + 1.0 + 1e-4) / 60, rel=1e-5)
    same = output_difference(torch.from_numpy(reference), torch.from_numpy(reference))
    assert same.psnr == math.inf and same.identical_pixels == 1.0 and same.max_abs_error == 0.0
    assert output_difference(torch.from_numpy(output), reference) == dataclasses.replace(d, abs_error_quantiles={})
    with pytest.raises(ValueError, match="differ in shape"):
        output_difference(output, reference[:2])
    with pytest.raises(ValueError, match="NaN"):
        output_difference(np.full(3, np.nan, np.float32), np.zeros(3, np.float32))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_bicubic_baseline(datasets_dir: Path, scale: int) -> None:
    """MATLAB bicubic upscaling of the Set5 LR (uint8 path) against the published baseline."""
    scores = []
    for pair in benchmark_pairs(datasets_dir, "Set5", scale):
        lr, hr = load_pair(pair)
        sr = imresize(to_uint8(lr), float(scale))
        scores.append((psnr_y(sr, to_uint8(hr), scale), ssim_y(sr, to_uint8(hr), scale)))
    mean_psnr, mean_ssim = np.mean(scores, axis=0)
    assert mean_psnr == pytest.approx(SET5_BICUBIC[scale][0], abs=PUBLISHED_PSNR_TOLERANCE)
    assert mean_ssim == pytest.approx(SET5_BICUBIC[scale][1], abs=MATLAB_SSIM_TOLERANCE)
