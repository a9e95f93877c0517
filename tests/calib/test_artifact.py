"""Calibration artifacts: round trip, refusals of mismatched pairs, atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calib.artifact import (
    ArtifactError,
    describe_images,
    load_artifact,
    load_quantized_model,
    save_artifact,
    sidecar_path,
)
from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from toolchain import load_model
from toolchain.files import sha256_file
from toolchain.models import info_of
from toolchain.quant import QuantConfig, bounds_state, quantize_model

CONFIG = QuantConfig(w_bits=4, a_bits=4)


@pytest.fixture
def lr() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def calibrated(checkpoint: Path, lr: torch.Tensor, config: QuantConfig = CONFIG) -> torch.nn.Module:
    model = quantize_model(load_model(checkpoint), config)
    calibrate_minmax(model, batch_forward_loop(lr, progress=False))
    return model


def write(tmp_path: Path, model, checkpoint: Path, config: QuantConfig = CONFIG, **kwargs) -> Path:
    return save_artifact(tmp_path / "run" / "w4a4.safetensors", model, checkpoint=checkpoint,
                         quant_config=config, method="minmax", **kwargs)


def test_sidecar_path_convention():
    assert sidecar_path("run/w4a4.safetensors") == Path("run/w4a4.json")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        sidecar_path("run/w4a4.json")


def test_round_trip(tmp_path, tiny_checkpoint, lr):
    model = calibrated(tiny_checkpoint, lr)
    path = write(tmp_path, model, tiny_checkpoint, calibration={"patches": 2, "seed": 0})
    assert sorted(p.name for p in path.parent.iterdir()) == ["w4a4.json", "w4a4.safetensors"]

    artifact = load_artifact(path)
    expected = bounds_state(model)
    assert artifact.bounds.keys() == expected.keys()
    assert all(torch.equal(artifact.bounds[k], v) for k, v in expected.items())
    meta = artifact.meta
    assert meta["format_version"] == 1
    assert meta["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    assert meta["model"] == {"arch": "SwinIR", "config": info_of(model).hyperparameters}
    assert meta["model"]["config"]["embed_dim"] == 12 and meta["model"]["config"]["depths"] == [2, 2]
    assert artifact.quant_config == CONFIG
    assert meta["method"] == "minmax" and meta["calibration"] == {"patches": 2, "seed": 0}
    assert set(meta["versions"]) == {"torch", "numpy", "2dq"} and meta["created"]

    loaded = load_quantized_model(tiny_checkpoint, path)
    with torch.no_grad():
        assert torch.equal(loaded(lr), model(lr))  # the same fake-quant model, bit for bit


def test_equal_bounds_write_identical_files(tmp_path, tiny_checkpoint, lr):
    """Reproducible artifacts: the bounds file (hence ``bounds_sha256``) depends on the bounds only."""
    model = calibrated(tiny_checkpoint, lr)
    digests = {sha256_file(write(tmp_path / str(i), model, tiny_checkpoint)) for i in range(8)}
    assert len(digests) == 1
    assert {load_artifact(tmp_path / str(i) / "run" / "w4a4.safetensors").meta["bounds_sha256"] for i in range(8)} == digests


def test_other_checkpoint_is_refused(tmp_path, tiny_checkpoint, lr, tiny_swinir, save_checkpoint):
    path = write(tmp_path, calibrated(tiny_checkpoint, lr), tiny_checkpoint)
    other = save_checkpoint(tiny_swinir(1), tmp_path / "other.safetensors")  # same architecture, other weights
    with pytest.raises(ArtifactError, match="checkpoint mismatch") as err:
        load_quantized_model(other, path)
    message = str(err.value)
    for part in (str(path), str(other), sha256_file(other), sha256_file(tiny_checkpoint)):
        assert part in message


def test_mismatched_config_is_refused(tmp_path, tiny_checkpoint, lr):
    path = write(tmp_path, calibrated(tiny_checkpoint, lr), tiny_checkpoint)
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    meta["quant_config"]["weight_granularity"] = "per-channel"  # bounds were calibrated per tensor
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="do not fit") as err:
        load_quantized_model(tiny_checkpoint, path)
    assert "weight" in str(err.value) and "shape" in str(err.value)

    meta["quant_config"]["weight_granularity"] = "per-tensor"
    meta["quant_config"]["quantize"] = ["linear"]  # fewer quantizers than the bounds file holds
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unexpected"):
        load_quantized_model(tiny_checkpoint, path)


def test_sidecar_of_other_bounds_is_refused(tmp_path, tiny_checkpoint, lr):
    first = write(tmp_path, calibrated(tiny_checkpoint, lr), tiny_checkpoint)
    second = save_artifact(tmp_path / "b.safetensors", calibrated(tiny_checkpoint, 2 * lr), checkpoint=tiny_checkpoint,
                           quant_config=CONFIG, method="minmax")
    sidecar_path(second).write_text(sidecar_path(first).read_text())
    with pytest.raises(ArtifactError, match="not the bounds file"):
        load_artifact(second)


def test_missing_or_broken_files(tmp_path, tiny_checkpoint, lr):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "none.safetensors")
    path = write(tmp_path, calibrated(tiny_checkpoint, lr), tiny_checkpoint)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ArtifactError, match="not a JSON sidecar"):
        load_artifact(path)
    sidecar_path(path).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ArtifactError, match="missing keys"):
        load_artifact(path)


def test_failed_write_leaves_nothing(tmp_path, tiny_checkpoint, lr):
    model = calibrated(tiny_checkpoint, lr)
    with pytest.raises(TypeError):  # not JSON-serializable: fails after the bounds are written to a temp file
        write(tmp_path, model, tiny_checkpoint, method_options={"bad": object()})
    assert list((tmp_path / "run").iterdir()) == []
    # a failing rename of the sidecar (a folder is in the way) removes the bounds too
    (tmp_path / "run" / "w4a4.json").mkdir()
    with pytest.raises(OSError):
        write(tmp_path, model, tiny_checkpoint)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["w4a4.json"]


def test_existing_artifact_survives_a_failed_overwrite(tmp_path, tiny_checkpoint, lr):
    model = calibrated(tiny_checkpoint, lr)
    path = write(tmp_path, model, tiny_checkpoint)
    before = (path.read_bytes(), sidecar_path(path).read_bytes())
    with pytest.raises(TypeError):
        write(tmp_path, model, tiny_checkpoint, method_options={"bad": object()})
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    load_artifact(path)


def test_describe_images(tmp_path):
    files = [tmp_path / "b.png", tmp_path / "sub" / "a.png"]
    first = describe_images(tmp_path, files)
    assert first["images"] == 2
    assert describe_images(tmp_path, list(reversed(files))) == first  # order does not matter
    assert describe_images(tmp_path, files[:1])["image_list_sha256"] != first["image_list_sha256"]


def test_bounds_missing_a_placed_quantizer_name_it(tmp_path, tiny_checkpoint, lr):
    """An artifact whose names do not match the model's placement is refused, naming the first missing one."""
    from safetensors.torch import load_file, save_file

    path = write(tmp_path, calibrated(tiny_checkpoint, lr), tiny_checkpoint)
    bounds = load_file(str(path))
    first = sorted(k for k in bounds if k.endswith(".lower"))[0].removesuffix(".lower")
    del bounds[f"{first}.lower"], bounds[f"{first}.upper"]
    save_file(bounds, str(path))
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    meta["bounds_sha256"] = sha256_file(path)
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=f"no bounds for {first.replace('.', '[.]')}, a quantizer the placement"):
        load_quantized_model(tiny_checkpoint, path)
