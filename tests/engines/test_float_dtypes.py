"""Every float dtype of every export target is run and verified with its own criterion.

For each target (``trt-int8``, ``trt-int4``, ``ort``) and float body (``fp32``, ``fp16``): the loud tiny W4A4
model (quantization shows in its output) is exported, built with ONNX Runtime and held to the criterion
``2dq-build-engine --verify`` applies to it (ARCHITECTURE.md s. 7; fixed floor 60 dB for fp32 bodies, 45 dB for
fp16 ones; the reference's own noise floor measured at the size of the body's float rounding,
:func:`engines.noise.noise_sigma`, less 1 dB; the task check against HR). The negative control: the same model with every
quantizer disabled, exported with the same body, must fail that criterion.

Measured (2 crops of Set5 x2, engine / floor / float control, dB): fp32 bodies 86.0 / 60 / 28.3 (trt-int8, ort) and
140.2 / 60 / 34.6 (trt-int4); fp16 bodies 44.95 / 41.4 / 28.3 (trt-int8, ort: the loud model's large activations lose
most to fp16) and 74.4 / 45 / 34.6 (trt-int4). Every control also fails the task check.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from engines.cli_build import THRESHOLDS
from engines.cli_build import main as build_main
from engines.compare import Verdict, verify_engine
from engines.noise import noise_floor, noise_sigma, task_noise
from engines.ort_engine import OrtTileRunner, build_ort_engine
from export.metadata import ExportMetadata
from export.onnx_export import ExportOptions
from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.io import write_image
from toolchain.quant.config import TARGETS
from toolchain.tolerances import NOISE_FLOOR_MARGIN

from ..engine_controls import float_export_of
from ..export.conftest import TILE

CASES = [(target, dtype) for target in TARGETS for dtype in ("fp32", "fp16")]


@pytest.fixture(scope="module")
def crops(datasets_dir) -> list:
    """Two real Set5 x2 crops with their HR (LR 48x64): the reference and the engine upscale them tile by tile."""
    out = []
    for pair in benchmark_pairs(datasets_dir, "Set5", 2)[:2]:
        lr, hr = load_pair(pair)
        out.append((pair.name, np.ascontiguousarray(lr[:48, :64]), np.ascontiguousarray(hr[:96, :128])))
    return out


def _config(target: str) -> dict:
    # trt-int4 packs 4-bit weights in blocks along the input channel: per-channel scales are its layout
    return dict(w_bits=4, a_bits=4, target=target,
                **({"weight_granularity": "per-channel"} if target == "trt-int4" else {}))


def _verdict(engine, made, crops, dtype: str) -> Verdict:
    agreement = verify_engine(OrtTileRunner(engine, threads=2), made.checkpoint, made.artifact, crops, overlap=4)
    draws = noise_floor(made.checkpoint, made.artifact, crops, TILE, sigma=noise_sigma(dtype), overlap=4, draws=4)
    fixed, identical = THRESHOLDS[("ort", dtype)]
    return Verdict(agreement, fixed, draws[0].psnr_vs_reference, NOISE_FLOOR_MARGIN, identical, task_noise(draws))


@pytest.mark.parametrize("target, dtype", CASES, ids=[f"{t}-{d}" for t, d in CASES])
def test_every_float_body_passes_its_criterion_and_its_float_graph_fails(target, dtype, built, crops, tmp_path):
    made = built(float_dtype=dtype, loud=True, **_config(target))
    assert ExportMetadata.read(made.onnx).float_dtype == dtype and ExportMetadata.read(made.onnx).target == target
    verdict = _verdict(made.engine, made, crops, dtype)
    assert verdict.passed, verdict.summary()
    graph = float_export_of(made.checkpoint, made.artifact, tmp_path / "float.onnx",
                            ExportOptions(tile=TILE, float_dtype=dtype))
    build_ort_engine(graph, tmp_path / "float.ort.onnx", threads=2)
    control = _verdict(tmp_path / "float.ort.onnx", made, crops, dtype)
    assert not control.psnr_passes and not control.passed, control.summary()


def test_the_fp16_noise_is_the_size_of_fp16_rounding():
    """fp16's unit roundoff bounds the relative error of rounding an image value to fp16; the fp32 sigma is far
    below it."""
    values = np.linspace(2.0 ** -14, 1.0, 100_001, dtype=np.float64)
    error = np.abs(values.astype(np.float16).astype(np.float64) - values)
    assert (error <= noise_sigma("fp16") * values).all() and error.max() > noise_sigma("fp16") / 4
    assert noise_sigma("fp32") < noise_sigma("fp16") / 100
    with pytest.raises(ValueError, match="float dtype must be one of"):
        noise_sigma("bf16")


def test_build_engine_verify_picks_the_criterion_of_the_body(built, crops, tmp_path, capsys):
    """``2dq-build-engine --verify`` on an fp16 body: noise at fp16's unit roundoff and 45 dB fixed floor; the
    flags override the defaults."""
    made = built(float_dtype="fp16", loud=True, w_bits=4, a_bits=4)
    root = tmp_path / "bench"  # a one-image benchmark set: the first crop
    name, lr, hr = crops[0]
    write_image(root / "Mini" / "HR" / f"{name}.png", hr)
    write_image(root / "Mini" / "LR_bicubic" / "X2" / f"{name}x2.png", lr)
    common = ["--backend", "ort", "--onnx", str(made.onnx), "--out", str(tmp_path / "e.onnx"), "--threads", "2",
              "--verify", "--weights", str(made.checkpoint), "--calib", str(made.artifact), "--data", str(root),
              "--sets", "Mini", "--overlap", "4", "--noise-draws", "2", "--no-progress", "-q"]
    report = tmp_path / "verify.json"
    code = build_main([*common, "--json", str(report)])
    assert code == 0, capsys.readouterr().out[-1500:]
    verification = json.loads(report.read_text())["verification"]
    assert verification["noise"]["sigma"] == noise_sigma("fp16") and verification["fixed_floor"] == 45.0
    assert verification["floor"] == min(45.0, verification["noise_floor"] - NOISE_FLOOR_MARGIN)
    assert verification["passed"]
    build_main([*common, "--noise-floor", "1e-6", "--min-psnr", "50", "--json", str(report)])  # pass or fail: both report
    verification = json.loads(report.read_text())["verification"]
    assert verification["noise"]["sigma"] == 1e-6 and verification["fixed_floor"] == 50.0
