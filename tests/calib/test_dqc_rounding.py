"""Learned weight rounding inside DQC (``DQCConfig.rounding``; calib/dqc.py with calib/learned_rounding.py).

On the tiny SwinIR x2 (seeded random weights, W4A4, DOBI bounds from the shipped training images):
the weights end exactly on their grids, the weight grids themselves never move, the activation bounds
train, and some codes leave round-to-nearest; validation judges the rounding as it will be baked (its
step 0 is DOBI's start exactly, the soft rounding would not be); a run stopped after a checkpoint and
resumed ends bit-identical to an uninterrupted one; ``2dq-calibrate --method 2dquant --learned-rounding``
stores the baked weights in the artifact, and the loaded model computes what the calibrated one did.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from calib.cli import main
from calib.dqc import DQCConfig, distill
from calib.learned_rounding import weight_layers
from toolchain.data.patches import PatchDataset, list_images, sample_patches
from toolchain.defaults import DEFAULT_CALIB_IMAGES
from toolchain.quant import bounds_state, quantizers
from toolchain.quant.grid import integer_codes

WORKER = Path(__file__).with_name("dqc_worker.py")

#: rounding steps: long enough that logits cross zero (codes leave round-to-nearest) at this learning rate
CONFIG = DQCConfig(iters=12, batch=4, lr=3e-3, val_every=4, checkpoint_every=0, rounding=True, rounding_lr=0.1)


@pytest.fixture
def images() -> list[Path]:
    return list_images(DEFAULT_CALIB_IMAGES)


@pytest.fixture
def tiny(images):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("dqc_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    yield worker.tiny_quantized_model(images[:20])
    torch.set_num_threads(previous)


def _data(images, length: int) -> PatchDataset:
    return PatchDataset(images[20:], 16, 2, seed=1, length=length)


def _val(images) -> torch.Tensor:
    lr, _ = sample_patches(images[20:], 4, 16, 2, seed=5)
    return lr


def _codes(model) -> dict[str, torch.Tensor]:
    return {name: integer_codes(layer.weight.detach(), q.lower.detach(), q.upper.detach(), q.bits, q.symmetric)
            for name, layer in weight_layers(model).items() for q in (layer.weight_quantizer,)}


def test_weights_end_on_fixed_grids_with_learned_codes(tiny, images):
    before = bounds_state(tiny)
    rtn = _codes(tiny)
    grids = {id(layer.weight_quantizer) for layer in weight_layers(tiny).values()}
    weight_bounds = {f"{name}.{side}" for name, q in quantizers(tiny).items() if id(q) in grids
                     for side in ("lower", "upper")}
    result = distill(tiny, _data(images, 48), CONFIG, val_batch=_val(images), progress=False)
    after = bounds_state(tiny)
    assert all(torch.equal(after[k], before[k]) for k in weight_bounds)               # the grids stayed
    assert any(not torch.equal(after[k], before[k]) for k in after if k not in weight_bounds)   # activations trained
    layers = weight_layers(tiny)
    assert len(result.refined) == len(layers) and result.to_dict()["refined_weights"] == len(layers)
    assert all(layer.weight_quantizer.rounding is None for layer in layers.values())   # detached after baking
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight), name   # exactly on the grid
    codes = _codes(tiny)
    changed = sum(int((codes[n] != rtn[n]).sum()) for n in codes)
    assert changed > 0 and all((codes[n] - rtn[n]).abs().max() <= 1 for n in codes)   # one grid step at most
    assert result.best_iteration is not None and result.best_iteration > 0


def test_validation_judges_the_rounding_as_baked(tiny, images):
    """Step 0's validation with learned rounding is DOBI's start (hard rounding = round to nearest); the soft
    rounding at its start is the float weight, which would validate differently."""
    import copy

    plain = copy.deepcopy(tiny)
    config = DQCConfig(iters=1, batch=4, val_every=1, checkpoint_every=0)
    with_rounding = distill(tiny, _data(images, 4), DQCConfig(**{**config.to_dict(), "rounding": True}),
                            val_batch=_val(images), progress=False)
    without = distill(plain, _data(images, 4), config, val_batch=_val(images), progress=False)
    assert with_rounding.validations[0] == without.validations[0]


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tiny, images, tmp_path):
    import copy

    config = DQCConfig(**{**CONFIG.to_dict(), "checkpoint_every": 4})
    stopped, fresh = copy.deepcopy(tiny), copy.deepcopy(tiny)
    reference = distill(tiny, _data(images, 48), config, val_batch=_val(images), progress=False,
                        checkpoint_path=tmp_path / "reference.safetensors")

    checkpoint = tmp_path / "stopped.safetensors"

    def stop_after_the_first_checkpoint(module, args):   # the first forward once step 4's checkpoint is written
        if checkpoint.exists():
            raise KeyboardInterrupt

    hook = stopped.register_forward_pre_hook(stop_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        distill(stopped, _data(images, 48), config, val_batch=_val(images), progress=False,
                checkpoint_path=checkpoint)
    hook.remove()
    assert all(layer.weight_quantizer.rounding is None for layer in weight_layers(stopped).values())
    resumed = distill(fresh, _data(images, 48), config, val_batch=_val(images), progress=False,
                      checkpoint_path=checkpoint, resume=True)
    assert resumed.resumed_from == 4
    a, b = bounds_state(tiny), bounds_state(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert reference.refined.keys() == resumed.refined.keys()
    assert all(torch.equal(reference.refined[k], resumed.refined[k]) for k in reference.refined)


def test_the_command_stores_the_baked_weights(tmp_path, capsys, tiny_checkpoint, calib_images):
    from calib.artifact import load_quantized_model

    out = tmp_path / "w4a4.safetensors"
    code = main(["--weights", str(tiny_checkpoint), "--calib-images", str(calib_images), "--patches", "4",
                 "--patch-size", "16", "--batch", "2", "--out", str(out), "--no-progress", "-q", "--bits", "4",
                 "--method", "2dquant", "--learned-rounding", "--rounding-lr", "0.1", "--dqc-iters", "4",
                 "--dqc-batch", "2", "--dqc-patch-size", "16", "--val-every", "2", "--val-patches", "2"])
    capsys.readouterr()
    assert code == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    dqc = sidecar["method_options"]["dqc"]
    assert dqc["config"]["rounding"] is True and dqc["result"]["refined_weights"] > 0
    model = load_quantized_model(tiny_checkpoint, out)
    layers = weight_layers(model)
    assert len(layers) == dqc["result"]["refined_weights"]
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight), name   # stored on the grid


def test_bad_rounding_options_are_refused():
    for field, value in (("rounding_lr", 0.0), ("rounding_lr", float("nan")), ("rounding_weight", -1.0)):
        with pytest.raises(ValueError, match=field):
            DQCConfig(**{field: value})
