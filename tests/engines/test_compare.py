"""Engine-vs-reference comparison: the metrics themselves, provenance checks, the tiles both sides run,
the verification of a real ORT engine on real images (library, Polygraphy and 2dq-build-engine)."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from engines.cli_build import main as build_main
from engines.code_agreement import code_agreement
from engines.compare import (
    Agreement,
    ImageAgreement,
    Verdict,
    check_provenance,
    compare_images,
    cut_tiles,
    polygraphy_compare,
    pool,
    verify_engine,
)
from toolchain.quant import quantizers
from engines.noise import noise_floor, task_noise
from engines.ort_engine import OrtTileRunner
from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.io import write_image
from toolchain.inference import TileSpec, tiled_upscale
from toolchain.tolerances import (DEFAULT_NOISE_SIGMA, NOISE_FLOOR_MARGIN, ORT_MIN_IDENTICAL, ORT_MIN_PSNR,
                                  TASK_PSNR_TOLERANCE)
from toolchain.models import info_of

from ..engine_controls import assert_codes_fail_on_broken_engines


def test_image_metrics_on_known_differences():
    reference = np.full((4, 5, 3), 0.5, np.float32)
    same = compare_images("same", reference.copy(), reference)
    assert same.psnr == math.inf and same.identical_pixels == 1.0 and same.max_abs_error == 0.0
    shifted = reference.copy()
    shifted[0, 0, 0] += 0.125  # one value off by 1/8 (exact in float32): MSE 1/64 / 60 values
    result = compare_images("one", shifted, reference)
    assert result.psnr == pytest.approx(10 * math.log10(60 * 64), rel=1e-12)
    assert result.identical_pixels == 59 / 60
    assert result.max_abs_error == 0.125
    clipped = reference.copy()
    clipped[1, 1, 1] = 1.7  # beyond the displayable range: counts in max_abs_error, not in PSNR
    out_of_range = compare_images("clip", clipped, np.where(clipped > 1, 1.2, clipped).astype(np.float32))
    assert out_of_range.psnr == math.inf and out_of_range.max_abs_error == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        compare_images("bad", reference, reference[:2])


def test_pooling_weighs_every_pixel_equally():
    big = np.zeros((10, 10, 3), np.float32)
    small = np.zeros((1, 1, 3), np.float32)
    off = small.copy()
    off[0, 0, 0] = 0.5
    pooled = pool([compare_images("big", big, big), compare_images("small", off, small)])
    assert pooled.psnr_vs_reference == pytest.approx(10 * math.log10(303 / 0.25))
    assert pooled.min_image_psnr == pytest.approx(10 * math.log10(3 / 0.25))
    assert pooled.identical_pixels == pytest.approx(302 / 303)
    assert json.loads(json.dumps(pool([compare_images("big", big, big)]).to_dict()))["psnr_vs_reference"] == "inf"
    assert pooled.passes(10.0, 0.99) and not pooled.passes(40.0, 0.99)


def test_provenance_refuses_foreign_files(built, tmp_path):
    made = built(w_bits=4, a_bits=4)
    meta = dataclasses.asdict(OrtTileRunner(made.engine).export)
    check_provenance(meta, made.checkpoint, made.artifact)
    other = tmp_path / "other.safetensors"
    other.write_bytes(made.checkpoint.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        check_provenance(meta, other, made.artifact)
    with pytest.raises(ValueError, match="does not record artifact_sha256"):
        check_provenance({"checkpoint_sha256": meta["checkpoint_sha256"]}, made.checkpoint, made.artifact)


def test_cut_tiles_are_the_tiles_tiled_upscale_runs():
    lr = np.random.default_rng(0).random((21, 37, 3), dtype=np.float32)
    seen = []

    def record(tiles: torch.Tensor) -> torch.Tensor:
        seen.append(tiles.clone())
        return tiles.repeat_interleave(2, -1).repeat_interleave(2, -2)

    tiled_upscale(record, torch.from_numpy(lr).permute(2, 0, 1)[None], 2, TileSpec(16, 4, 3), multiple=8)
    torch.testing.assert_close(cut_tiles(lr, 16, 8, overlap=4), torch.cat(seen), rtol=0, atol=0)


@pytest.fixture(scope="module")
def real_crops(datasets_dir):
    """Two real LR crops (48x64) of Set5 at x2: the reference and engine upscale them tile by tile."""
    pairs = benchmark_pairs(datasets_dir, "Set5", 2)[:2]
    return [(pair.name, np.ascontiguousarray(load_pair(pair)[0][:48, :64])) for pair in pairs]


def test_verify_engine_on_real_images(built, real_crops, loud_float_engine, perturbed):
    """On the loud model: the criterion passes the engine and fails the float engine and the export with one
    scale one step wider (measured 28.3 and 35.2 dB, 17 and 22 % identical)."""
    made = built(loud=True, w_bits=4, a_bits=4)
    runner = OrtTileRunner(made.engine, threads=2)
    agreement = verify_engine(runner, made.checkpoint, made.artifact, real_crops, overlap=4, batch=4)
    assert agreement.passes(ORT_MIN_PSNR, ORT_MIN_IDENTICAL), agreement
    assert len(agreement.images) == 2 and agreement.max_abs_error < 0.05
    for engine in (loud_float_engine, perturbed(made).engine):
        broken = verify_engine(OrtTileRunner(engine, threads=2), made.checkpoint, made.artifact, real_crops, overlap=4,
                               batch=4)
        assert not broken.passes(ORT_MIN_PSNR, ORT_MIN_IDENTICAL), (engine.name, broken)


def test_polygraphy_comparison(built, real_crops, loud_float_engine, perturbed):
    """On the loud model (the plain tiny model's float engine passes this tolerance): the float engine and the
    export with one scale one step wider fail it."""
    made = built(loud=True, w_bits=4, a_bits=4)
    multiple = info_of(made.model).multiple_of  # 1: spandrel's SwinIR pads to its window itself
    tiles = [cut_tiles(lr, 16, multiple, overlap=4) for _, lr in real_crops]
    passed, stats = polygraphy_compare(made.engine, made.model, tiles)
    assert passed and len(stats) == 2 and all(s["q0.99_abs_error"] <= 0.5 / 255 for s in stats)
    off = lambda x: made.model(x) + 0.01  # noqa: E731  a reference the engine must not match
    failed, _ = polygraphy_compare(made.engine, off, tiles)
    assert not failed
    for engine in (loud_float_engine, perturbed(made).engine):
        failed, _ = polygraphy_compare(engine, made.model, tiles)
        assert not failed, engine.name


def test_build_engine_verify_command(built, datasets_dir, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    root = tmp_path / "bench"  # a one-image benchmark set cut from Set5 (LR 32x40, HR 64x80)
    pair = benchmark_pairs(datasets_dir, "Set5", 2)[3]
    lr, hr = load_pair(pair)
    write_image(root / "Mini" / "HR" / "img.png", hr[:64, :80])
    write_image(root / "Mini" / "LR_bicubic" / "X2" / "imgx2.png", lr[:32, :40])
    report = tmp_path / "verify.json"
    code = build_main(["--backend", "ort", "--onnx", str(made.onnx), "--out", str(tmp_path / "e.onnx"), "--threads",
                       "2", "--verify", "--weights", str(made.checkpoint), "--calib", str(made.artifact), "--data",
                       str(root), "--sets", "Mini", "--overlap", "4", "--polygraphy", "--codes", "2",
                       "--json", str(report), "--no-progress", "-q"])
    assert code == 0, capsys.readouterr()
    verification = json.loads(report.read_text())["verification"]
    assert verification["passed"] and verification["polygraphy"]["passed"]
    assert verification["codes"]["tiles"] == 2 and len(verification["codes"]["per_call"]) == 16
    # the floor applied: min(fixed 60 dB, the reference's own noise floor at 1e-6 input noise - 1 dB)
    assert verification["noise"]["sigma"] == DEFAULT_NOISE_SIGMA
    assert verification["noise_floor"] == verification["noise"]["psnr_vs_reference"]
    assert verification["floor"] == min(ORT_MIN_PSNR, verification["noise_floor"] - NOISE_FLOOR_MARGIN)
    assert verification["psnr_passed"] and verification["task_passed"]  # and the task check against HR
    assert abs(verification["task"]["psnr_difference"]) <= TASK_PSNR_TOLERANCE
    assert verification["identical_pixels"] >= ORT_MIN_IDENTICAL and verification["sets"] == ["Mini"]
    common = ["--onnx", str(made.onnx), "--out", str(tmp_path / "e2.onnx"), "--verify", "--weights",
              str(made.checkpoint), "--calib", str(made.artifact), "--data", str(root), "--sets", "Mini",
              "--overlap", "4", "--min-psnr", "1000", "--no-progress", "-q"]
    strict = tmp_path / "strict.json"
    assert build_main([*common, "--noise-floor", "0", "--json", str(strict)]) == 1  # below the floor: fails
    assert json.loads(strict.read_text())["verification"]["floor"] == 1000  # sigma 0: the fixed floor alone
    # the reference disagrees with itself under heavy noise; the engine is far closer: passes at that floor
    loose = tmp_path / "loose.json"
    assert build_main([*common, "--noise-floor", "0.05", "--floor-margin", "0", "--json", str(loose)]) == 0
    verification = json.loads(loose.read_text())["verification"]
    assert verification["floor"] == verification["noise_floor"] < 1000 and verification["psnr_passed"]
    assert build_main([*common, "--floor-margin", "-1"]) == 2  # usage errors
    assert build_main([*common, "--noise-floor=-1e-6"]) == 2


def test_integer_codes_per_quantizer(built, tile_batch, loud_float_engine, perturbed):
    made = built(loud=True, w_bits=4, a_bits=4)
    rows = code_agreement(made.engine, made.model, tile_batch, threads=2)
    activations = [n for n, q in quantizers(made.model).items() if q.kind == "activation"]
    assert sorted(row.node for row in rows) == sorted(f"{name}/QuantizeLinear" for name in activations)
    assert rows[0].identical == 1.0 and rows[0].max_difference == 0  # same input: same codes, exactly
    assert all(row.identical >= ORT_MIN_IDENTICAL and row.max_difference <= 1 for row in rows)
    assert_codes_fail_on_broken_engines(loud_float_engine, perturbed(made), made.model, tile_batch)


def test_noise_floor(built, real_crops):
    made = built(w_bits=4, a_bits=4)
    (same,) = noise_floor(made.checkpoint, made.artifact, real_crops, 16, sigma=0.0, overlap=4)
    assert same.psnr_vs_reference == math.inf and same.identical_pixels == 1.0
    draws = noise_floor(made.checkpoint, made.artifact, real_crops, 16, sigma=1e-3, overlap=4, draws=3)
    assert all(0 < d.max_abs_error and d.psnr_vs_reference < math.inf for d in draws)
    # seeded draws differ from each other (each is its own noise), and share one clean reference
    assert len({d.max_abs_error for d in draws}) == 3


def _pooled_with_task(psnr_difference: float) -> Agreement:
    task = {"engine_psnr": 30.0 + psnr_difference, "reference_psnr": 30.0, "engine_ssim": 0.9, "reference_ssim": 0.9}
    return pool([ImageAgreement("a", 50.0, 0.5, 0.1, 1e-5, 5, 10, task)])


def test_task_tolerance_widens_only_to_the_reference_own_noise():
    """The task check keeps 0.02 dB unless the reference itself moves more under float noise (3 x its RMS)."""
    engine = _pooled_with_task(0.032)   # measured: DAT-light x4 W4A4 DOBI, ORT engine on Set5
    assert not Verdict(engine, 60.0, 38.6, 1.0).task_passes
    assert Verdict(engine, 60.0, 38.6, 1.0, task_noise=(0.015, 1e-4)).task_passes
    assert Verdict(engine, 60.0, 38.6, 1.0, task_noise=(0.015, 1e-4)).task_tolerance == pytest.approx((0.045, 0.0005))
    assert not Verdict(engine, 60.0, 38.6, 1.0, task_noise=(0.005, 1e-4)).task_passes   # 0.02 dB stays the floor
    assert not Verdict(_pooled_with_task(0.05), 60.0, 38.6, 1.0, task_noise=(0.015, 1e-4)).task_passes
    draws = [_pooled_with_task(d) for d in (0.02, -0.01, 0.0, 0.01)]
    assert task_noise(draws)[0] == pytest.approx(math.sqrt((0.02 ** 2 + 0.01 ** 2 + 0.01 ** 2) / 4))


def test_code_agreement_when_the_exporter_merged_two_quantizers(tmp_path):
    """RGT's k and v linears read one tensor; calibrated alike, their input quantizers are one QuantizeLinear in the
    graph: both rows come from that node (and a call with neither node nor twin is an error naming it)."""
    from dataclasses import replace

    import calib
    import export
    from engines.code_agreement import _merged_twins, reference_codes
    from toolchain.quant import QuantConfig

    from ..tiny_models import tiny_rgt

    tiles = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = calib.quantize(tiny_rgt(), QuantConfig(w_bits=8, a_bits=8), lambda m: m(tiles), method="minmax")
    path = tmp_path / "rgt.onnx"
    export.export_onnx(qmodel, path, tile=32)
    expected = reference_codes(qmodel, tiles)
    twins = _merged_twins(path, expected)
    assert twins == {"layers.0.blocks.1.attn.v.input/QuantizeLinear": "layers.0.blocks.1.attn.k.input/QuantizeLinear"}
    rows = code_agreement(path, qmodel, tiles)
    assert sorted(row.node for row in rows) == sorted(expected)
    assert all(row.identical >= ORT_MIN_IDENTICAL for row in rows)
    by_node = {row.node: row for row in rows}
    assert by_node["layers.0.blocks.1.attn.v.input/QuantizeLinear"] == replace(
        by_node["layers.0.blocks.1.attn.k.input/QuantizeLinear"], node="layers.0.blocks.1.attn.v.input/QuantizeLinear")
    expected["nowhere/QuantizeLinear"] = np.full((7,), 3, np.int8)
    with pytest.raises(ValueError, match="no QuantizeLinear nodes named \\['nowhere/QuantizeLinear'\\]"):
        _merged_twins(path, expected)
