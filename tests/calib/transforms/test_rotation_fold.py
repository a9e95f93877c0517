"""Rotations folded per attention head (calib/transforms/rotation_fold.py): detection from data flow (SwinIR q/k
and v; DAT's spatial q/k only), exact in float alone and with every other transform, refusals, GPTQ through the
folds, and a lint-clean export that ONNX Runtime runs as the fake-quant reference with no extra op."""
from __future__ import annotations

import onnx
import pytest
import torch

from calib.artifact import load_quantized_model, save_artifact
from calib.baselines import calibrate_minmax
from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms.fold import bake_transforms
from calib.transforms.input_shift import add_input_shifts, init_input_shifts
from calib.transforms.registry import transform_parameters, transforms_spec, transforms_state
from calib.transforms.rotation import add_rotations, find_rotation_sites
from calib.transforms.rotation_fold import (
    add_folded_rotations,
    conflicting_shift_sites,
    find_folded_rotations,
)
from calib.transforms.shift import add_shifts, find_shift_sites
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant
from toolchain.quant import QuantConfig, QuantLinear, float_mode, quantize_model, quantizers
from toolchain.tolerances import FLOAT_FOLD_RTOL, ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ...tiny_models import make_loud, save_checkpoint, tiny_dat, tiny_swinir

TILE = 16


def _swinir(config: QuantConfig = QuantConfig(), loud: bool = False) -> torch.nn.Module:
    model = tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2])
    return quantize_model(make_loud(model) if loud else model, config)


def _data(n: int = 4, size: int = TILE, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _float_error(model: torch.nn.Module, x: torch.Tensor, before: torch.Tensor) -> float:
    with torch.no_grad(), float_mode(model):
        return float((model(x) - before).abs().max()) / float(before.amax() - before.amin())


def test_swinir_folds_q_k_and_v_of_every_attention_exactly():
    model, x = _swinir(), _data()
    with torch.no_grad(), float_mode(model):
        before = model(x)
    groups = find_folded_rotations(model, x[:1])
    assert [(g.kind, g.slices, g.head_dim) for g in groups] == [("qk", ((0, 12), (12, 24)), 6),
                                                                 ("value", ((24, 36),), 6)] * 2
    assert all(g.linears == (g.producer.replace("qkv", "proj"),) for g in groups if g.kind == "value")
    assert {g.construction for g in groups} == {f"random(seed {i})" for i in range(4)}  # no Hadamard of order 6
    seen = {}
    k = next(q for name, q in quantizers(model).items() if q.role == "attn_k")
    k.register_forward_pre_hook(lambda m, args: seen.setdefault("k", []).append(args[0].detach()))
    with torch.no_grad(), float_mode(model):
        model(x)
    blocks = add_folded_rotations(model, groups)
    assert _float_error(model, x, before) <= FLOAT_FOLD_RTOL
    with torch.no_grad(), float_mode(model):
        model(x)
    assert not torch.allclose(seen["k"][0], seen["k"][1], atol=1e-3)  # the k quantizer sees k M
    assert transform_parameters(model) == [] and set(transforms_state(model)) == {
        f"folded_rotation.{name}.block" for name in blocks}


def test_dat_folds_only_the_spatial_q_k():
    """DAT's v feeds a depthwise conv and its channel attention contracts over tokens: both dropped."""
    model = quantize_model(tiny_dat(), QuantConfig())
    x = _data(2, 32)
    with torch.no_grad(), float_mode(model):
        before = model(x)
    groups = find_folded_rotations(model, x[:1])
    assert [g.kind for g in groups] == ["qk"] * 4  # 2 groups x 1 spatial block x 2 branches
    assert all(".blocks.0.attn.qkv" in g.producer and g.head_dim == 16 for g in groups)
    assert {g.construction for g in groups} == {"hadamard(sylvester-16)"}
    add_folded_rotations(model, groups)
    assert _float_error(model, x, before) <= FLOAT_FOLD_RTOL


def test_every_rotation_with_every_transform_is_exact_and_bakes_bit_for_bit():
    model, x = _swinir(QuantConfig(weight_granularity="per-channel")), _data()
    with torch.no_grad(), float_mode(model):
        before = model(x)
    folded = find_folded_rotations(model, x[:1])
    groups = find_smoothing_groups(model, x[:1], kinds=("norm", "value", "input"))
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    add_folded_rotations(model, folded)
    add_rotations(model, find_rotation_sites(model))
    add_input_shifts(model, [g.producer for g in groups if g.kind == "input"])
    init_input_shifts(model, batch_forward_loop(x, progress=False))
    assert _float_error(model, x, before) <= FLOAT_FOLD_RTOL
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)
    spec = transforms_spec(model)
    assert [len(spec[k]) for k in ("smoothing", "folded_rotations", "input_shifts", "rotations")] == [8, 4, 2, 8]
    with torch.no_grad():
        quantized = model(x)
        bake_transforms(model)
        assert torch.equal(model(x), quantized)


def test_conflicts_are_refused_or_left_out():
    model, x = _swinir(), _data()
    sites = find_shift_sites(model, x[:1])
    folded = find_folded_rotations(model, x[:1])
    dropped = conflicting_shift_sites(sites, folded)
    assert {s.kind for s in dropped} == {"attn_key", "attn_value"} and \
        [s.kind for s in sites if s not in dropped] == ["norm_output"] * 4
    add_shifts(model, [s for s in sites if s.kind == "attn_key"])
    with pytest.raises(ValueError, match="already rotated or shifted"):
        add_folded_rotations(model, [g for g in folded if g.kind == "qk"])
    fresh = _swinir()
    add_folded_rotations(fresh, folded)
    with pytest.raises(ValueError, match="already rotated or shifted"):
        add_folded_rotations(fresh, folded[:1])
    other = _swinir()
    add_rotations(other, find_rotation_sites(other, only=("*.proj",)))
    with pytest.raises(ValueError, match="add folded rotations first"):
        add_folded_rotations(other, [g for g in folded if g.kind == "value"])


def test_gptq_writes_through_the_folds():
    from calib.gptq import refine_weights

    model, x = _swinir(QuantConfig(weight_granularity="per-channel")), _data()
    add_folded_rotations(model, find_folded_rotations(model, x[:1]))
    add_rotations(model, find_rotation_sites(model))
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)
    refine_weights(model, batch_forward_loop(x, progress=False), progress=False)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
            step = module.weight_quantizer.step_and_zero_point()[0]
            assert ((module.weight - module.weight_quantizer(module.weight)).abs() <= 1e-4 * step).all()


def test_folded_export_has_no_extra_op_and_ort_matches_the_reference(tmp_path):
    """Loud W4A4 with q/k and v folded: the graph has the unrotated export's MatMuls only, lints clean, and ORT
    agrees with the fake-quant reference (codes and output)."""
    from engines.code_agreement import code_agreement
    from engines.ort_engine import OrtTileRunner, build_ort_engine
    from export.onnx_export import ExportOptions, export_onnx
    from toolchain.metrics import output_difference

    model = make_loud(tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2]))
    checkpoint = save_checkpoint(model, tmp_path / "tiny_x2.safetensors")
    config = QuantConfig(w_bits=4, a_bits=4)
    quantize_model(model, config)
    add_folded_rotations(model, find_folded_rotations(model, _data(1)))
    calibrate_minmax(model, batch_forward_loop(_data(4, seed=2), progress=False))
    artifact = save_artifact(tmp_path / "folded.safetensors", model, checkpoint=checkpoint, quant_config=config,
                             method="minmax")
    graph, engine = tmp_path / "folded.onnx", tmp_path / "folded.ort.onnx"
    assert not export_onnx(checkpoint, artifact, graph, ExportOptions(tile=TILE)).violations
    assert sum(n.op_type == "MatMul" for n in onnx.load(str(graph)).graph.node) == 12  # 8 linears, 4 attention
    build_ort_engine(graph, engine, threads=2)
    reference_model = load_quantized_model(checkpoint, artifact)
    tiles = _data(8, seed=7)
    with torch.no_grad():
        reference = reference_model(tiles)
        torch.testing.assert_close(reference, model(tiles), rtol=0, atol=0)  # the artifact round trip
    agreement = output_difference(OrtTileRunner(engine, threads=2)(tiles), reference)
    assert agreement.psnr >= ORT_MIN_PSNR and agreement.identical_pixels >= ORT_MIN_IDENTICAL, agreement
    rows = code_agreement(engine, reference_model, tiles[:2], threads=2)
    assert all(r.identical >= ORT_MIN_IDENTICAL and r.max_difference <= 1 for r in rows), rows


def test_the_folds_follow_the_model_to_another_dtype():
    """Shared matrices are read through their owner, so ``.to()`` (DQC's device move, the export's dtype) keeps
    every fold consistent."""
    model, x = _swinir(), _data()
    with torch.no_grad(), float_mode(model):
        before = model(x).double()
    add_folded_rotations(model, find_folded_rotations(model, x[:1]))
    add_rotations(model, find_rotation_sites(model))
    model.double()
    with torch.no_grad(), float_mode(model):
        after = model(x.double())
    assert after.dtype == torch.float64 and float((after - before).abs().max()) <= 1e-5
