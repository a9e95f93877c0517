"""Channel smoothing (calib/transforms/smoothing.py) folded into LayerNorm and linear weights: detection, exactness,
SmoothQuant, baking."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms.fold import bake_transforms
from calib.transforms.smoothing import (
    SmoothingGroup,
    add_smoothing,
    find_smoothing_groups,
    init_smoothquant,
    smoothing_groups,
    smoothing_parameters,
)
from toolchain.loading import load_state_dict_model
from toolchain.models import ngswin
from toolchain.quant import QuantConfig, float_mode, quantize_model
from toolchain.tolerances import FLOAT_FOLD_RTOL

from ...tiny_models import tiny_swinir as _tiny_swinir

NGSWIN = dict(scale=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4), dec_depth=2, dec_num_heads=2,
              window_size=4, ngrams=(2, 3, 2), mlp_ratio=1.5, in_chans=3)


def tiny_swinir(config: QuantConfig = QuantConfig()) -> nn.Module:
    """spandrel's tiny SwinIR x2 (embed 12, depths [2, 2], heads [2, 2], window 8), norms perturbed."""
    model = _tiny_swinir(scale=2, seed=0)
    _perturb_norms(model)
    return quantize_model(model, config)


def tiny_ngswin(config: QuantConfig = QuantConfig()) -> nn.Module:
    torch.manual_seed(0)
    model = load_state_dict_model(ngswin.NGswin(**NGSWIN).state_dict(), "tiny NGswin")
    _perturb_norms(model)
    return quantize_model(model, config)


def _perturb_norms(model: nn.Module) -> None:
    # fresh LayerNorms are (1, 0): give them trained-looking affine parameters, with outlier channels
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.weight[0] *= 8.0
                module.bias.copy_(torch.randn_like(module.bias) * 0.3)


def dobi(model: nn.Module, x: torch.Tensor) -> None:
    """Calibrated bounds, cheaply (few candidates, coarse histograms: the tests need bounds, not good ones)."""
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)


def _range(t: torch.Tensor) -> float:
    return float(t.amax() - t.amin())


def _randomize(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in smoothing_parameters(model):
            p.copy_(torch.rand(p.shape, generator=generator) * 2 - 1)


def test_swinir_groups_norm1_qkv_norm2_fc1_and_values_of_every_block():
    model = tiny_swinir()
    groups = find_smoothing_groups(model, torch.rand(1, 3, 16, 24))
    blocks = [f"layers.{i}.residual_group.blocks.{j}" for i in range(2) for j in range(2)]
    expected = []
    for b in blocks:  # in module order; qkv output channels are [q | k | v]
        expected += [SmoothingGroup("norm", f"{b}.norm1", 0, 12, (f"{b}.attn.qkv",)),
                     SmoothingGroup("value", f"{b}.attn.qkv", 24, 36, (f"{b}.attn.proj",)),
                     SmoothingGroup("norm", f"{b}.norm2", 0, 12, (f"{b}.mlp.fc1",))]
    assert groups == expected
    assert find_smoothing_groups(model, torch.rand(1, 3, 16, 24), kinds=("norm",)) == \
        [g for g in expected if g.kind == "norm"]


def test_ngswin_blocks_have_value_groups_only():
    # NGswin adds norm1(attention) and norm2(MLP) to the residual stream: qkv and fc1 read the stream, so its
    # blocks give value groups only; the one norm fold is patch merging's LayerNorm -> reduction (a quantized
    # linear since generic placement, which finds it on the data path)
    model = tiny_ngswin()
    groups = find_smoothing_groups(model, torch.rand(1, 3, 32, 32))
    attentions = [p for p, m in model.named_modules() if type(m).__name__ == "CosineWindowAttention"]
    assert len(attentions) == 10  # 5 blocks x (window attention + N-gram context attention)
    inner = {a: model.get_submodule(f"{a}.proj").in_features for a in attentions}
    assert [g for g in groups if g.kind == "value"] == [
        SmoothingGroup("value", f"{a}.qkv", 2 * inner[a], 3 * inner[a], (f"{a}.proj",)) for a in attentions]
    mergings = [p for p, m in model.named_modules() if type(m).__name__ == "PatchMerging"]
    assert mergings == ["encoder_layer1.downsample"]  # depths (2, 1): one merge between the two encoder stages
    assert [g for g in groups if g.kind != "value"] == [
        SmoothingGroup("norm", f"{p}.norm", 0, 64, (f"{p}.reduction",)) for p in mergings]  # 4 x embed 16


def test_float_model_is_unchanged_by_smoothing():
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), float_mode(model):
        reference = model(x)
        add_smoothing(model, find_smoothing_groups(model, torch.rand(1, 3, 16, 16)))
        _randomize(model)
        smoothed = model(x)
    assert float((smoothed - reference).abs().max()) <= FLOAT_FOLD_RTOL * _range(reference)
    assert not torch.equal(smoothed, reference)  # the factors did act (rounding differs)


def test_fold_values_and_shared_factors():
    model = tiny_swinir()
    groups = find_smoothing_groups(model, torch.rand(1, 3, 16, 16))
    block = model.layers[0].residual_group.blocks[0]
    gamma, beta = block.norm1.weight.detach().clone(), block.norm1.bias.detach().clone()
    qkv, qkv_bias, proj = (block.attn.qkv.weight.detach().clone(), block.attn.qkv.bias.detach().clone(),
                           block.attn.proj.weight.detach().clone())
    add_smoothing(model, groups)
    _randomize(model)
    params = smoothing_parameters(model)
    assert len(params) == len(groups) == 12 and all(p.is_leaf and p.shape == (12,) for p in params)
    s, v = torch.exp(params[0].detach()), torch.exp(params[1].detach())  # blocks.0: norm1, qkv (values)
    assert torch.equal(block.norm1.weight, gamma / s) and torch.equal(block.norm1.bias, beta / s)
    # what the weight quantizers see: qkv columns times s, its v rows divided by v, proj columns times v
    assert torch.equal(block.attn.qkv.weight[:24], (qkv * s)[:24])
    assert torch.equal(block.attn.qkv.weight[24:], (qkv * s)[24:] / v[:, None])
    assert torch.equal(block.attn.qkv.bias, torch.cat([qkv_bias[:24], qkv_bias[24:] / v]))
    assert torch.equal(block.attn.proj.weight, proj * v)
    # one state-dict entry per factor, none for the consumers' references
    keys = [k for k in model.state_dict() if k.endswith("log_scale")]
    assert len(keys) == len(groups)
    assert smoothing_groups(model) == groups
    with pytest.raises(ValueError, match="already smoothed"):
        add_smoothing(model, groups[:1])
    with pytest.raises(ValueError, match="without folds"):
        find_smoothing_groups(model, torch.rand(1, 3, 16, 16))


def test_gradient_reaches_factors_through_the_fold_only_when_quantized():
    model = tiny_swinir()
    x = torch.rand(2, 3, 16, 16)
    add_smoothing(model, find_smoothing_groups(model, x[:1]))
    _randomize(model)
    dobi(model, x)
    params = smoothing_parameters(model)
    model(x).square().mean().backward()
    quantized_grad = torch.cat([p.grad.flatten() for p in params])
    assert torch.isfinite(quantized_grad).all() and quantized_grad.abs().max() > 0
    for p in params:
        p.grad = None
    with float_mode(model):
        model(x).square().mean().backward()
    float_grad = torch.cat([p.grad.flatten() for p in params])
    # the float output does not depend on the factors: its gradient is rounding noise
    assert float_grad.abs().max() < 1e-3 * quantized_grad.abs().max()


def test_smoothquant_rule():
    model = tiny_swinir()
    calib = torch.rand(3, 3, 16, 16)
    groups = find_smoothing_groups(model, calib[:1])
    amax = {}

    def record(module, args, key):
        x = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
        amax[key] = torch.maximum(amax.get(key, torch.zeros_like(x)), x)

    hooks = [model.get_submodule(g.linears[0]).register_forward_pre_hook(
        lambda m, a, key=g.producer: record(m, a, key)) for g in groups]
    with torch.no_grad(), float_mode(model):
        model(calib)
    for hook in hooks:
        hook.remove()
    columns = {g.producer: model.get_submodule(g.linears[0]).weight.detach().abs().amax(0) for g in groups}
    add_smoothing(model, groups)
    _randomize(model)  # the rule must not depend on factors already set
    factors = init_smoothquant(model, batch_forward_loop(calib, batch_size=2, progress=False), alpha=0.7)
    for group, param in zip(groups, smoothing_parameters(model)):
        expected = amax[group.producer].pow(0.7) / columns[group.producer].pow(0.3)
        torch.testing.assert_close(factors[group.producer], expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.exp(param.detach()), expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="alpha"):
        init_smoothquant(model, batch_forward_loop(calib, progress=False), alpha=1.5)
    with pytest.raises(ValueError, match="no smoothing folds"):
        init_smoothquant(tiny_swinir(), batch_forward_loop(calib, progress=False))


def _smooth_calibrate_bake(model: nn.Module, x: torch.Tensor, kinds: tuple[str, ...]) -> None:
    """Smoothing of ``kinds``, SmoothQuant, DOBI, then bake: the baked outputs equal the parametrized ones."""
    add_smoothing(model, find_smoothing_groups(model, x[:1], kinds=kinds))
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    dobi(model, x)
    with torch.no_grad():
        before = model(x)
        bake_transforms(model)
        assert torch.equal(before, model(x))
    assert smoothing_parameters(model) == []


def test_baked_model_equals_parametrized_model_bit_for_bit():
    model = tiny_swinir(QuantConfig(weight_granularity="per-channel"))
    _smooth_calibrate_bake(model, torch.rand(2, 3, 16, 16), ("norm", "value"))
    assert not any("log_scale" in k for k in model.state_dict())
    assert set(model.state_dict()) >= {"layers.0.residual_group.blocks.0.norm1.weight",
                                       "layers.0.residual_group.blocks.0.attn.qkv.weight"}


def test_input_groups_cover_exactly_the_linears_no_fold_reaches():
    model = tiny_ngswin()
    x = torch.rand(1, 3, 32, 32)
    folded = find_smoothing_groups(model, x)
    both = find_smoothing_groups(model, x, kinds=("value", "input"))
    inputs = [g for g in both if g.kind == "input"]
    assert [g for g in both if g.kind == "value"] == [g for g in folded if g.kind == "value"]
    assert any(g.kind == "norm" for g in folded)  # patch merging: a linear a norm fold reaches, not an input group
    covered = {p for g in folded for p in g.linears}
    quantized = {p for p, m in model.named_modules()
                 if type(m).__name__ == "QuantLinear" and m.input_quantizer is not None}
    assert {g.producer for g in inputs} == quantized - covered and covered <= quantized
    assert all(g.linears == (g.producer,) for g in inputs)
    # the value group of a qkv and the input group of the same qkv have distinct keys
    assert len({g.key for g in both}) == len(both)


def test_input_smoothing_is_exact_in_float_and_moves_range_to_the_weight():
    model = tiny_ngswin()
    x = torch.rand(2, 3, 32, 32)
    groups = find_smoothing_groups(model, x[:1], kinds=("value", "input"))
    with torch.no_grad(), float_mode(model):
        reference = model(x)
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False), alpha=0.5)
    with torch.no_grad(), float_mode(model):
        smoothed = model(x)
    assert float((smoothed - reference).abs().max()) <= FLOAT_FOLD_RTOL * _range(reference)
    linear = model.get_submodule(next(g.producer for g in groups if g.kind == "input"))
    assert linear.input_multiplier is not None and not torch.allclose(linear.input_multiplier,
                                                                       torch.ones_like(linear.input_multiplier))


def test_input_smoothing_bakes_into_a_multiplier_buffer_bit_for_bit():
    model = tiny_ngswin(QuantConfig(weight_granularity="per-channel"))
    _smooth_calibrate_bake(model, torch.rand(2, 3, 32, 32), ("value", "input"))
    multipliers = [k for k in model.state_dict() if k.endswith("input_multiplier")]
    assert multipliers and all(not k.startswith("parametrizations") for k in multipliers)


def test_two_attentions_reading_one_v_share_one_group():
    """ATD's window and category attentions read the same v slice of one qkv linear: one value group per block,
    both attentions' output linears compensating, and the fold exact (it survives the random-factor check)."""
    from ...tiny_models import tiny_atd

    model = quantize_model(tiny_atd(), QuantConfig())
    groups = [g for g in find_smoothing_groups(model, torch.rand(1, 3, 32, 32)) if g.kind == "value"]
    assert [g.producer for g in groups] == [f"layers.0.residual_group.layers.{i}.wqkv" for i in (0, 1)]
    for group in groups:
        assert sorted(path.rsplit(".", 2)[-2] for path in group.linears) == ["attn_aca", "attn_win"]
