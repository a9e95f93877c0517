"""Exact asymmetric grids by folded shifts (calib/transforms/shift.py): detection, algebra, exactness, restore,
baking."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms.fold import bake_transforms
from calib.transforms.registry import restore_transforms, transforms_spec, transforms_state
from calib.transforms.shift import (
    ShiftSite,
    SubtractOffset,
    add_shifts,
    calibrate_shifts,
    find_shift_sites,
    init_shifts,
    shift_parameters,
    shift_sites,
)
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant, smoothing_parameters
from toolchain.loading import load_state_dict_model
from toolchain.models import ngswin
from toolchain.metrics import output_difference
from toolchain.quant import QuantConfig, bounds_state, float_mode, load_bounds, quantize_model, quantizers, grid
from toolchain.tolerances import FLOAT_FOLD_RTOL, GRID_TOL_STEPS, ORT_MIN_PSNR

from ...engine_controls import assert_codes_agree, assert_codes_fail_on_broken_engines, float_export, perturbed_engine
from ...tiny_models import tiny_swinir as _tiny_swinir

NGSWIN = dict(scale=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4), dec_depth=2, dec_num_heads=2,
              window_size=4, ngrams=(2, 3, 2), mlp_ratio=1.5, in_chans=3)


def tiny_swinir(config: QuantConfig = QuantConfig(), seed: int = 0) -> nn.Module:
    """spandrel's tiny SwinIR x2 (embed 12, depths [2, 2], heads [2, 2], window 8), LayerNorms perturbed."""
    model = _tiny_swinir(scale=2, seed=seed)
    with torch.no_grad():  # trained-looking LayerNorms with off-centre outputs
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.3 + 0.2)
    return quantize_model(model, config)


def dobi(model: nn.Module, x: torch.Tensor) -> None:
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)


def _range(t: torch.Tensor) -> float:
    return float(t.amax() - t.amin())


def _set_offsets(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in shift_parameters(model):
            p.copy_(torch.rand((), generator=generator) - 0.5)


def test_swinir_sites():
    model = tiny_swinir()
    sites = {s.name: s for s in find_shift_sites(model, torch.rand(1, 3, 16, 16))}
    assert len(sites) == 16
    b = "layers.1.residual_group.blocks.0"
    assert sites[f"{b}.norm1.norm_output"] == ShiftSite(
        "norm_output", f"{b}.norm1", 0, 12, f"{b}.attn.qkv.input", (f"{b}.attn.qkv.input",), (f"{b}.attn.qkv",))
    assert sites[f"{b}.norm2.norm_output"].bias_folds == (f"{b}.mlp.fc1",)
    # qkv output channels are [q | k | v]
    assert sites[f"{b}.attn.qkv.attn_key"] == ShiftSite(
        "attn_key", f"{b}.attn.qkv", 12, 24, f"{b}.attn.matmul.0.b", (f"{b}.attn.matmul.0.b",), ())
    assert sites[f"{b}.attn.qkv.attn_value"] == ShiftSite(
        "attn_value", f"{b}.attn.qkv", 24, 36, f"{b}.attn.matmul.1.b",
        (f"{b}.attn.matmul.1.b", f"{b}.attn.proj.input"), (f"{b}.attn.proj",))


def test_ngswin_sites_values_only():
    # post-norm blocks: no LayerNorm feeds a linear; cosine attention: k is normalized before q.k
    torch.manual_seed(0)
    model = quantize_model(load_state_dict_model(ngswin.NGswin(**NGSWIN).state_dict(), "tiny NGswin"), QuantConfig())
    sites = find_shift_sites(model, torch.rand(1, 3, 32, 32))
    attentions = [p for p, m in model.named_modules() if type(m).__name__ == "CosineWindowAttention"]
    assert len(attentions) == 10  # 5 blocks x (window attention + N-gram context attention)
    assert {s.kind for s in sites} == {"attn_value"}
    assert sorted(s.producer for s in sites) == sorted(f"{a}.qkv" for a in attentions)
    inner = {a: model.get_submodule(f"{a}.proj").in_features for a in attentions}
    assert all((s.start, s.stop) == (2 * inner[s.producer[:-4]], 3 * inner[s.producer[:-4]]) for s in sites)


def test_float_model_is_unchanged_by_shifts():
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    sites = find_shift_sites(model, x[:1])
    with torch.no_grad(), float_mode(model):
        reference = model(x)
        add_shifts(model, sites)
        _set_offsets(model)
        shifted = model(x)
    assert float((shifted - reference).abs().max()) <= FLOAT_FOLD_RTOL * _range(reference)
    assert len(shift_parameters(model)) == 16 and shift_sites(model) == sites
    assert len([k for k in model.state_dict() if k.endswith("offset")]) == 16


def test_bias_fold_uses_the_quantized_weight():
    # with quantized weights and float activations every fold is an identity only if the bias
    # absorbs W_q @ c, not W @ c (4-bit weights differ from W by up to half a step)
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    sites = find_shift_sites(model, x[:1])
    dobi(model, x)
    for quantizer in quantizers(model).values():
        quantizer.enabled = quantizer.kind == "weight"
    proj = model.get_submodule("layers.0.residual_group.blocks.0.attn.proj")
    with torch.no_grad():
        reference = model(x)
        add_shifts(model, sites)
        _set_offsets(model)
        assert float((model(x) - reference).abs().max()) <= FLOAT_FOLD_RTOL * _range(reference)
        quantized_fold = proj.bias.clone()
        with float_mode(model):
            raw_fold = proj.bias.clone()
    offset = shift_parameters(model)[2].detach()  # blocks.0: norm1, qkv key, qkv value, ...
    assert shift_sites(model)[2].bias_folds == ("layers.0.residual_group.blocks.0.attn.proj",)
    weight_q = proj.weight_quantizer(proj.weight).detach()
    bias = proj.parametrizations.bias.original.detach()
    assert torch.equal(quantized_fold, bias + offset * weight_q.sum(1))
    assert torch.equal(raw_fold, bias + offset * proj.weight.detach().sum(1))
    assert not torch.equal(quantized_fold, raw_fold)


def _two_d_quant(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """2DQuant's released grid: lower + clamp(round((x - lower) / s), 0, 2^b - 1) * s."""
    step = (upper - lower) / grid.levels(bits)
    return lower + torch.clamp(torch.round((x - lower) / step), 0, grid.levels(bits)) * step


def test_init_shifts_realizes_the_two_d_quant_grid():
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    sites = find_shift_sites(model, x[:1])
    add_shifts(model, sites)
    with pytest.raises(ValueError, match="no bounds"):
        init_shifts(model)
    dobi(model, x)
    found = quantizers(model)
    before = {s.name: (found[s.exact].lower.detach().clone(), found[s.exact].upper.detach().clone()) for s in sites}
    others = {n: (q.lower.detach().clone(), q.upper.detach().clone()) for s in sites for n in s.shifted[1:]
              for q in [found[n]]}
    offsets = init_shifts(model)
    with torch.no_grad():  # the bounds are Parameters
        for site in sites:
            lower, upper = before[site.name]
            c = torch.tensor(offsets[site.name])
            quantizer = found[site.exact]
            step = (upper - lower) / grid.levels(quantizer.bits)
            assert float(c.abs()) <= 0.5 * float(step) * (1 + 1e-5)  # the integer zero point is in range here
            # a value between each pair of 2DQuant levels (away from rounding ties), and beyond the ends
            k = torch.arange(-2, grid.levels(quantizer.bits) + 2, dtype=torch.float32)
            probe = lower + (k + torch.rand(k.shape) * 0.8 - 0.4) * step
            shifted = c + quantizer(probe - c)
            error = (shifted - _two_d_quant(probe, lower, upper, quantizer.bits)).abs().max()
            assert float(error) <= GRID_TOL_STEPS * float(step), site.name
            for name in site.shifted[1:]:  # readers of the same tensor: bounds moved with it
                torch.testing.assert_close(found[name].lower, others[name][0] - c, rtol=0, atol=1e-6)
    again = init_shifts(model)  # idempotent
    assert all(abs(again[n] - offsets[n]) <= 1e-6 for n in offsets)


def test_calibrate_shifts_searches_on_the_shifted_grid():
    x = torch.rand(4, 3, 16, 16)
    models = {how: tiny_swinir() for how in ("init", "search")}
    sites = find_shift_sites(models["init"], x[:1])
    for how, model in models.items():
        add_shifts(model, sites)
        dobi(model, x)
    init_shifts(models["init"])
    calibrate_shifts(models["search"], batch_forward_loop(x, progress=False), candidates=20, bins=1024)
    for site in sites:
        tensors, errors = {}, {}
        for how, model in models.items():
            quantizer = quantizers(model)[site.exact]
            offset = next(p.offset for p in model.modules()
                          if isinstance(p, SubtractOffset) and p.site.name == site.name).detach()
            step, zero_point = (t.detach() for t in quantizer.step_and_zero_point())
            # the quantizer's own bounds are an integer-zero-point grid: offset carries the asymmetry
            assert float((quantizer.lower.detach() + zero_point * step).abs()) <= 1e-5 * float(step)
            captured = []
            quantizer.observer = lambda q, t: captured.append(t + offset)  # the unshifted tensor
            with torch.no_grad(), float_mode(model):
                model(x)
            quantizer.observer = None
            tensors[how] = torch.cat([t.flatten() for t in captured])
            with torch.no_grad():
                shifted = offset + _fake_quantize(quantizer, tensors[how] - offset)
                errors[how] = float((shifted - tensors[how]).square().sum())
        torch.testing.assert_close(tensors["init"], tensors["search"])
        # same candidates, scored on the grid that runs: never worse than DOBI's bounds made exact
        assert errors["search"] <= errors["init"] * 1.02 + 1e-9, site.name


def _fake_quantize(quantizer, t: torch.Tensor) -> torch.Tensor:
    return grid.fake_quantize(t, quantizer.lower, quantizer.upper, quantizer.bits, quantizer.symmetric)


def test_gradient_reaches_offsets():
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    add_shifts(model, find_shift_sites(model, x[:1]))
    dobi(model, x)
    init_shifts(model)
    model(x).square().mean().backward()
    grads = torch.stack([p.grad for p in shift_parameters(model)])
    assert torch.isfinite(grads).all() and (grads != 0).any()


def test_restore_and_bake_with_smoothing():
    x = torch.rand(2, 3, 16, 16)
    model = tiny_swinir()
    groups = find_smoothing_groups(model, x[:1])
    sites = find_shift_sites(model, x[:1])
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    add_shifts(model, sites)
    dobi(model, x)
    init_shifts(model)
    spec, state, bounds = transforms_spec(model), transforms_state(model), bounds_state(model)
    assert len(state) == len(groups) + len(sites) and len(smoothing_parameters(model)) == len(groups)

    fresh = tiny_swinir()
    with pytest.raises(ValueError, match="do not fit"):
        restore_transforms(fresh, spec, {k: v for k, v in list(state.items())[1:]})
    restore_transforms(fresh, spec, state)
    load_bounds(fresh, bounds)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(fresh(x), reference)
        with float_mode(fresh), pytest.raises(ValueError, match="disabled"):
            bake_transforms(fresh)  # the bias folds would bake raw weights
        bake_transforms(fresh)
        assert torch.equal(fresh(x), reference)  # baked == parametrized, bit for bit
    assert shift_parameters(fresh) == [] and transforms_state(fresh) == {}
    with pytest.raises(ValueError, match="already folded"):
        add_shifts(model, sites[:1])


def test_baked_model_exports_with_no_extra_op_and_runs_exactly_on_onnx_runtime(tmp_path):
    """ORT computes the baked model: its output, and the integer codes of every quantizer. The float graph of this
    tiny SwinIR clears the output's PSNR floor as well (measured 76.1 dB; one scale one step off: 94.5 dB), so the
    codes decide: their check fails the float engine of the same model and the export with one scale one step
    wider."""
    ort = pytest.importorskip("onnxruntime")
    from engines.ort_engine import build_ort_engine
    from export.onnx_export import ExportOptions, Provenance, to_onnx

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(weight_granularity="per-channel")
    model = tiny_swinir(config)
    plain_keys = set(model.state_dict())
    groups, sites = find_smoothing_groups(model, x[:1]), find_shift_sites(model, x[:1])
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    add_shifts(model, sites)
    dobi(model, x)
    init_shifts(model)
    bake_transforms(model)
    # the baked model is a plain quantized model: same modules, same tensors, no parametrization left
    assert set(model.state_dict()) == plain_keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    provenance = Provenance("0" * 64, "0" * 64, config.to_dict())
    proto, result = to_onnx(model, ExportOptions(tile=16), provenance)
    assert not result.violations
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        reference = model(x)
    assert output_difference(out, reference).psnr >= ORT_MIN_PSNR
    qdq = tmp_path / "baked.onnx"
    onnx.save(proto, str(qdq))
    assert_codes_agree(qdq, model, x)
    float_graph = float_export(model, tmp_path / "float.onnx", ExportOptions(tile=16), provenance)
    build_ort_engine(float_graph, tmp_path / "float.ort.onnx", threads=2)
    broken = perturbed_engine(qdq, model, x, tmp_path)
    assert_codes_fail_on_broken_engines(tmp_path / "float.ort.onnx", broken, model, x)


def test_two_attention_branches_on_one_qkv_get_distinct_key_shifts():
    """DAT's spatial attention splits one qkv linear into two branches: each branch's k is its own slice,
    so each gets its own shift site (distinct names, disjoint slices), and both fold exactly."""
    from calib.transforms.shift import ShiftSite, add_shifts, find_shift_sites

    from ...tiny_models import tiny_dat
    from toolchain.models import example_input

    model = quantize_model(tiny_dat(scale=2), QuantConfig(w_bits=4, a_bits=4))
    sites = [s for s in find_shift_sites(model, example_input(model), kinds=("attn_key",))]
    by_producer: dict[str, list] = {}
    for site in sites:
        by_producer.setdefault(site.producer, []).append(site)
    shared = [group for group in by_producer.values() if len(group) == 2]
    assert shared, [s.name for s in sites]
    first, second = shared[0]
    assert (first.index, second.index) == (0, 1) and first.name != second.name
    assert first.stop <= second.start
    assert ShiftSite.from_dict(second.to_dict()) == second
    assert len(add_shifts(model, sites)) == len(sites)   # every site folds, none refused as "already folded"
