"""Checkpoint loading: formats, inferred configuration, dropped buffers, and refusals."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from toolchain import CheckpointError, load_model, read_state_dict
from toolchain.loading import compact_names
from toolchain.models.swinir import SwinIR

TINY = dict(scale=2, embed_dim=12, depths=[2, 2], num_heads=[2, 2])


class WritesMarker:
    """Pickles to a call of ``open(marker, "w")``: constructing it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_model() -> SwinIR:
    torch.manual_seed(0)
    model = SwinIR(**TINY).eval()
    with torch.no_grad():  # non-trivial norms, so a norm loaded wrong would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def lr_image() -> torch.Tensor:
    return torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(1))


def output(model, image):
    with torch.no_grad():
        return model(image)


def save_pth(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["params", "params_ema", "bare", "safetensors"])
def test_round_trip(tmp_path, tiny_model, lr_image, layout):
    state_dict = tiny_model.state_dict()
    if layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(state_dict, path)
    else:
        path = save_pth(tmp_path / "model.pth", state_dict if layout == "bare" else {layout: state_dict})
    model = load_model(path)
    assert isinstance(model, SwinIR) and not model.training
    assert model.config == tiny_model.config
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(output(model, lr_image), output(tiny_model, lr_image))


def test_params_ema_is_preferred(tmp_path, tiny_model, lr_image):
    other = SwinIR(**TINY).state_dict()
    path = save_pth(tmp_path / "both.pth", {"params": other, "params_ema": tiny_model.state_dict()})
    assert torch.equal(output(load_model(path), lr_image), output(tiny_model, lr_image))


def test_half_precision_checkpoint_loads_as_float32(tmp_path, tiny_model):
    path = save_pth(tmp_path / "half.pth", {k: v.half() for k, v in tiny_model.state_dict().items()})
    model = load_model(path, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_stored_buffers_are_dropped_and_recomputed(tmp_path, tiny_model, lr_image):
    """Official files carry attn_mask / relative_position_index; garbage there changes nothing."""
    state_dict = dict(tiny_model.state_dict())
    for layer in range(2):
        for block in range(2):
            prefix = f"layers.{layer}.residual_group.blocks.{block}."
            state_dict[prefix + "attn.relative_position_index"] = torch.randint(0, 225, (64, 64))
            if block == 1:
                state_dict[prefix + "attn_mask"] = torch.randn(64, 64, 64) * 100
    path = save_pth(tmp_path / "with_buffers.pth", {"params": state_dict})
    model = load_model(path)
    assert torch.equal(output(model, lr_image), output(tiny_model, lr_image))
    assert torch.equal(
        model.layers[0].residual_group.blocks[0].attn.relative_position_index,
        tiny_model.layers[0].residual_group.blocks[0].attn.relative_position_index,
    )


def test_overrides_win_over_inferred_config(tmp_path, tiny_model):
    path = save_pth(tmp_path / "model.pth", tiny_model.state_dict())
    assert load_model(path, img_range=255.0).config["img_range"] == 255.0
    with pytest.raises(CheckpointError, match=r"upsample\.0\.weight") as caught:
        load_model(path, scale=3)
    assert "checkpoint [12, 12, 3, 3]" in str(caught.value)
    with pytest.raises(CheckpointError, match=r"relative_position_bias_table \(4\)"):
        load_model(path, window_size=4)
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['upscale'\]"):
        load_model(path, upscale=2)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(tmp_path, tiny_model):
    state_dict = dict(tiny_model.state_dict())
    for layer in range(2):
        del state_dict[f"layers.{layer}.residual_group.blocks.1.mlp.fc2.bias"]
    del state_dict["conv_after_body.bias"]
    state_dict["extra.weight"] = torch.zeros(3)
    state_dict["norm.weight"] = torch.zeros(13)
    path = save_pth(tmp_path / "damaged.pth", state_dict)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message
    assert "missing 3: " in message and "layers.{0-1}.residual_group.blocks.1.mlp.fc2.bias (2)" in message
    assert "conv_after_body.bias" in message
    assert "unexpected 1: extra.weight" in message
    assert "checkpoint [13] torch.float32, model [12]" in message and "norm.weight" in message


def test_integer_tensor_in_place_of_a_weight_is_refused(tmp_path, tiny_model):
    state_dict = dict(tiny_model.state_dict())
    state_dict["norm.bias"] = torch.zeros(12, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"torch\.int64.*norm\.bias"):
        load_model(save_pth(tmp_path / "int.pth", state_dict))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_model):
    marker = tmp_path / "marker"
    nested = save_pth(tmp_path / "nested.pth", {"params": {"conv_first.weight": WritesMarker(marker)}})
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"weight": WritesMarker(marker)}, protocol=2))
    for path in (nested, legacy):
        with pytest.raises(CheckpointError, match="not a plain tensor checkpoint") as caught:
            load_model(path)
        assert str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("truncated", "not a readable PyTorch checkpoint"),
        ("empty", "the file is empty"),
        ("text", "not a readable PyTorch checkpoint"),
        ("list", "holds a list, not a dict of tensors"),
        ("non_tensor_values", r"these entries are not: epoch, name"),
        ("nested_non_dict", r"\['params'\]: holds a Tensor"),
        ("no_tensors", "holds no tensors"),
        ("absent", "no such checkpoint file"),
        ("safetensors_text", "not a readable safetensors file"),
        ("safetensors_truncated", "not a readable safetensors file"),
    ],
)
def test_unreadable_files_name_the_path(tmp_path, tiny_model, kind, pattern):
    state_dict = tiny_model.state_dict()
    path = tmp_path / ("model.safetensors" if kind.startswith("safetensors") else "model.pth")
    if kind == "truncated":
        torch.save(state_dict, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.touch()
    elif kind in ("text", "safetensors_text"):
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "list":
        torch.save(list(state_dict.values()), path)
    elif kind == "non_tensor_values":
        torch.save({"conv_first.weight": torch.zeros(1), "epoch": 3, "name": "x"}, path)
    elif kind == "nested_non_dict":
        torch.save({"params": torch.zeros(3)}, path)
    elif kind == "no_tensors":
        torch.save({}, path)
    elif kind == "safetensors_truncated":
        save_file(state_dict, path)
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=pattern) as caught:
        read_state_dict(path)
    assert str(path) in str(caught.value)


def test_unknown_architecture_is_refused(tmp_path):
    path = save_pth(tmp_path / "other.pth", {"body.0.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(CheckpointError, match=r"body\.0\.weight, \.\.\.\) match no known architecture \(swinir"):
        load_model(path)


def test_swinir_names_without_an_upsampler_are_refused(tmp_path, tiny_model):
    state_dict = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("upsample")}
    with pytest.raises(CheckpointError, match="looks like swinir but cannot be configured: no upsampler"):
        load_model(save_pth(tmp_path / "headless.pth", state_dict))


def test_compact_names_groups_numbered_names():
    names = [f"layers.{i}.blocks.{j}.attn.qkv.weight" for i in (0, 1, 2, 5) for j in (0, 1)]
    assert compact_names(names + ["norm.weight"]) == (
        "layers.{0-2,5}.blocks.{0-1}.attn.qkv.weight (8), norm.weight"
    )
