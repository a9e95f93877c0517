"""Block reconstruction (calib/reconstruct.py): it lowers what it optimizes, keeps nothing that does not pay,
chains block inputs exactly, and its learned rounding survives the artifact."""
from __future__ import annotations

import pytest
import torch

import calib.reconstruct as reconstruct
from calib.artifact import load_quantized_model, save_artifact
from calib.baselines import calibrate_minmax
from calib.reconstruct import ReconstructConfig, reconstruct_blocks
from toolchain.quant import QuantConfig, bounds_state, float_mode, grid, quantize_model, quantizers

from ..tiny_models import tiny_swinir

CONFIG = QuantConfig(w_bits=3, a_bits=3, weight_granularity="per-channel")


def _model(calib_lr: torch.Tensor, seed: int = 0):
    """Tiny SwinIR x4 (two residual groups: the blocks), W3A3 MinMax bounds on the real calibration patches."""
    model = quantize_model(tiny_swinir(scale=4, seed=seed), CONFIG)
    calibrate_minmax(model, lambda m: m(calib_lr))
    return model


def _output_mse(model, x) -> float:
    with torch.no_grad():
        with float_mode(model):
            reference = model(x)
        return float((model(x) - reference).pow(2).mean())


@pytest.mark.parametrize("rounding", [False, True])
def test_reconstruction_lowers_every_block_and_the_model_error(calib_lr, rounding):
    model = _model(calib_lr)
    before = _output_mse(model, calib_lr)
    flags = [p.requires_grad for p in model.parameters()]
    results, refined = reconstruct_blocks(model, calib_lr, ReconstructConfig(iters=30, batch=2, rounding=rounding),
                                          progress=False)
    assert [r.name for r in results] == ["layers.0", "layers.1"]  # the residual groups
    assert all(r.kept and r.end_mse < r.start_mse for r in results)
    assert _output_mse(model, calib_lr) < 0.9 * before
    if rounding:  # every weight of both groups rounded and returned; on its (unchanged) grid
        assert len(refined) == 2 * 2 * 4 and all(name.endswith(".weight") for name in refined)
    else:
        assert refined == {}
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(q.rounding is None for q in quantizers(model).values())


def test_a_block_that_gets_worse_is_restored(calib_lr):
    model = _model(calib_lr)
    start = bounds_state(model)
    flags = [p.requires_grad for p in model.parameters()]
    results, _ = reconstruct_blocks(model, calib_lr, ReconstructConfig(iters=5, batch=2, lr=1e3), progress=False)
    assert not any(r.kept for r in results)  # a learning rate that wrecks the bounds
    assert all(r.end_mse == r.start_mse for r in results)
    after = bounds_state(model)
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_chained_inputs_equal_a_fresh_quantized_pass(calib_lr, monkeypatch):
    """Block k+1's inputs from block k's outputs give exactly what a pass of the quantized model gives."""
    seen = []
    detect = reconstruct._chained
    monkeypatch.setattr(reconstruct, "_chained", lambda calls, outputs: seen.append(detect(calls, outputs)) or seen[-1])
    chained = _model(calib_lr)
    reconstruct_blocks(chained, calib_lr, ReconstructConfig(iters=10, batch=2), progress=False)
    assert seen == [[False, True]]  # SwinIR's second group takes the first one's output
    monkeypatch.setattr(reconstruct, "_chained", lambda calls, outputs: [False] * len(calls))
    fresh = _model(calib_lr)
    reconstruct_blocks(fresh, calib_lr, ReconstructConfig(iters=10, batch=2), progress=False)
    a, b = bounds_state(chained), bounds_state(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learned_rounding_survives_the_artifact(tmp_path, calib_lr, save_checkpoint):
    model = _model(calib_lr)
    _, refined = reconstruct_blocks(model, calib_lr, ReconstructConfig(iters=10, batch=2, rounding=True),
                                    progress=False)
    checkpoint = save_checkpoint(tiny_swinir(scale=4, seed=0), tmp_path / "tiny.safetensors")
    path = save_artifact(tmp_path / "r.safetensors", model, checkpoint=checkpoint, quant_config=CONFIG,
                         method="minmax", weights=refined)
    loaded = load_quantized_model(checkpoint, path)
    with torch.no_grad():
        assert torch.equal(loaded(calib_lr), model(calib_lr))


def test_rounding_grids_train_the_weight_bounds_and_the_weights_stay_on_them(tmp_path, calib_lr, save_checkpoint):
    """``rounding_grids``: the rounded weights' bounds train too; every stored weight lies on its new grid (the
    deployed codes), and the artifact gives the model back exactly."""
    fixed, model = _model(calib_lr), _model(calib_lr)
    reconstruct_blocks(fixed, calib_lr, ReconstructConfig(iters=20, batch=2, rounding=True), progress=False)
    start = bounds_state(model)
    results, refined = reconstruct_blocks(model, calib_lr, ReconstructConfig(iters=20, batch=2, rounding=True,
                                                                             rounding_grids=True, grid_lr=1e-2),
                                          progress=False)
    assert all(r.kept and r.end_mse < r.start_mse for r in results)
    weights = {name: q for name, q in quantizers(model).items() if q.role == "weight"}
    after, kept_grid = bounds_state(model), bounds_state(fixed)
    moved = [name for name in weights if not torch.equal(after[f"{name}.upper"], start[f"{name}.upper"])]
    assert len(moved) == len(weights) == len(refined) == 16  # every grid trained; without the option none moves:
    assert all(torch.equal(kept_grid[f"{name}.upper"], start[f"{name}.upper"]) for name in weights)
    layers = dict(model.named_modules())
    for name, weight in refined.items():
        q = layers[name.removesuffix(".weight")].weight_quantizer
        assert torch.equal(grid.fake_quantize(weight, q.lower, q.upper, q.bits, q.symmetric), weight)
    checkpoint = save_checkpoint(tiny_swinir(scale=4, seed=0), tmp_path / "tiny.safetensors")
    path = save_artifact(tmp_path / "g.safetensors", model, checkpoint=checkpoint, quant_config=CONFIG,
                         method="minmax", weights=refined)
    with torch.no_grad():
        assert torch.equal(load_quantized_model(checkpoint, path)(calib_lr), model(calib_lr))


def test_bad_inputs_are_refused(calib_lr):
    with pytest.raises(ValueError, match="calibrated bounds"):
        reconstruct_blocks(quantize_model(tiny_swinir(scale=4), CONFIG), calib_lr, progress=False)
    with pytest.raises(ValueError, match="matches no module"):
        reconstruct_blocks(_model(calib_lr), calib_lr, ReconstructConfig(units="nothing.*"), progress=False)
    for field, value in (("iters", 0), ("batch", -1), ("lr", 0.0), ("rounding_weight", -1.0), ("drop", 1.0),
                         ("grid_lr", 0.0), ("rounding_grids", True)):
        with pytest.raises(ValueError, match=field):
            ReconstructConfig(**{field: value})


def test_qdrop_trains_on_mixed_inputs_and_still_lowers_the_blocks(calib_lr):
    plain, dropped = _model(calib_lr), _model(calib_lr)
    reconstruct_blocks(plain, calib_lr, ReconstructConfig(iters=10, batch=2), progress=False)
    results, _ = reconstruct_blocks(dropped, calib_lr, ReconstructConfig(iters=10, batch=2, drop=0.5), progress=False)
    assert all(r.kept and r.end_mse < r.start_mse for r in results)  # measured on the quantized inputs alone
    a, b = bounds_state(plain), bounds_state(dropped)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the float elements changed what was learned


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, calib_lr, monkeypatch):
    config = ReconstructConfig(iters=8, batch=2, rounding=True)
    whole = _model(calib_lr)
    _, whole_refined = reconstruct_blocks(whole, calib_lr, config, progress=False, checkpoint=tmp_path / "whole.ckpt")

    checkpoint = tmp_path / "killed.ckpt"
    one_block = reconstruct._reconstruct_unit
    calls = []

    def killed_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return one_block(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "_reconstruct_unit", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_blocks(_model(calib_lr), calib_lr, config, progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(reconstruct, "_reconstruct_unit", one_block)
    with pytest.raises(ValueError, match="continue it with --resume"):
        reconstruct_blocks(_model(calib_lr), calib_lr, config, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="another reconstruction run"):
        reconstruct_blocks(_model(calib_lr), calib_lr, ReconstructConfig(iters=9, batch=2, rounding=True),
                           progress=False, checkpoint=checkpoint, resume=True)
    resumed = _model(calib_lr)
    results, refined = reconstruct_blocks(resumed, calib_lr, config, progress=False, checkpoint=checkpoint,
                                          resume=True)
    assert [r.name for r in results] == ["layers.0", "layers.1"]
    a, b = bounds_state(whole), bounds_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(refined) == sorted(whole_refined) and all(torch.equal(refined[k], whole_refined[k]) for k in refined)
    with torch.no_grad():
        assert torch.equal(resumed(calib_lr), whole(calib_lr))
    with pytest.raises(FileNotFoundError, match="no block-reconstruction checkpoint"):
        reconstruct_blocks(_model(calib_lr), calib_lr, config, progress=False, checkpoint=tmp_path / "none.ckpt",
                           resume=True)
