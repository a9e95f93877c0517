"""Negative controls: the agreement checks pass the real engine and fail engines that do not compute the model.

Each check of the verification ladder runs on four ORT engines of one calibrated model:
- ``quantized``: the QDQ export (must pass);
- ``unquantized``: the same model with every quantizer disabled, through the same exporter (a float graph with
  the same metadata; must fail);
- ``perturbed``: the QDQ export with one activation quantizer's scale moved by one step (must fail).

The fixture makes quantization show: a tiny SwinIR with random weights barely changes when quantized
(its blocks are near-identity at the initialization's scale: float vs W4A4 70 dB), so every Linear weight is
scaled by ``tests.tiny_models.LOUD_GAIN`` (``make_loud``), which makes the blocks do real work (float vs W4A4
about 32 dB, W8A8 52 dB).
The whole-model floor separates the unquantized engine; a one-step change of one scale can hide under
it, so the exact per-quantizer integer codes are compared as well. Bodies with fp16 float layers, and every
export target, have their own criterion and controls in tests/engines/test_float_dtypes.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calib.artifact import load_artifact, load_quantized_model, save_artifact
from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from engines.code_agreement import code_agreement
from engines.compare import Verdict, verify_engine
from engines.noise import noise_floor, task_noise
from engines.ort_engine import OrtTileRunner, build_ort_engine
from export.onnx_export import ExportOptions, Provenance, export_model, export_onnx
from toolchain import load_model
from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.defaults import DEFAULT_DATA
from toolchain.files import sha256_file
from toolchain.quant import QuantConfig, quantize_model, set_quant_enabled
from toolchain.tolerances import NOISE_FLOOR_MARGIN, ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ..export.conftest import TILE, TINY
from ..engine_controls import perturb_one_scale
from ..tiny_models import make_loud, save_checkpoint, tiny_swinir

BITS = 4


@pytest.fixture(scope="module")
def controls(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("controls")
    checkpoint = save_checkpoint(make_loud(tiny_swinir(scale=2, seed=0, **TINY)), folder / "loud_x2.safetensors")
    config = QuantConfig(w_bits=BITS, a_bits=BITS)
    calibrated = quantize_model(load_model(checkpoint), config)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    calibrate_minmax(calibrated, batch_forward_loop(images, batch_size=4, progress=False))
    artifact = save_artifact(folder / "bounds.safetensors", calibrated, checkpoint=checkpoint, quant_config=config,
                             method="minmax")
    graphs = {"quantized": folder / "qdq.onnx"}
    export_onnx(checkpoint, artifact, graphs["quantized"], ExportOptions(tile=TILE))
    unquantized = load_quantized_model(checkpoint, artifact)
    set_quant_enabled(unquantized, False)
    meta = load_artifact(artifact).meta
    graphs["unquantized"] = folder / "float.onnx"
    export_model(unquantized, graphs["unquantized"], ExportOptions(tile=TILE),
                 Provenance(meta["checkpoint_sha256"], sha256_file(artifact), meta["quant_config"]))
    reference = load_quantized_model(checkpoint, artifact)
    tiles = torch.rand(4, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
    first = code_agreement(_engine(folder, "probe", graphs["quantized"]), reference, tiles)[0].node
    graphs["perturbed"] = folder / "perturbed.onnx"
    perturb_one_scale(graphs["quantized"], graphs["perturbed"], first, BITS)
    engines = {kind: _engine(folder, kind, graph) for kind, graph in graphs.items()}
    crops = []
    for pair in benchmark_pairs(DEFAULT_DATA, "Set5", 2)[:2]:
        lr, hr = load_pair(pair)
        crops.append((pair.name, np.ascontiguousarray(lr[:48, :64]), np.ascontiguousarray(hr[:96, :128])))
    draws = noise_floor(checkpoint, artifact, crops, TILE, overlap=4, draws=4)
    return {"checkpoint": checkpoint, "artifact": artifact, "engines": engines, "graphs": graphs, "crops": crops,
            "reference": reference, "tiles": tiles, "perturbed_node": first,
            "noise": (draws[0].psnr_vs_reference, task_noise(draws))}


def _engine(folder: Path, kind: str, graph: Path) -> Path:
    engine = folder / f"{kind}.ort.onnx"
    build_ort_engine(graph, engine, threads=2)
    return engine


def _verdict(controls: dict, kind: str, fixed_floor: float) -> Verdict:
    runner = OrtTileRunner(controls["engines"][kind], threads=2)
    agreement = verify_engine(runner, controls["checkpoint"], controls["artifact"], controls["crops"], overlap=4)
    floor, spread = controls["noise"]
    return Verdict(agreement, fixed_floor, floor, NOISE_FLOOR_MARGIN, 0.0, spread)


def test_the_fixture_quantization_shows(controls: dict) -> None:
    """Without this the controls below would prove nothing: the float graph must be far from the reference."""
    float_graph = onnx.load(str(controls["graphs"]["unquantized"]))
    assert not [n for n in float_graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    verdict = _verdict(controls, "unquantized", ORT_MIN_PSNR)
    assert verdict.agreement.psnr_vs_reference < 40.0, verdict.summary()


def test_verification_criterion_passes_the_engine_and_fails_the_float_graph(controls: dict) -> None:
    assert _verdict(controls, "quantized", ORT_MIN_PSNR).passed
    failed = _verdict(controls, "unquantized", ORT_MIN_PSNR)
    assert not failed.passed and not failed.psnr_passes, failed.summary()


def test_integer_codes_agree_exactly_on_the_engine_only(controls: dict) -> None:
    """Per quantizer: the engine's int8 codes equal the reference's (up to a float-noise flip of one level);
    the engine with one scale one step off disagrees at that quantizer; the float graph has no codes."""
    rows = code_agreement(controls["engines"]["quantized"], controls["reference"], controls["tiles"])
    assert rows[0].identical == 1.0 and rows[0].max_difference == 0
    assert all(row.identical >= ORT_MIN_IDENTICAL and row.max_difference <= 1 for row in rows)
    perturbed = {row.node: row for row in code_agreement(controls["engines"]["perturbed"], controls["reference"],
                                                         controls["tiles"])}
    row = perturbed[controls["perturbed_node"]]
    assert row.identical < ORT_MIN_IDENTICAL, row
    with pytest.raises(ValueError, match="no QuantizeLinear nodes"):
        code_agreement(controls["engines"]["unquantized"], controls["reference"], controls["tiles"])


def _openvino_verdict(controls: dict, kind: str, folder: Path) -> Verdict:
    from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine

    engine = folder / f"{kind}.ov.xml"
    build_openvino_engine(controls["graphs"][kind], engine, threads=2)
    agreement = verify_engine(OpenVinoTileRunner(engine, threads=2), controls["checkpoint"], controls["artifact"],
                              controls["crops"], overlap=4)
    floor, spread = controls["noise"]
    return Verdict(agreement, ORT_MIN_PSNR, floor, NOISE_FLOOR_MARGIN, 0.0, spread)


def test_openvino_passes_the_engine_and_fails_the_float_graph_and_the_perturbed_scale(controls: dict,
                                                                                      tmp_path: Path) -> None:
    """The same criterion on OpenVINO IR built from the same three graphs (the CPU plugin's own int8 kernels)."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    assert _openvino_verdict(controls, "quantized", tmp_path).passed
    for kind in ("unquantized", "perturbed"):
        failed = _openvino_verdict(controls, kind, tmp_path)
        assert not failed.passed, (kind, failed.summary())
