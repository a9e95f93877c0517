"""The feature-tap rule on quantized models: our quantized layers are building blocks, never stages."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from calib.feature_taps import feature_modules
from toolchain.models.info import INFO_ATTRIBUTE, ModelInfo
from toolchain.quant import QuantConfig, quantize_model


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class Net(nn.Module):
    def __init__(self, stages: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList(Stage() for _ in range(stages))
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.__dict__[INFO_ATTRIBUTE] = ModelInfo("net", scale=1)  # what toolchain.load_model attaches

    def forward(self, x):
        x = self.head(x).permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        return self.tail(x.permute(0, 3, 1, 2))


def test_quantized_model_taps_its_stages_like_the_float_one():
    """Two stages beside two quantized convolutions (head, tail): the stages, as on the float model."""
    float_taps = [path for path, _ in feature_modules(Net(2))]
    quantized = quantize_model(Net(2), QuantConfig(w_bits=4, a_bits=4, quantize=("linear", "conv")))
    assert float_taps == ["stages.0", "stages.1"]
    assert [path for path, _ in feature_modules(quantized)] == float_taps


def test_one_stage_quantized_model_asks_for_a_pattern_instead_of_tapping_its_layers():
    """Head and tail convolutions (two QuantConv2d) or a stage's two QuantLinear are not repeated stages."""
    quantized = quantize_model(Net(1), QuantConfig(w_bits=4, a_bits=4, quantize=("linear", "conv")))
    assert any(type(m).__module__.startswith("toolchain.quant") for m in quantized.modules())
    with pytest.raises(ValueError, match="no repeated stage"):
        feature_modules(quantized)
    assert [path for path, _ in feature_modules(quantized, "stages.?")] == ["stages.0"]


class ConvStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def test_holds_skips_a_more_frequent_class_without_what_is_asked():
    """Three convolution-only stages beside two linear ones (DITN's SALs and ITLs): the rule alone taps the three;
    asked for stages that hold quantizers (block reconstruction, convolutions not quantized), the two."""
    from calib.reconstruct import ReconstructConfig, reconstruct_blocks
    from calib.baselines import calibrate_minmax
    from toolchain.quant import quantizers

    net = Net(2)
    net.stages.extend(ConvStage() for _ in range(3))
    assert [path for path, _ in feature_modules(net)] == ["stages.2", "stages.3", "stages.4"]
    quantized = quantize_model(net, QuantConfig(w_bits=4, a_bits=4, quantize=("linear",)))
    holding = [path for path, _ in feature_modules(quantized, holds=lambda m: bool(quantizers(m)))]
    assert holding == ["stages.0", "stages.1"]
    lr = torch.rand(4, 3, 8, 8)
    calibrate_minmax(quantized, lambda m: m(lr))
    results, _ = reconstruct_blocks(quantized, lr, ReconstructConfig(iters=2, batch=2), progress=False)
    assert [r.name for r in results] == holding
