"""Fixtures of the export tests: tiny calibrated SwinIR models saved as checkpoint + artifact.

A tiny SwinIR (spandrel's class, random weights: one residual group of a regular and a shifted
block) is quantized with ``quantize_model``, calibrated with MinMax on seeded random images and
saved through ``calib.artifact``, so every test exports through the same files a user has.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from calib.artifact import save_artifact
from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from export.metadata import ExportMetadata
from toolchain.quant import QuantConfig, quantize_model

from ..tiny_models import make_loud, save_checkpoint, tiny_dat, tiny_swinir

#: one residual group of a regular and a shifted block
TINY = dict(depths=[2], num_heads=[2])
#: LR tile of the test exports: 2x2 windows of 8, so the shifted block has a real mask
TILE = 16


def hand_metadata(**changes) -> ExportMetadata:
    """The metadata of a tiny SwinIR x2 trt-int8 export at tile 8, with ``changes``: for graphs made by hand."""
    fields = dict(arch="SwinIR", scale=2, tile=8, multiple=1, target="trt-int8", float_dtype="fp32", opset=17,
                  checkpoint_sha256="c" * 64, artifact_sha256="a" * 64, quant_config={"w_bits": 4, "a_bits": 4},
                  model_config={"depths": [2]})
    return ExportMetadata(**{**fields, **changes})


@dataclass(frozen=True)
class Calibrated:
    """A calibrated tiny model and the files it was saved to."""

    checkpoint: Path
    artifact: Path
    model: torch.nn.Module
    config: QuantConfig


def make_calibrated(folder: Path, config: QuantConfig, seed: int = 0, loud: bool = False) -> Calibrated:
    """Tiny SwinIR x2 from ``seed`` (``loud``: :func:`~tests.tiny_models.make_loud`, so that quantization shows),
    quantized by ``config``, MinMax-calibrated, saved under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_swinir(scale=2, seed=seed, **TINY)
    if loud:
        make_loud(model)
    checkpoint = save_checkpoint(model, folder / "tiny_x2.safetensors")
    quantize_model(model, config)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(seed + 1))
    calibrate_minmax(model, batch_forward_loop(images, batch_size=4, progress=False))
    artifact = save_artifact(folder / "bounds.safetensors", model, checkpoint=checkpoint, quant_config=config,
                             method="minmax")
    return Calibrated(checkpoint, artifact, model, config)


#: tile of the tiny DAT exports (its windows and channel attention need 64 pixels)
DAT_TILE = 64


def tiny_dat_export(path: Path) -> Path:
    """A tiny DAT x2 W8A8 export at :data:`DAT_TILE` (random weights, MinMax bounds on seeded random tiles):
    DAT's head splits are chains of transposes and reshapes, which SwinIR's graph lacks."""
    from export.onnx_export import ExportOptions, Provenance, export_model

    model = quantize_model(tiny_dat(scale=2), QuantConfig(w_bits=8, a_bits=8))
    images = torch.rand(2, 3, DAT_TILE, DAT_TILE, generator=torch.Generator().manual_seed(3))
    calibrate_minmax(model, batch_forward_loop(images, batch_size=2, progress=False))
    export_model(model, path, ExportOptions(tile=DAT_TILE), Provenance("d" * 64, "e" * 64, {"w_bits": 8, "a_bits": 8}))
    return path


def tiny_dat_with_and_without(folder: Path, base: tuple[str, ...], lever: str) -> tuple[Path, Path, int]:
    """The tiny DAT export rewritten by the speed passes ``base``, and by ``base`` plus ``lever``; (the two
    graphs, how much ``lever`` changed)."""
    from export.speed_passes import run_speed_passes

    export = tiny_dat_export(folder / "dat_w8a8.onnx")
    paths, changed = [], 0
    for name, passes in (("without", base), ("with", (*base, lever))):
        model = ir.load(str(export))
        changed = run_speed_passes(model, passes).get(lever, 0)
        ir.save(model, str(folder / f"{name}.onnx"))
        paths.append(folder / f"{name}.onnx")
    return paths[0], paths[1], changed


def cpu_engine_runs(graphs: list[Path], tiles: torch.Tensor, backend: str) -> tuple[list[dict], list]:
    """Each of ``graphs`` built into a ``backend`` (``ort`` or ``openvino``) engine without the builders' default
    passes and run on ``tiles``: (runtime layer counts, OpenVINO only, else empty dicts; output arrays)."""
    from engines.ort_engine import OrtTileRunner, build_ort_engine

    layers, outputs = [], []
    for path in graphs:
        if backend == "ort":
            engine = path.with_suffix(".ort.onnx")
            build_ort_engine(path, engine, threads=2, graph_passes=())
            layers.append({})
            outputs.append(OrtTileRunner(engine, threads=2)(tiles).numpy())
            continue
        from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine, runtime_layers

        engine = path.with_suffix(".ov.xml")
        build_openvino_engine(path, engine, threads=1, graph_passes=())
        runner = OpenVinoTileRunner(engine, threads=1, batch=len(tiles))
        layers.append(runtime_layers(runner.compiled)[0])
        outputs.append(runner(tiles).numpy())
    return layers, outputs


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Calibrated]:
    """Factory ``calibrated(**config_fields)``: one calibrated tiny model per distinct config (cached)."""
    cache: dict[tuple, Calibrated] = {}

    def make(**fields) -> Calibrated:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))
        if key not in cache:
            cache[key] = make_calibrated(tmp_path_factory.mktemp("calibrated"), QuantConfig(**fields))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def export_tile() -> int:
    """LR tile of the test exports (:data:`TILE`)."""
    return TILE
