"""QuantConfig: validation, immutability, JSON round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from toolchain.quant import QuantConfig, Quantizer, quantize_model


def test_defaults_are_the_paper_setting():
    config = QuantConfig()
    assert (config.w_bits, config.a_bits, config.weight_granularity) == (4, 4, "per-tensor")
    assert config.quantize == ("linear", "matmul")
    assert config.target == "trt-int8"
    assert not config.weight_symmetric


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(w_bits=1), "w_bits"),
        (dict(a_bits=9), "a_bits"),
        (dict(w_bits=4.0), "w_bits"),
        (dict(a_bits=True), "a_bits"),
        (dict(weight_granularity="per-row"), "weight_granularity"),
        (dict(quantize=("linear", "attention")), "quantize"),
        (dict(quantize=()), "quantize"),
        (dict(quantize=("linear", "linear")), "twice"),
        (dict(target="tensorrt"), "target"),
        (dict(target="trt-int4", w_bits=8), "trt-int4"),
        (dict(target="trt-int4", w_bits=3), "trt-int4"),
        (dict(bits_overrides=("layers.*",)), "PATTERN=BITS"),
        (dict(bits_overrides=("=8",)), "PATTERN=BITS"),
        (dict(bits_overrides=("layers.*=eight",)), "PATTERN=BITS"),
        (dict(bits_overrides=("layers.*=9",)), "bits_overrides 'layers.\\*=9'"),
        (dict(bits_overrides=("layers.*=8",), target="trt-int4"), "trt-int4"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("field", ["quantize", "include", "exclude", "bits_overrides"])
def test_name_lists_must_be_sequences_of_strings(field):
    with pytest.raises(TypeError, match=field):
        QuantConfig(**{field: "linear"})
    with pytest.raises(TypeError, match=field):
        QuantConfig(**{field: ["linear", 3]})


def test_different_widths_and_targets_are_accepted():
    assert QuantConfig(w_bits=2, a_bits=8).a_bits == 8
    assert QuantConfig(target="trt-int4", a_bits=8).weight_symmetric
    assert not QuantConfig(w_bits=8).weight_symmetric  # the target's rule; 8-bit grids are symmetric anyway
    assert not QuantConfig(w_bits=7, target="ort").weight_symmetric


def test_frozen():
    config = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.w_bits = 8


def test_json_round_trip_gives_an_equal_config():
    config = QuantConfig(w_bits=3, a_bits=6, weight_granularity="per-channel", quantize=["linear", "matmul", "conv"],
                         include=["layers.*"], exclude=("*.conv.*",), target="ort", bits_overrides=["*.fc2.*=8"])
    assert isinstance(config.quantize, tuple) and isinstance(config.include, tuple)
    text = json.dumps(config.to_dict())
    again = QuantConfig.from_dict(json.loads(text))
    assert again == config
    assert hash(again) == hash(config)


def test_from_dict_rejects_unknown_keys_and_fills_defaults():
    with pytest.raises(ValueError, match="unknown keys \\['granularity'\\]"):
        QuantConfig.from_dict({"w_bits": 4, "granularity": "per-tensor"})
    assert QuantConfig.from_dict({"a_bits": 8}) == QuantConfig(a_bits=8)
    with pytest.raises(TypeError, match="dict"):
        QuantConfig.from_dict([("w_bits", 4)])


class ConstantBias(nn.Module):
    """A linear that only ever sees a parameter (as a position-bias MLP does): not on the image's data path."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 4))
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.table).sum()


def test_a_selection_that_matches_nothing_is_an_error_naming_the_config():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.rand(1, 4)
    with pytest.raises(ValueError, match="QuantConfig\\(.*matmul.* in Sequential; it has 2 linear: select those"):
        quantize_model(mlp, QuantConfig(quantize=("matmul",)), x)   # and what it does have
    with pytest.raises(ValueError, match="include pattern 'attn.\\*'"):
        quantize_model(mlp, QuantConfig(quantize=("linear",), include=("attn.*",)), x)
    with pytest.raises(ValueError, match="exclude pattern"):
        quantize_model(mlp, QuantConfig(quantize=("linear",), exclude=("*.a",)), x)
    with pytest.raises(ValueError, match="selects no quantizer"):
        quantize_model(mlp, QuantConfig(quantize=("linear",), include=("0.*",), exclude=("0.*",)), x)
    constant = ConstantBias()  # its only linear never sees the image: not a candidate
    with pytest.raises(ValueError, match="quantize='linear' finds no linear layer on the image's data path"):
        quantize_model(constant, QuantConfig(quantize=("linear",)), x)
    assert not any(isinstance(m, Quantizer) for m in constant.modules())  # nothing half-attached


def test_bits_overrides_last_match_wins_per_kind():
    config = QuantConfig(w_bits=4, a_bits=3, bits_overrides=("stage1.*=8", "stage1.*.weight=6"))
    assert config.overrides() == [("stage1.*", 8), ("stage1.*.weight", 6)]
    assert config.bits_for("stage1.fc1.weight", "weight") == 6
    assert config.bits_for("stage1.fc1.input", "activation") == 8
    assert config.bits_for("stage2.fc1.weight", "weight") == 4
    assert config.bits_for("stage2.fc1.input", "activation") == 3
