"""Slim checkpoints: derived buffers left out, put back at load, the model identical to the full file's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from toolchain import load_model
from toolchain.defaults import DEFAULT_WEIGHTS
from toolchain.slim import KEEP_BELOW_BYTES, REBUILT_KEY, rebuilt_buffers, save_slim

from ..tiny_models import save_checkpoint, tiny_dat, tiny_swinir


@pytest.mark.parametrize("build", [tiny_swinir, tiny_dat], ids=["swinir", "dat"])
def test_slim_file_loads_to_the_same_model(build, tmp_path: Path) -> None:
    full = load_model(save_checkpoint(build(scale=2), tmp_path / "full.safetensors"))
    slim = tmp_path / "slim.safetensors"
    facts = save_slim(full, slim)
    dropped = rebuilt_buffers(full)
    assert facts["dropped"] == len(dropped) and facts["kept"] + facts["dropped"] == len(full.state_dict())
    with safe_open(str(slim), framework="pt") as handle:
        assert set(json.loads(handle.metadata()[REBUILT_KEY])) == set(dropped)
        assert not set(handle.keys()) & set(dropped)
    again = load_model(slim).state_dict()
    assert again.keys() == full.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in full.state_dict().items())


def test_only_large_derived_buffers_are_dropped(tmp_path: Path) -> None:
    model = load_model(save_checkpoint(tiny_swinir(scale=2), tmp_path / "full.safetensors"))
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    for name in rebuilt_buffers(model):
        assert name not in parameters
        assert state[name].numel() * state[name].element_size() >= KEEP_BELOW_BYTES


def test_a_damaged_buffer_is_kept_not_rebuilt(tmp_path: Path) -> None:
    """A buffer whose values differ from what the architecture builds is data: it stays in the file."""
    model = load_model(save_checkpoint(tiny_swinir(scale=2), tmp_path / "full.safetensors"))
    name = rebuilt_buffers(model)[0]
    with torch.no_grad():
        dict(model.named_buffers())[name].add_(1)
    assert name not in rebuilt_buffers(model)


def test_shipped_default_model_is_official_dat_light_x4() -> None:
    """The shipped slim DAT-light x4 loads through spandrel as DAT x4 with its 252 placed quantizers."""
    from toolchain.models import info_of
    from toolchain.quant import QuantConfig, quantize_model, quantizers

    assert DEFAULT_WEIGHTS.stat().st_size < 5_000_000
    model = load_model(DEFAULT_WEIGHTS)
    assert (info_of(model).arch, info_of(model).scale) == ("DAT", 4)
    assert len(quantizers(quantize_model(model, QuantConfig()))) == 252


@pytest.mark.slow
def test_shipped_default_model_equals_the_official_file(shared_dir: Path) -> None:
    official = load_model(shared_dir / "models" / "DAT-light" / "DAT_light_x4.pth").state_dict()
    shipped = load_model(DEFAULT_WEIGHTS).state_dict()
    assert shipped.keys() == official.keys()
    assert all(torch.equal(shipped[k], v) for k, v in official.items())
