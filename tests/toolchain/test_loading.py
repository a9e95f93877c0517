"""Checkpoint loading through spandrel: layouts and formats, refusals, and errors that name the file.

The checkpoints are real files written here from spandrel's own SwinIR class (the tiny configuration
of ``tests/tiny_models.py``, with perturbed norms so that a norm loaded wrong would show).
"""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from spandrel.architectures.SwinIR import SwinIR

from toolchain import CheckpointError, load_model, read_state_dict
from toolchain.loading import check_finite, compact_names, load_state_dict_model
from toolchain.models import info_of, supported_architectures

from ..tiny_models import SWINIR_TINY

SCALE = 2
BUFFERS = ("relative_position_index", "attn_mask")


class WritesMarker:
    """Pickles to a call of ``open(marker, "w")``: constructing it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_net(seed: int = 0) -> SwinIR:
    torch.manual_seed(seed)
    net = SwinIR(upscale=SCALE, **SWINIR_TINY).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return net


@pytest.fixture(scope="module")
def tiny_model() -> SwinIR:
    return tiny_net()


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
    assert type(model) is SwinIR and not model.training  # spandrel's own class, nothing wrapped around it
    info = info_of(model)
    assert (info.arch, info.scale, info.input_channels, info.output_channels) == ("SwinIR", SCALE, 3, 3)
    for key in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "upsampler", "img_range",
                "resi_connection", "img_size"):
        assert info.hyperparameters[key] == SWINIR_TINY[key], key
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    assert torch.equal(output(model, lr_image), output(tiny_model, lr_image))


def test_params_ema_is_preferred(tmp_path, tiny_model, lr_image):
    other = tiny_net(seed=1).state_dict()
    path = save_pth(tmp_path / "both.pth", {"params": other, "params_ema": tiny_model.state_dict()})
    assert torch.equal(output(load_model(path), lr_image), output(tiny_model, lr_image))
    path = save_pth(tmp_path / "params_only.pth", {"params": other, "epoch": 3})  # other keys beside it: ignored
    assert not torch.equal(output(load_model(path), lr_image), output(tiny_model, lr_image))


def test_half_precision_checkpoint_loads_as_float32(tmp_path, tiny_model, lr_image):
    path = save_pth(tmp_path / "half.pth", {k: v.half() if v.is_floating_point() else v
                                            for k, v in tiny_model.state_dict().items()})
    model = load_model(path, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(output(model, lr_image), output(tiny_model, lr_image), atol=2e-2, rtol=0)


def test_in_memory_state_dict_loads_like_a_file(tiny_model, lr_image):
    model = load_state_dict_model(tiny_model.state_dict())
    assert info_of(model).arch == "SwinIR" and info_of(model).scale == SCALE
    assert torch.equal(output(model, lr_image), output(tiny_model, lr_image))
    with pytest.raises(TypeError, match="load_model"):
        info_of(tiny_model)  # a bare spandrel module carries no description


def test_detected_but_misshaped_tensors_are_refused_naming_the_file(tmp_path, tiny_model):
    state_dict = dict(tiny_model.state_dict())
    state_dict["norm.weight"] = torch.zeros(13)
    path = save_pth(tmp_path / "misshaped.pth", state_dict)
    with pytest.raises(CheckpointError, match="looks like a known architecture but does not load") as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and "norm.weight" in message and "[13]" in message


def test_missing_and_unexpected_tensors_are_named(tmp_path, tiny_model):
    state_dict = dict(tiny_model.state_dict())
    del state_dict["layers.1.residual_group.blocks.1.mlp.fc2.bias"]
    state_dict["extra.weight"] = torch.zeros(3)
    path = save_pth(tmp_path / "damaged.pth", {"params": state_dict})
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message
    assert "layers.1.residual_group.blocks.1.mlp.fc2.bias" in message and "extra.weight" in message


def test_integer_tensor_in_place_of_a_weight_is_refused(tmp_path, tiny_model):
    state_dict = dict(tiny_model.state_dict())
    state_dict["norm.bias"] = torch.zeros(12, dtype=torch.int64)
    path = save_pth(tmp_path / "int.pth", state_dict)
    with pytest.raises(CheckpointError, match=r"torch\.int64.*norm\.bias|norm\.bias.*torch\.int64") as caught:
        load_model(path)
    assert str(path) in str(caught.value)


FC1 = "layers.0.residual_group.blocks.0.mlp.fc1.weight"


@pytest.mark.parametrize("value, kind", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "inf")])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_naming_the_tensor_and_the_file(tmp_path, tiny_model, value, kind, suffix):
    state_dict = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state_dict[FC1][3, 5] = value
    path = tmp_path / f"damaged{suffix}"
    if suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"params_ema": state_dict}, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    assert str(caught.value) == (f"{path}: tensor '{FC1}' holds 1 non-finite value (1 {kind}); "
                                 "the checkpoint is damaged")


def test_every_damaged_tensor_is_counted(tiny_model):
    """The first damaged tensor with its counts by kind; the others named, grouped."""
    state_dict = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state_dict[FC1][0, :2] = float("nan")
    state_dict[FC1][1, 0] = float("inf")
    for block in (0, 1):
        state_dict[f"layers.1.residual_group.blocks.{block}.attn.proj.bias"][0] = float("-inf")
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_model(state_dict, "in memory")
    assert str(caught.value) == (
        f"in memory: tensor '{FC1}' holds 3 non-finite values (2 nan, 1 inf); 2 more tensors hold some too: "
        "layers.1.residual_group.blocks.{0-1}.attn.proj.bias (2); the checkpoint is damaged")


def test_finite_values_whose_sum_overflows_are_not_damage():
    """The cheap screen (a tensor's sum) overflows on large finite weights: the exact test decides."""
    check_finite({"w": torch.full((4,), 3e38), "h": torch.full((4,), 6e4, dtype=torch.float16),
                  "index": torch.arange(3)})
    with pytest.raises(CheckpointError, match=r"^x: tensor 'w' holds 2 non-finite values \(2 inf\);"):
        check_finite({"w": torch.tensor([3e38, float("inf"), float("-inf")])}, "x")


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    nested = save_pth(tmp_path / "nested.pth", {"params": {"conv_first.weight": WritesMarker(marker)}})
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"weight": WritesMarker(marker)}, protocol=2))
    for path in (nested, legacy):
        with pytest.raises(CheckpointError, match="not a plain tensor checkpoint") as caught:
            load_model(path)
        assert str(path) in str(caught.value)
        assert "weights_only=False" not in str(caught.value)  # never suggest the unsafe retry
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
    with pytest.raises(CheckpointError, match=pattern):  # load_model reads through the same checks
        load_model(path)


@pytest.mark.parametrize("kind", ["foreign", "swinir_without_buffers"])
def test_unidentified_checkpoint_is_one_line_naming_the_file_and_the_architectures(tmp_path, tiny_model, kind):
    """spandrel identifies SwinIR by keys that include its stored ``relative_position_index`` buffers, as
    the official files hold them; a file of the learnable tensors alone is not identified."""
    if kind == "foreign":
        state_dict = {"body.0.weight": torch.zeros(4, 3, 3, 3)}
    else:
        state_dict = {k: v for k, v in tiny_model.state_dict().items() if not k.endswith(BUFFERS)}
    path = save_pth(tmp_path / "other.pth", state_dict)
    with pytest.raises(CheckpointError, match="spandrel cannot identify this checkpoint") as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert next(iter(state_dict)) in message
    listed = message.split("supported architectures: ", 1)[1].split(", ")
    assert listed == supported_architectures()
    assert {"SwinIR", "DAT", "HAT", "SRFormer", "NGswin"} <= set(listed)


def test_swinir_names_without_an_upsampler_are_refused(tmp_path, tiny_model):
    """Detected as SwinIR, configured as a 1x restoration model whose conv_last is absent: refused."""
    state_dict = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("upsample")}
    path = save_pth(tmp_path / "headless.pth", state_dict)
    with pytest.raises(CheckpointError, match="conv_last.weight") as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_compact_names_groups_numbered_names():
    names = [f"layers.{i}.blocks.{j}.attn.qkv.weight" for i in (0, 1, 2, 5) for j in (0, 1)]
    assert compact_names(names + ["norm.weight"]) == (
        "layers.{0-2,5}.blocks.{0-1}.attn.qkv.weight (8), norm.weight"
    )
