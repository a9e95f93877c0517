"""Fixtures of the engine tests: tiny calibrated SwinIR models, their QDQ exports and ORT engines.

The calibrated models of ``tests/export/conftest.py`` (``make_calibrated``: a tiny SwinIR x2 with
random weights, MinMax-calibrated, saved as checkpoint + artifact), exported at its 16-pixel tile and
built with ONNX Runtime; ``loud`` ones (``tests.tiny_models.make_loud``) where a test's whole-model check must
tell the quantized model from the float one, with the float engine of that model as the negative control.
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

from ..engine_controls import Perturbed, float_export_of, perturbed_engine
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


def _build(folder: Path, config: QuantConfig, float_dtype: str, seed: int = 0, loud: bool = False) -> Built:
    made = make_calibrated(folder, config, seed, loud)
    onnx_path = folder / "qdq.onnx"
    export_onnx(made.checkpoint, made.artifact, onnx_path, ExportOptions(tile=TILE, float_dtype=float_dtype))
    engine = folder / "engine.ort.onnx"
    return Built(made.checkpoint, made.artifact, made.model, onnx_path, engine,
                 build_ort_engine(onnx_path, engine, threads=2))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Built]:
    """Factory ``built(float_dtype="fp32", loud=False, **config_fields)``: one export + ORT engine per config
    (cached)."""
    cache: dict[tuple, Built] = {}

    def make(float_dtype: str = "fp32", loud: bool = False, **fields) -> Built:
        key = (float_dtype, loud, *sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))
        if key not in cache:
            cache[key] = _build(tmp_path_factory.mktemp("built"), QuantConfig(**fields), float_dtype, loud=loud)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def loud_float_engine(built: Callable[..., Built], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The negative control of the loud models: the ORT engine of their float model (every quantizer disabled,
    through the same exporter, W4A4's metadata). One for every bit width: the loud models of ``built`` share
    their weights, and the float model is the weights alone."""
    made = built(loud=True, w_bits=4, a_bits=4)
    folder = tmp_path_factory.mktemp("loud_float")
    graph = float_export_of(made.checkpoint, made.artifact, folder / "float.onnx", ExportOptions(tile=TILE))
    build_ort_engine(graph, folder / "float.ort.onnx", threads=2)
    return folder / "float.ort.onnx"


@pytest.fixture(scope="session")
def perturbed(tile_batch: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Built], Perturbed]:
    """Factory ``perturbed(made)``, a negative control: ``made``'s export with the scale of its first activation
    quantizer one step wider, built as ``made``'s engine was (cached)."""
    cache: dict[Path, Perturbed] = {}

    def make(made: Built) -> Perturbed:
        if made.onnx not in cache:
            cache[made.onnx] = perturbed_engine(made.onnx, made.model, tile_batch, tmp_path_factory.mktemp("perturbed"))
        return cache[made.onnx]

    return make


@pytest.fixture(scope="session")
def tile_batch() -> torch.Tensor:
    """Eight seeded random LR tiles ``(8, 3, 16, 16)`` in [0, 1]."""
    return torch.rand(8, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
