"""``2dq-calibrate --method 2dquant --init ARTIFACT``: DQC from an artifact's model, the new artifact exact."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from calib.artifact import TRANSFORMS_PREFIX, WEIGHTS_PREFIX, load_artifact, load_quantized_model
from calib.cli import build_parser, main
from calib.dqc_cli import dqc_configs_from_args
from calib.dqc_run import run_dqc
from toolchain.data.patches import list_images
from toolchain.quant import bounds_state


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def common(checkpoint, images, out) -> list[str]:
    return ["--weights", str(checkpoint), "--calib-images", str(images), "--out", str(out), "--no-progress", "-q"]


#: a tiny DQC budget; lr 3e-3 moves the tiny model's bounds in three steps
DQC = ["--dqc-iters", "3", "--dqc-batch", "2", "--dqc-patch-size", "16", "--val-every", "0", "--val-patches", "2",
       "--checkpoint-every", "0", "--dqc-lr", "0.003"]


@pytest.fixture
def source(tmp_path, capsys, tiny_checkpoint, calib_images):
    """A block-reconstruction artifact with folds (smoothing, shifts) and learned-rounding weights."""
    out = tmp_path / "recon.safetensors"
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, out), "--patches", "4", "--patch-size", "16",
                       "--batch", "2", "--granularity", "per-channel", "--smooth", "all", "--shifts", "--reconstruct",
                       "--learned-rounding", "--reconstruct-iters", "2")
    assert code == 0, err
    return out


def test_init_trains_the_bounds_and_keeps_everything_else(tmp_path, capsys, tiny_checkpoint, calib_images, source):
    out = tmp_path / "recon_dqc.safetensors"
    argv = [*common(tiny_checkpoint, calib_images, out), "--method", "2dquant", "--init", str(source), *DQC]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    old, new = load_artifact(source), load_artifact(out)
    assert new.meta["method"] == "2dquant" and new.meta["method_options"]["init_method"] == "dobi"
    assert new.meta["init"] == {"artifact": source.name, "bounds_sha256": old.meta["bounds_sha256"]}
    assert new.meta["method_options"]["dqc"]["config"]["iters"] == 3
    assert new.meta["method_options"]["reconstruct"] == old.meta["method_options"]["reconstruct"]
    for key in ("quant_config", "transforms", "calibration", "checkpoint_sha256", "model"):
        assert new.meta[key] == old.meta[key], key
    assert new.bounds.keys() == old.bounds.keys()
    kept = [k for k in old.bounds if k.startswith((TRANSFORMS_PREFIX, WEIGHTS_PREFIX))]
    assert kept and all(torch.equal(old.bounds[k], new.bounds[k]) for k in kept)
    moved = [k for k in old.bounds if k not in kept and not torch.equal(old.bounds[k], new.bounds[k])]
    assert moved  # DQC trained the reconstruction's bounds

    # the new artifact is the trained model bit for bit: DQC in process on the same configs gives the same outputs
    trained = load_quantized_model(tiny_checkpoint, source, bake=False)
    config, data, dqc_run = dqc_configs_from_args(build_parser().parse_args(argv), images=list_images(calib_images))
    config = dataclasses.replace(config, train_folds=False)
    run_dqc(trained, config, data, dataclasses.replace(dqc_run, checkpoint=None), progress=False)  # no file: same values
    trained_bounds = bounds_state(trained)
    assert all(torch.equal(trained_bounds[k], new.bounds[k]) for k in trained_bounds)
    lr = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = trained(lr), load_quantized_model(tiny_checkpoint, out)(lr)
        before = load_quantized_model(tiny_checkpoint, source)(lr)
    assert torch.equal(got, expected)
    assert not torch.equal(before, expected)  # negative control: the source artifact is another model


@pytest.mark.parametrize("extra, message", [
    (["--method", "dobi"], "refining an artifact is DQC's work: add --method 2dquant"),
    (["--method", "2dquant", "--bits", "3"], "--bits would not be used (drop it)"),
    (["--method", "2dquant", "--smooth", "all", "--reconstruct"], "--smooth, --reconstruct would not be used"),
    (["--method", "2dquant", "--learned-rounding"], "--learned-rounding would not be used"),
    (["--method", "2dquant", "--patches", "8"], "--patches would not be used"),
])
def test_options_of_stages_that_do_not_run_are_refused(tmp_path, capsys, tiny_checkpoint, calib_images, extra,
                                                       message):
    init = tmp_path / "a.safetensors"   # refused before it is read
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, tmp_path / "b.safetensors"), "--init", str(init),
                       *extra)
    assert code == 2
    assert message in err.splitlines()[-1]
    assert not (tmp_path / "b.safetensors").exists()


def test_out_must_be_a_new_artifact(tmp_path, capsys, tiny_checkpoint, calib_images):
    init = tmp_path / "a.safetensors"
    code, _, err = run(capsys, "--weights", str(tiny_checkpoint), "--method", "2dquant", "--init", str(init))
    assert code == 2 and "--init: name the new artifact with --out" in err
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, init), "--method", "2dquant", "--init", str(init))
    assert code == 2 and f"--out {init} is the --init artifact" in err


def test_a_missing_init_artifact_fails_naming_it(tmp_path, capsys, tiny_checkpoint, calib_images):
    init, out = tmp_path / "missing.safetensors", tmp_path / "b.safetensors"
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, out), "--method", "2dquant", "--init", str(init),
                       *DQC)
    assert code == 1
    assert f"artifact file {init} does not exist" in err.splitlines()[-1]
    assert not out.exists()


def test_resuming_from_another_init_artifact_is_refused(tmp_path, capsys, tiny_checkpoint, calib_images, source):
    """The DQC checkpoint's run hash covers the starting bounds and folds: a resume that names a different
    ``--init`` than the interrupted run fails instead of mixing two runs; the same ``--init`` resumes."""
    checkpoint = tmp_path / "run.dqc-checkpoint.safetensors"
    dqc = [*DQC, "--checkpoint-every", "1", "--dqc-checkpoint", str(checkpoint)]   # the last --checkpoint-every wins
    first = tmp_path / "first.safetensors"
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, first), "--method", "2dquant", "--init",
                       str(source), *dqc)
    assert code == 0, err
    assert checkpoint.is_file()
    other = tmp_path / "other.safetensors"   # another artifact of the same model: the first run's output
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, other), "--method", "2dquant", "--init",
                       str(first), *dqc, "--resume")
    assert code != 0
    assert "different DQC run" in err.splitlines()[-1] and "starting bounds" in err.splitlines()[-1], err
    assert not other.exists()
    again = tmp_path / "again.safetensors"   # negative control: the same --init resumes the finished run
    code, _, err = run(capsys, *common(tiny_checkpoint, calib_images, again), "--method", "2dquant", "--init",
                       str(source), *dqc, "--resume")
    assert code == 0, err
    resumed, trained = load_artifact(again).bounds, load_artifact(first).bounds
    assert resumed.keys() == trained.keys() and all(torch.equal(resumed[k], v) for k, v in trained.items())
