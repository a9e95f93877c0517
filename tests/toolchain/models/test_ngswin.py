"""NGswin: spandrel detection and strict loading of the official checkpoints, agreement with the
official code's outputs, and the attention products placement finds in it.

Golden files: ``../shared/reference/golden/ngswin_x{2,3}_set5_baby_crops.safetensors``, made with the
authors' code (rami0205/NGramSwin) and their pretrained weights on two crops of Set5 ``baby`` LR.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from toolchain import load_model, read_state_dict
from toolchain.loading import load_state_dict_model
from toolchain.models import info_of, ngswin, registry
from toolchain.models.ngswin_blocks import CosineWindowAttention
from toolchain.quant import QuantConfig, quantize_model, quantizers
from toolchain.tolerances import NGSWIN_GOLDEN_ATOL

SCALES = (2, 3)
TINY = dict(scale=2, embed_dim=16, depths=[2, 1], num_heads=[2, 4], dec_depth=2, dec_num_heads=2,
            window_size=4, ngrams=[2, 3, 2], mlp_ratio=1.5, in_chans=3)


def checkpoint(shared_dir, scale: int):
    return shared_dir / "models" / "NGswin" / f"NGswin_x{scale}.pth"


@pytest.fixture(scope="module", params=SCALES, ids=lambda s: f"x{s}")
def official(request, shared_dir):
    """(scale, checkpoint state dict, model from toolchain.load_model)."""
    scale = request.param
    path = checkpoint(shared_dir, scale)
    return scale, read_state_dict(path), load_model(path)


def test_state_dict_equals_checkpoint(official):
    scale, state_dict, model = official
    assert type(model) is ngswin.NGswin and not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k].float()) for k in state_dict)
    info = info_of(model)
    assert (info.arch, info.scale, info.multiple_of, info.input_channels) == ("NGswin", scale, 32, 3)
    # the N-gram context of stage 3 (1/4 size) needs 2 windows of 8 per side: 64 LR pixels
    assert info.minimum == model.min_padded_size == 64
    assert info.hyperparameters["depths"] == [6, 4, 4] and info.hyperparameters["ngrams"] == [2, 2, 2, 2]
    assert info.hyperparameters["embed_dim"] == 64 and info.hyperparameters["window_size"] == 8


@pytest.mark.parametrize("crop", ["", "_odd"])
def test_matches_official_outputs(official, shared_dir, crop):
    scale, _, model = official
    golden = load_file(shared_dir / "reference" / "golden" / f"ngswin_x{scale}_set5_baby_crops.safetensors")
    lr, expected = golden[f"input{crop}"], golden[f"output{crop}"]
    with torch.no_grad():
        sr = model(lr)
    assert sr.shape == (1, 3, scale * lr.shape[2], scale * lr.shape[3]) == expected.shape
    assert (sr - expected).abs().max().item() <= NGSWIN_GOLDEN_ATOL


def test_stages_work_at_their_resolutions(official):
    """The three encoder stages at 1, 1/2, 1/4 of the input, the decoder back at full size."""
    _, _, model = official
    stages = [f"encoder_layer{i}" for i in (1, 2, 3)] + ["decoder_layer1"]
    shapes = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, out: shapes.append(tuple(out[0].shape)))
             for name in stages]
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 96))
    for hook in hooks:
        hook.remove()
    assert shapes == [(1, 64, 96, 64), (1, 32, 48, 64), (1, 16, 24, 64), (1, 64, 96, 64)]


def test_attention_products_are_found_on_unit_vectors(shared_dir):
    """Every cosine attention (window and N-gram) multiplies unit q by unit k^T, then probabilities by v,
    with plain ``@``: placement finds both products of each, and their operands are what the model computes.
    (The structure does not depend on the scale: x2 only.)"""
    model = load_model(checkpoint(shared_dir, 2))
    attentions = [path for path, m in model.named_modules() if isinstance(m, CosineWindowAttention)]
    assert len(attentions) == 2 * 20  # main + N-gram attention in each of the 20 blocks
    assert not any(hasattr(m, "residual_groups") or type(m).__name__ == "MatMul" for m in model.modules())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(copy.deepcopy(model), QuantConfig(quantize=("matmul",)), example=x)
    found = quantizers(quantized)
    roles = {"matmul.0.a": "attn_q", "matmul.0.b": "attn_k", "matmul.1.a": "attn_probs", "matmul.1.b": "attn_v"}
    assert list(found) == [f"{attn}.{suffix}" for attn in attentions for suffix in roles]
    assert all(q.role == roles["matmul." + name.rsplit(".matmul.", 1)[1]] for name, q in found.items())

    seen: dict[str, torch.Tensor] = {}
    for quantizer in found.values():
        quantizer.observer = lambda q, t: seen.setdefault(q.name, t.detach().clone())  # the first call
    with torch.no_grad():
        assert torch.equal(quantized(x), model(x))  # observers return their input untouched
    block = "encoder_layer2.blocks.1"  # a shifted block
    for attn in (f"{block}.attn", f"{block}.ngram_window_partition.ngram_context.ngram_attn"):
        q_unit, k_unit_t = seen[f"{attn}.matmul.0.a"], seen[f"{attn}.matmul.0.b"]
        torch.testing.assert_close(q_unit.norm(dim=-1), torch.ones(q_unit.shape[:-1]))
        k_norms = k_unit_t.norm(dim=-2)  # k is transposed: its channels are the second-last axis
        torch.testing.assert_close(k_norms, torch.ones(k_norms.shape))
    probs, values = seen[f"{block}.attn.matmul.1.a"], seen[f"{block}.attn.matmul.1.b"]
    assert probs.shape[-2:] == (64, 64) and values.shape[-2:] == (64, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_detected_as_ngswin_only(official, shared_dir):
    _, state_dict, _ = official
    assert ngswin.matches(state_dict)
    detected = [str(s.architecture.id) for s in registry().architectures("detection") if s.detect(state_dict)]
    assert detected == ["NGswin"]
    swinir_keys = json.loads((shared_dir / "reference" / "swinir_light_state_dict.json").read_text())["x2"]
    swinir_like = {name: torch.empty(entry["shape"], device="meta") for name, entry in swinir_keys.items()}
    assert not ngswin.matches(swinir_like)
    assert "NGswin" not in [str(s.architecture.id) for s in registry().architectures("detection")
                            if s.detect(swinir_like)]
    with pytest.raises(ValueError, match="not an NGswin checkpoint"):
        ngswin.config_from_state_dict(swinir_like)


def test_tiny_config_round_trip_and_shapes():
    torch.manual_seed(0)
    net = ngswin.NGswin(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()})
    state_dict = net.state_dict()
    assert not any(key.endswith(("relative_position_index", "mean", "std")) for key in state_dict)
    assert ngswin.config_from_state_dict(state_dict) == TINY == net.hyperparameters
    model = load_state_dict_model(state_dict, "tiny NGswin")
    info = info_of(model)
    # Two stages of 4x4 windows: a multiple of 8; stage 1 works at half size with 3-grams: at least 24.
    assert (info.arch, info.scale, info.multiple_of, info.minimum) == ("NGswin", 2, 8, 24)
    assert info.hyperparameters == TINY
    with torch.no_grad():
        x = torch.rand(2, 3, 19, 27)
        sr = model(x)
        assert sr.shape == (2, 3, 38, 54) and torch.equal(sr, net.eval()(x))
        with pytest.raises(ValueError, match="too small"):
            model(torch.rand(1, 3, 16, 40))
