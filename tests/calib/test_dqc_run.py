"""DQC's typed run configs (calib/dqc_run.py) and the one place flags become them (calib/dqc_cli.py).

What is checked: the configs are frozen and validate (a bad value raises an error naming the field,
or the flag when it comes from the command line); every DQC flag lands in its config field; the
library entry points (``run_dqc``, ``calib.distill``) refuse a parsed ``argparse.Namespace``; and
``calib.distill`` with a :class:`DQCRun` checkpoint writes it and resumes from it on the tiny SwinIR.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

import calib
from calib.dqc import DQCConfig
from calib.dqc_cli import add_dqc_arguments, dqc_configs_from_args
from calib.dqc_run import DQCData, DQCRun, default_checkpoint_path, run_dqc
from calib.dqc_state import load_checkpoint
from toolchain.defaults import DEFAULT_CALIB_IMAGES
from toolchain.quant import bounds_state

IMAGES = tuple(sorted(DEFAULT_CALIB_IMAGES.glob("*.png")))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dqc_arguments(parser, common=True)
    parser.add_argument("--out")
    parser.add_argument("--calib-images")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("config, field", [(DQCConfig(), "iters"), (DQCData(IMAGES), "patch_size"),
                                           (DQCRun(), "checkpoint")])
def test_configs_are_frozen(config, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, 3)


@pytest.mark.parametrize("make, message", [
    (lambda: DQCData(IMAGES, patch_size=0), "DQCData.patch_size must be a positive integer, got 0"),
    (lambda: DQCData(IMAGES, val_patches=-1), "DQCData.val_patches must be a positive integer, got -1"),
    (lambda: DQCData(IMAGES, val_fraction=0.0), r"DQCData.val_fraction must be in \(0, 1\), got 0.0"),
    (lambda: DQCData(IMAGES, val_fraction=1.5), r"DQCData.val_fraction must be in \(0, 1\), got 1.5"),
    (lambda: DQCData(()), "DQCData.images holds no image files"),
    (lambda: DQCRun(threads=0), "DQCRun.threads must be a positive integer, got 0"),
    (lambda: DQCRun(device="gpu7"), "DQCRun.device must name a torch device, got 'gpu7'"),
    (lambda: DQCRun(resume=True), "DQCRun.resume needs DQCRun.checkpoint"),
    (lambda: DQCRun(checkpoint="c.safetensors", resume="yes"), "DQCRun.resume must be True or False"),
    (lambda: DQCConfig(iters=0), "DQCConfig.iters must be a positive integer, got 0"),
])
def test_a_bad_value_names_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_folder_is_not_a_file_list():
    with pytest.raises(TypeError, match="DQCData.from_folder"):
        DQCData(str(DEFAULT_CALIB_IMAGES))
    assert DQCData.from_folder(DEFAULT_CALIB_IMAGES).images == IMAGES


def test_every_flag_lands_in_its_config_field(tmp_path):
    args = parse("--dqc-iters", "7", "--dqc-batch", "6", "--dqc-patch-size", "24", "--dqc-lr", "0.02", "--feature-weight",
                 "1.5", "--feature-taps", "layers.*", "--dqc-schedule", "constant", "--val-fraction", "0.2",
                 "--val-every", "3", "--val-patches", "5", "--checkpoint-every", "2", "--dqc-accumulation", "3",
                 "--seed", "4", "--threads", "2", "--device", "cpu", "--resume",
                 "--dqc-checkpoint", str(tmp_path / "c.safetensors"), "--calib-images", str(DEFAULT_CALIB_IMAGES))
    config, data, run = dqc_configs_from_args(args, world=2)
    assert config == DQCConfig(iters=7, batch=6, lr=0.02, feature_weight=1.5, schedule="constant", seed=4,
                               checkpoint_every=2, val_every=3, accumulation=3, feature_taps="layers.*")
    assert data == DQCData(IMAGES, patch_size=24, val_fraction=0.2, val_patches=5)
    assert run == DQCRun(device="cpu", threads=2, checkpoint=tmp_path / "c.safetensors", resume=True)
    # without --dqc-checkpoint the checkpoint sits beside --out
    run = dqc_configs_from_args(parse("--out", "run/a.safetensors"), images=IMAGES)[2]
    assert run.checkpoint == default_checkpoint_path("run/a.safetensors") == Path("run/a.dqc-checkpoint.safetensors")


@pytest.mark.parametrize("argv, message", [
    (["--dqc-patch-size", "0"], "--dqc-patch-size must be positive"),
    (["--val-fraction", "1"], r"--val-fraction in \(0, 1\)"),
    (["--val-patches", "0"], "--val-patches must be positive, got 0"),
    (["--threads", "0"], "--threads must be positive, got 0"),
    (["--resume"], "--resume needs the checkpoint to continue: --dqc-checkpoint"),
    (["--dqc-lr", "0"], "DQC options: DQCConfig.lr must be a positive number"),
    (["--device", "gpu7"], "DQC options: DQCRun.device must name a torch device"),
])
def test_a_bad_flag_names_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        dqc_configs_from_args(parse(*argv), images=IMAGES)


def test_an_empty_image_folder_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=f"--calib-images {tmp_path}: no image files found"):
        dqc_configs_from_args(parse("--calib-images", str(tmp_path)))


def test_library_entry_points_refuse_a_namespace(tiny_swinir):
    args = parse()
    model = tiny_swinir(0)
    with pytest.raises(TypeError, match="run_dqc: config must be a DQCConfig, got Namespace"):
        run_dqc(model, args, DQCData(IMAGES))
    with pytest.raises(TypeError, match="run_dqc: data must be a DQCData, got Namespace"):
        run_dqc(model, DQCConfig(), args)
    with pytest.raises(TypeError, match="run_dqc: run must be a DQCRun, got Namespace"):
        run_dqc(model, DQCConfig(), DQCData(IMAGES), args)
    with pytest.raises(TypeError, match="distill: config must be a DQCConfig, got Namespace"):
        calib.distill(model, torch.rand(4, 3, 16, 16), args)
    with pytest.raises(TypeError, match="distill: run must be a DQCRun, got Namespace"):
        calib.distill(model, torch.rand(4, 3, 16, 16), DQCConfig(), args)


@pytest.fixture
def one_thread():
    """No oversubscription on the shared 2-core machine; the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_the_python_api_checkpoints_and_resumes_with_a_run_config(tiny_swinir, calib_lr, tmp_path, one_thread):
    """``calib.distill(..., run=DQCRun(checkpoint=...))``: the checkpoint holds the run; resuming the finished
    run gives its bounds without training again."""
    qmodel = calib.quantize(tiny_swinir(0), forward_loop=lambda m: m(calib_lr))
    dobi = {k: v.clone() for k, v in bounds_state(qmodel).items()}
    config = DQCConfig(iters=2, batch=2, val_every=0)
    checkpoint = tmp_path / "dqc.safetensors"
    result = calib.distill(qmodel, calib_lr, config, calib.DQCRun(checkpoint=checkpoint), progress=False)
    trained = {k: v.clone() for k, v in bounds_state(qmodel).items()}
    assert result.iterations == 2 and result.resumed_from is None and load_checkpoint(checkpoint).iteration == 2
    assert any(not torch.equal(dobi[k], trained[k]) for k in dobi)

    again = calib.quantize(tiny_swinir(0), forward_loop=lambda m: m(calib_lr))
    resumed = calib.distill(again, calib_lr, config, DQCRun(checkpoint=checkpoint, resume=True), progress=False)
    assert resumed.resumed_from == 2
    for key, value in bounds_state(again).items():
        assert torch.equal(value, trained[key]), key
