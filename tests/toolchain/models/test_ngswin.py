"""NGswin: strict loading of the official checkpoints and agreement with the official code's outputs.

Golden files: ``../shared/reference/golden/ngswin_x{2,3}_set5_baby_crops.safetensors``, made with the
authors' code (rami0205/NGramSwin) and their pretrained weights on two crops of Set5 ``baby`` LR.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from toolchain import load_model
from toolchain.models import architectures, ngswin
from toolchain.models.common import MatMul
from toolchain.models.ngswin_blocks import CosineWindowAttention

GOLDEN_MAX_ABS = 1e-4  # float32 outputs in [0, 1]
SCALES = (2, 3)
TINY = dict(scale=2, embed_dim=16, depths=[2, 1], num_heads=[2, 4], dec_depth=2, dec_num_heads=2,
            window_size=4, ngrams=[2, 3, 2], mlp_ratio=1.5, in_chans=3)


def checkpoint(shared_dir, scale: int):
    return shared_dir / "models" / "NGswin" / f"NGswin_x{scale}.pth"


@pytest.fixture(scope="module", params=SCALES, ids=lambda s: f"x{s}")
def official(request, shared_dir):
    """(scale, checkpoint state dict, model built from it with the weights loaded strictly)."""
    scale = request.param
    state_dict = torch.load(checkpoint(shared_dir, scale), map_location="cpu", weights_only=True)
    model = ngswin.build(**ngswin.config_from_state_dict(state_dict))
    model.load_state_dict(state_dict, strict=True)
    return scale, state_dict, model


def test_state_dict_equals_checkpoint(official):
    scale, state_dict, model = official
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in state_dict.items()}
    assert ours == theirs
    assert model.scale == scale and model.arch == "ngswin" and model.input_multiple == 32
    assert model.config["depths"] == [6, 4, 4] and model.config["ngrams"] == [2, 2, 2, 2]


@pytest.mark.parametrize("crop", ["", "_odd"])
def test_matches_official_outputs(official, shared_dir, crop):
    scale, _, model = official
    golden = load_file(shared_dir / "reference" / "golden" / f"ngswin_x{scale}_set5_baby_crops.safetensors")
    lr, expected = golden[f"input{crop}"], golden[f"output{crop}"]
    with torch.no_grad():
        sr = model(lr)
    assert sr.shape == (1, 3, scale * lr.shape[2], scale * lr.shape[3]) == expected.shape
    assert (sr - expected).abs().max().item() <= GOLDEN_MAX_ABS


def test_residual_groups_are_the_stage_outputs(official):
    _, _, model = official
    shapes = []
    hooks = [group.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
             for group in model.residual_groups()]
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 96))
    for hook in hooks:
        hook.remove()
    assert shapes == [(1, 64, 96, 64), (1, 32, 48, 64), (1, 16, 24, 64), (1, 64, 96, 64)]


def test_attention_products_are_modules_on_unit_vectors(official):
    """Every cosine attention (window and N-gram) multiplies unit q by unit k^T, then probabilities by v."""
    _, _, model = official
    attentions = [m for m in model.modules() if isinstance(m, CosineWindowAttention)]
    assert len(attentions) == 2 * 20  # main + N-gram attention in each of the 20 blocks
    assert sum(isinstance(m, MatMul) for m in model.modules()) == 2 * len(attentions)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs)  # the first call; returning None keeps the output
        return hook

    block = model.encoder_layer2.blocks[1]  # a shifted block
    hooks = [attn.matmul_qk.register_forward_hook(record(name + ".qk")) for name, attn in
             (("window", block.attn), ("ngram", block.ngram_window_partition.ngram_context.ngram_attn))]
    hooks.append(block.attn.matmul_pv.register_forward_hook(record("window.pv")))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    for name in ("window.qk", "ngram.qk"):
        q_unit, k_unit_t = seen[name]
        torch.testing.assert_close(q_unit.norm(dim=-1), torch.ones(q_unit.shape[:-1]))
        k_norms = k_unit_t.norm(dim=-2)  # k is transposed: its channels are the second-last axis
        torch.testing.assert_close(k_norms, torch.ones(k_norms.shape))
    probs, values = seen["window.pv"]
    assert probs.shape[-2:] == (64, 64) and values.shape[-2:] == (64, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_matches_only_ngswin(official, shared_dir):
    _, state_dict, _ = official
    assert ngswin.matches(state_dict)
    swinir_keys = json.loads((shared_dir / "reference" / "swinir_light_state_dict.json").read_text())["x2"]
    swinir_like = {name: torch.empty(entry["shape"], device="meta") for name, entry in swinir_keys.items()}
    assert not ngswin.matches(swinir_like)
    with pytest.raises(ValueError, match="not an NGswin checkpoint"):
        ngswin.config_from_state_dict(swinir_like)
    assert [m.ARCH for m in architectures() if m.matches(state_dict)] == ["ngswin"]


@pytest.mark.parametrize("scale", SCALES)
def test_load_model(shared_dir, scale):
    model = load_model(checkpoint(shared_dir, scale))
    assert (model.arch, model.scale, model.training) == ("ngswin", scale, False)


def test_tiny_config_round_trip_and_shapes():
    torch.manual_seed(0)
    model = ngswin.build(**TINY)
    state_dict = model.state_dict()
    assert not any(key.endswith(("relative_position_index", "mean", "std")) for key in state_dict)
    assert ngswin.config_from_state_dict(state_dict) == TINY == model.config
    # Stage 1 works at half size with 3-grams of 4x4 windows: at least 24 pixels, padded to 24 here.
    assert model.min_padded_size == 24
    with torch.no_grad():
        sr = model(torch.rand(2, 3, 19, 27))
        assert sr.shape == (2, 3, 38, 54)
        with pytest.raises(ValueError, match="too small"):
            model(torch.rand(1, 3, 16, 40))
