"""Fixtures of the engine tests: tiny calibrated SwinIR models, their QDQ exports and ORT engines.

The calibrated models of ``tests/export/conftest.py`` (``make_calibrated``: a tiny SwinIR x2 with
random weights, MinMax-calibrated, saved as checkpoint + artifact), exported at its 16-pixel tile and
built with ONNX Runtime.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engines.ort_engine import OrtBuild, build_ort_engine
from export.onnx_export import ExportOptions, export_onnx
from toolchain.quant import QuantConfig

from ..export.conftest import TILE, make_calibrated


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
    made = make_calibrated(folder, config, seed)
    onnx_path = folder / "qdq.onnx"
    export_onnx(made.checkpoint, made.artifact, onnx_path, ExportOptions(tile=TILE, float_dtype=float_dtype))
    engine = folder / "engine.ort.onnx"
    return Built(made.checkpoint, made.artifact, made.model, onnx_path, engine,
                 build_ort_engine(onnx_path, engine, threads=2))


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
