"""SwinIR: agreement with the official architecture (golden outputs), official checkpoint names,
shape handling and the module layout quantizers rely on."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from toolchain.models import swinir
from toolchain.models.common import MatMul
from toolchain.models.swinir import SwinIR

# Golden files: outputs of the official SwinIR code (../shared/reference/README: "agrees to 1e-5").
GOLDEN_ATOL = 1e-5
GOLDEN_FILES = ("swinir_tiny_x4.safetensors", "swinir_tiny_x2_oddsize.safetensors")


def tiny(scale: int = 2, **changes) -> SwinIR:
    torch.manual_seed(0)
    config = dict(scale=scale, embed_dim=12, depths=[2, 2], num_heads=[2, 2]) | changes
    return SwinIR(**config).eval()


def read_golden(path):
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
    return params, tensors["input"], tensors["output"], metadata


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_output_of_official_code(shared_dir, name):
    params, lr, expected, meta = read_golden(shared_dir / "reference" / "golden" / name)
    model = SwinIR(
        scale=int(meta["upscale"]), in_chans=int(meta["in_chans"]), embed_dim=int(meta["embed_dim"]),
        depths=json.loads(meta["depths"]), num_heads=json.loads(meta["num_heads"]),
        window_size=int(meta["window_size"]), mlp_ratio=float(meta["mlp_ratio"]),
        upsampler=meta["upsampler"], resi_connection=meta["resi_connection"],
        img_range=float(meta["img_range"]),
    ).eval()
    assert swinir.matches(params)
    assert swinir.config_from_state_dict(params) == model.config
    model.load_state_dict(params, strict=True)
    with torch.no_grad():
        out = model(lr)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= GOLDEN_ATOL


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_lightweight_names_and_shapes_equal_official_checkpoint(shared_dir, scale):
    reference = json.loads((shared_dir / "reference" / "swinir_light_state_dict.json").read_text())
    official = {
        name: entry["shape"] for name, entry in reference[f"x{scale}"].items()
        if name.rsplit(".", 1)[-1] not in swinir.STORED_BUFFERS
    }
    ours = {name: list(t.shape) for name, t in SwinIR.lightweight(scale).state_dict().items()}
    assert len(reference[f"x{scale}"]) == 366
    assert ours == official


def test_state_dict_holds_only_learnable_tensors():
    model = tiny()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    assert any(name.endswith("relative_position_index") for name, _ in model.named_buffers())


def test_classical_x2_builds_and_runs():
    model = SwinIR.classical(2).eval()
    assert model.config["embed_dim"] == 180 and model.config["depths"] == [6] * 6
    assert model.state_dict()["conv_before_upsample.0.weight"].shape == (64, 180, 3, 3)
    assert model.state_dict()["upsample.0.weight"].shape == (256, 64, 3, 3)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 12, 10))
    assert out.shape == (1, 3, 24, 20)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "config",
    [
        dict(scale=2),
        dict(scale=3),
        dict(scale=4, resi_connection="3conv"),
        dict(scale=3, upsampler="pixelshuffle", num_feat=16),
        dict(scale=8, upsampler="pixelshuffle", num_feat=16),
        dict(scale=4, upsampler="pixelshuffle", num_feat=16, resi_connection="3conv", qkv_bias=False),
        dict(scale=2, depths=[2, 3, 1], num_heads=[2, 4, 1], window_size=4, mlp_ratio=4),
    ],
)
def test_config_inferred_from_state_dict(config):
    model = tiny(**config)
    state_dict = model.state_dict()
    assert swinir.matches(state_dict)
    assert swinir.config_from_state_dict(state_dict) == model.config
    assert json.loads(json.dumps(model.config)) == model.config
    rebuilt = swinir.build(**model.config)
    rebuilt.load_state_dict(state_dict, strict=True)


@pytest.mark.parametrize("scale, size", [(2, (9, 13)), (3, (8, 8)), (4, (17, 31)), (2, (5, 40))])
def test_any_input_size_gives_scaled_output(scale, size):
    model = tiny(scale)
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, scale * size[0], scale * size[1])


def test_batch_items_are_independent():
    model = tiny(3)
    images = torch.rand(3, 3, 16, 24)
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_input_too_small_to_reflect_is_refused():
    with pytest.raises(ValueError, match="too small to reflect-pad"):
        tiny()(torch.rand(1, 3, 3, 16))
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        tiny()(torch.rand(1, 1, 16, 16))


def test_shifted_window_mask_separates_regions_only_at_the_seams():
    mask = swinir.shifted_window_mask(16, 24, window=8, shift=4)  # 2 x 3 windows
    assert mask.shape == (6, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, swinir.MASK_VALUE}
    assert torch.equal(mask, mask.transpose(1, 2))
    assert not mask[[0, 1]].any()  # windows away from the bottom and right seams
    # Bottom-right window: four regions of 4x4 tokens; each token may attend to 16 tokens.
    allowed = (mask[5] == 0).sum(dim=1)
    assert allowed.tolist() == [16] * 64


def test_relative_position_index_covers_the_table_symmetrically():
    index = swinir.relative_position_index(8)
    assert index.shape == (64, 64) and index.dtype == torch.int64
    assert index.min() == 0 and index.max() == 224 and index.unique().numel() == 225
    assert (index.diagonal() == 112).all()  # zero offset is the table's centre row
    assert torch.equal(index + index.T, torch.full_like(index, 224))


def test_quantizable_modules_are_found_by_type():
    model = tiny()
    attentions = [m for m in model.modules() if isinstance(m, swinir.WindowAttention)]
    assert len(attentions) == 4
    for attention in attentions:
        assert isinstance(attention.matmul_qk, MatMul) and isinstance(attention.matmul_pv, MatMul)
        assert isinstance(attention.softmax, nn.Softmax)
        assert isinstance(attention.qkv, nn.Linear) and isinstance(attention.proj, nn.Linear)
    mlps = [m for m in model.modules() if isinstance(m, swinir.Mlp)]
    assert all(isinstance(m.act, nn.GELU) and isinstance(m.fc1, nn.Linear) for m in mlps)
    assert sum(isinstance(m, MatMul) for m in model.modules()) == 8


def test_matmul_operands_are_scaled_queries_and_probabilities():
    model = tiny()
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args
        return hook

    attention = model.layers[0].residual_group.blocks[1].attn
    attention.matmul_qk.register_forward_hook(record("qk"))
    attention.matmul_pv.register_forward_hook(record("pv"))
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    q, k_t = seen["qk"]
    probabilities, v = seen["pv"]
    assert q.shape == (8, 2, 64, 6) and k_t.shape == (8, 2, 6, 64) and v.shape == (8, 2, 64, 6)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(8, 2, 64))


def test_residual_groups_are_the_rstb_layers():
    model = SwinIR.lightweight(2)
    groups = model.residual_groups()
    assert len(groups) == 4 and all(isinstance(g, swinir.RSTB) for g in groups)
    assert model.scale == 2 and model.input_multiple == 8 and model.arch == "swinir"


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match="upsampler must be one of"):
        SwinIR(scale=2, upsampler="nearest+conv")
    with pytest.raises(ValueError, match="resi_connection"):
        SwinIR(scale=2, resi_connection="2conv")
    with pytest.raises(ValueError, match="2\\^n and 3"):
        SwinIR(scale=5, upsampler="pixelshuffle")
    with pytest.raises(ValueError, match="differ in length"):
        SwinIR(scale=2, depths=[2, 2], num_heads=[2])
