"""The Python API (calib.quantize / save / load) with typed configs, transforms included."""
from __future__ import annotations

import argparse

import pytest
import torch

import calib
from calib.transforms import TransformsConfig, shift_sites, smoothing_groups
from toolchain.quant import QuantConfig

from ..tiny_models import save_checkpoint, tiny_swinir


@pytest.fixture()
def setup(tmp_path):
    model = tiny_swinir(scale=2, seed=0)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, checkpoint, patches


def test_quantize_with_transforms_saves_an_artifact_that_loads_to_the_same_model(setup, tmp_path):
    model, checkpoint, patches = setup
    config = TransformsConfig(smooth=("norm", "value"), shifts=True)
    qmodel = calib.quantize(model, QuantConfig(w_bits=4, a_bits=4), lambda m: m(patches), transforms=config)
    assert smoothing_groups(qmodel) and shift_sites(qmodel)
    artifact = calib.save(qmodel, tmp_path / "w4a4.safetensors", checkpoint=checkpoint)
    loaded = calib.load(checkpoint, artifact)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qmodel(x), rtol=0, atol=1e-6)


def test_transforms_change_the_bounds_they_are_asked_for(setup):
    """With transforms the calibrated model differs from the plain one (the option is not ignored)."""
    model, _, patches = setup
    plain = calib.quantize(tiny_swinir(scale=2, seed=0), QuantConfig(), lambda m: m(patches))
    smoothed = calib.quantize(model, QuantConfig(), lambda m: m(patches), transforms=TransformsConfig(smooth=("norm",)))
    with torch.no_grad():
        assert not torch.equal(plain(patches), smoothed(patches))


def test_quantize_refuses_options_that_are_not_configs(setup):
    model, _, patches = setup
    with pytest.raises(TypeError, match="transforms must be a TransformsConfig, got Namespace"):
        calib.quantize(model, QuantConfig(), lambda m: m(patches), transforms=argparse.Namespace(smooth="all"))
    with pytest.raises(ValueError, match="method must be one of"):
        calib.quantize(model, QuantConfig(), lambda m: m(patches), method="kmeans")
