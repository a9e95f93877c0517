"""Fixtures of the calibration tests: a tiny SwinIR (spandrel's class, random weights) and patches."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ..tiny_models import save_checkpoint as _save_checkpoint
from ..tiny_models import tiny_swinir as _tiny_model


def _tiny_swinir(seed: int = 0) -> nn.Module:
    return _tiny_model(scale=4, seed=seed)


@pytest.fixture(scope="session")
def tiny_swinir() -> Callable[[int], nn.Module]:
    """Factory: ``tiny_swinir(seed)`` is spandrel's SwinIR x4, tiny (the golden configuration), random
    weights from ``seed``, eval mode, carrying its descriptor facts."""
    return _tiny_swinir


@pytest.fixture(scope="session")
def save_checkpoint() -> Callable[[torch.nn.Module, Path], Path]:
    """``save_checkpoint(model, path)`` writes the model's state dict as safetensors."""
    return _save_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny SwinIR x4 checkpoint (safetensors) in ``tmp_path``."""
    return _save_checkpoint(_tiny_swinir(0), tmp_path / "tiny_x4.safetensors")


@pytest.fixture(scope="session")
def calib_images() -> Path:
    """A folder of real training images: the shipped calibration set (28 DIV2K validation images, 256x256),
    so these tests run on a clone without ../shared."""
    from toolchain.defaults import DEFAULT_CALIB_IMAGES

    return DEFAULT_CALIB_IMAGES


@pytest.fixture(scope="session")
def calib_lr(calib_images: Path) -> torch.Tensor:
    """Four real 16x16 LR calibration patches (x4), seed 0: ``(4, 3, 16, 16)``."""
    from toolchain.data.patches import sample_patches

    lr, _ = sample_patches(calib_images, 4, 16, 4, seed=0)
    return lr
