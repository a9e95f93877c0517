"""spandrel's SwinIR class reproduces the official SwinIR architecture's golden outputs to 1e-5.

Golden files: ``../shared/reference/golden/swinir_tiny_x4.safetensors`` (input 24x40, a multiple of the
window) and ``swinir_tiny_x2_oddsize.safetensors`` (19x29: the forward pads by reflection and crops).
Each holds the official architecture's random weights (``params.<name>``, without the computed
``relative_position_index`` / ``attn_mask`` buffers), ``input``, ``output``, and the configuration in its
metadata. A negative control checks that the comparison sees a small change of one weight.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from spandrel.architectures.SwinIR import SwinIR

from toolchain.tolerances import SWINIR_GOLDEN_ATOL

from ...tiny_models import SWINIR_TINY

GOLDEN = ("swinir_tiny_x4", "swinir_tiny_x2_oddsize")
#: buffers the architecture computes from its configuration; the golden files omit them
COMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # bare strings ("pixelshuffledirect", "1conv")
        return text


def read_golden(path) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(constructor arguments, weights, input, output) of a golden file."""
    with safe_open(str(path), "pt") as handle:
        config = {k: _value(v) for k, v in handle.metadata().items() if k != "note"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    weights = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
    assert set(tensors) - {f"params.{k}" for k in weights} == {"input", "output"}
    return config, weights, tensors["input"], tensors["output"]


def build(config: dict, weights: dict[str, torch.Tensor]) -> SwinIR:
    """spandrel's SwinIR from the file's configuration, its weights loaded; only computed buffers missing."""
    net = SwinIR(**config).eval()
    result = net.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.rsplit(".", 1)[-1] in COMPUTED_BUFFERS for k in result.missing_keys)
    return net


@pytest.fixture(scope="module", params=GOLDEN)
def golden(request, shared_dir):
    return (request.param, *read_golden(shared_dir / "reference" / "golden" / f"{request.param}.safetensors"))


def max_error(net: SwinIR, lr: torch.Tensor, expected: torch.Tensor) -> float:
    with torch.no_grad():
        sr = net(lr)
    assert sr.shape == expected.shape
    return (sr - expected).abs().max().item()


def test_golden_configuration_is_the_tiny_test_configuration(golden):
    name, config, _, lr, expected = golden
    scale = config["upscale"]
    assert scale == int(name.split("_x")[1][0])
    assert {k: config[k] for k in SWINIR_TINY} == SWINIR_TINY
    assert expected.shape == (1, 3, scale * lr.shape[2], scale * lr.shape[3])


def test_spandrel_swinir_matches_the_official_outputs(golden):
    name, config, weights, lr, expected = golden
    net = build(config, weights)
    if "oddsize" in name:
        assert lr.shape[2] % config["window_size"] and lr.shape[3] % config["window_size"]  # padded inside
    assert max_error(net, lr, expected) <= SWINIR_GOLDEN_ATOL
    assert expected.abs().max().item() > 0.5  # a real image-scale output, not a degenerate one


@pytest.mark.parametrize("key", ["layers.1.residual_group.blocks.1.attn.qkv.weight", "conv_after_body.bias"])
def test_a_perturbed_weight_fails_the_check(golden, key):
    """Negative control: noise of 5% of one tensor's spread (a transformer weight deep in the body, or a
    bias on the skip path) moves the output beyond the tolerance."""
    _, config, weights, lr, expected = golden
    noise = torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    perturbed = {**weights, key: weights[key] + 0.05 * weights[key].std() * noise}
    assert max_error(build(config, perturbed), lr, expected) > SWINIR_GOLDEN_ATOL
