"""Fixtures of the calibration tests: a tiny SwinIR (real architecture, random weights) and patches."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from toolchain.models.swinir import SwinIR

#: the golden tiny SwinIR configuration of ../shared/reference (embed 12, two groups of two blocks)
TINY = dict(scale=4, embed_dim=12, depths=[2, 2], num_heads=[2, 2], window_size=8, mlp_ratio=2.0)


def _tiny_swinir(seed: int = 0) -> SwinIR:
    torch.manual_seed(seed)
    return SwinIR(**TINY).eval()


@pytest.fixture(scope="session")
def tiny_swinir() -> Callable[[int], SwinIR]:
    """Factory: ``tiny_swinir(seed)`` is a float SwinIR x4 (random weights from ``seed``), eval mode."""
    return _tiny_swinir


def _save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def save_checkpoint() -> Callable[[torch.nn.Module, Path], Path]:
    """``save_checkpoint(model, path)`` writes the model's state dict as safetensors."""
    return _save_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny SwinIR x4 checkpoint (safetensors) in ``tmp_path``."""
    return _save_checkpoint(_tiny_swinir(0), tmp_path / "tiny_x4.safetensors")


@pytest.fixture(scope="session")
def calib_images(datasets_dir: Path) -> Path:
    """A folder of real training images (100 DIV2K validation images, 256x256)."""
    return datasets_dir / "train" / "DIV2K_valid_256"


@pytest.fixture(scope="session")
def calib_lr(calib_images: Path) -> torch.Tensor:
    """Four real 16x16 LR calibration patches (x4), seed 0: ``(4, 3, 16, 16)``."""
    from toolchain.data.patches import sample_patches

    lr, _ = sample_patches(calib_images, 4, 16, 4, seed=0)
    return lr
