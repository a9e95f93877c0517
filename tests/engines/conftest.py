"""Fixtures of the engine tests: tiny calibrated SwinIR models, their QDQ exports and ORT engines.

Same construction as ``tests/export/conftest.py`` (a tiny SwinIR x2 with random weights, one
residual group of a regular and a shifted block, MinMax-calibrated on seeded random images, saved
as checkpoint + artifact); exported at a 16-pixel tile and built with ONNX Runtime.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from calib.artifact import save_artifact
from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from engines.ort_engine import OrtBuild, build_ort_engine
from export.onnx_export import ExportOptions, export_onnx
from toolchain.models.swinir import SwinIR
from toolchain.quant import QuantConfig, quantize_model

TINY = dict(scale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0)
TILE = 16


@dataclass(frozen=True)
class Built:
    """A calibrated tiny model, its files, its QDQ export and its ORT engine."""

    checkpoint: Path
    artifact: Path
    model: torch.nn.Module
    onnx: Path
    engine: Path
    build: OrtBuild


def _build(folder: Path, config: QuantConfig, float_dtype: str, seed: int = 0) -> Built:
    torch.manual_seed(seed)
    model = SwinIR(**TINY).eval()
    checkpoint = folder / "tiny_x2.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    quantize_model(model, config)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(seed + 1))
    calibrate_minmax(model, batch_forward_loop(images, batch_size=4, progress=False))
    artifact = save_artifact(folder / "bounds.safetensors", model, checkpoint=checkpoint, quant_config=config,
                             method="minmax")
    onnx_path = folder / "qdq.onnx"
    export_onnx(checkpoint, artifact, onnx_path, ExportOptions(tile=TILE, float_dtype=float_dtype))
    engine = folder / "engine.ort.onnx"
    return Built(checkpoint, artifact, model, onnx_path, engine, build_ort_engine(onnx_path, engine, threads=2))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Built]:
    """Factory ``built(float_dtype="fp32", **config_fields)``: one export + ORT engine per config (cached)."""
    cache: dict[tuple, Built] = {}

    def make(float_dtype: str = "fp32", **fields) -> Built:
        key = (float_dtype, *sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))
        if key not in cache:
            cache[key] = _build(tmp_path_factory.mktemp("built"), QuantConfig(**fields), float_dtype)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tile_batch() -> torch.Tensor:
    """Eight seeded random LR tiles ``(8, 3, 16, 16)`` in [0, 1]."""
    return torch.rand(8, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
