"""``2dq-calibrate`` end to end on a tiny SwinIR and real training patches; exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calib.artifact import load_artifact, load_quantized_model, sidecar_path
from calib.cli import METHODS, build_parser, main
from calib.dqc_cli import CHECKPOINT_SUFFIX
from calib.dqc_state import load_checkpoint
from toolchain.quant import quantizers
from ..processes import kill_at_first_checkpoint


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def base_args(checkpoint, images, out) -> list[str]:
    return ["--weights", str(checkpoint), "--calib-images", str(images), "--patches", "4", "--patch-size", "16",
            "--batch", "2", "--out", str(out), "--no-progress", "-q"]


def test_dobi_end_to_end(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "run" / "w4a4.safetensors"
    code, stdout, stderr = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--bits", "4", "--json", "-")
    assert code == 0
    summary = json.loads(stdout)  # --json -: stdout is the JSON alone, the text summary went to stderr
    assert f"wrote {out}" in stderr
    assert summary["artifact"] == str(out) and summary["method"] == "dobi"
    meta = load_artifact(out).meta
    assert meta["calibration"]["patches"] == 4 and meta["calibration"]["patch_size"] == 16
    assert meta["calibration"]["images"] == 28 and meta["calibration"]["seed"] == 0
    assert meta["calibration"]["batch_size"] == 2
    assert meta["method_options"]["candidates"] == 100

    model = load_quantized_model(tiny_checkpoint, out)
    assert all(q.initialized and q.enabled for q in quantizers(model).values())
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sr = model(lr)
    assert sr.shape == (1, 3, 96, 80) and torch.isfinite(sr).all()


@pytest.mark.parametrize("method, extra", [
    ("minmax", ["--granularity", "per-channel", "--target", "trt-int4", "--a-bits", "8"]),
    ("percentile", ["--percentile", "99.9", "--quantize", "linear", "--exclude", "*.fc2.*"]),
])
def test_baseline_methods(tmp_path, capsys, tiny_checkpoint, calib_images, method, extra):
    out = tmp_path / f"{method}.safetensors"
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--method", method, *extra)
    assert code == 0, stdout
    assert f"wrote {out}" in stdout
    artifact = load_artifact(out)
    assert artifact.meta["method"] == method
    model = load_quantized_model(tiny_checkpoint, out)
    names = set(quantizers(model))
    if method == "minmax":
        assert artifact.quant_config.weight_symmetric
        assert model.get_submodule("layers.0.residual_group.blocks.0.attn.qkv").weight_quantizer.lower.shape == (36, 1)
    else:
        assert artifact.meta["method_options"]["percentile"] == 99.9
        assert not any(".fc2." in name or name.endswith((".a", ".b")) for name in names)


def test_bits_overrides_give_a_mixed_precision_artifact(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "mixed.safetensors"
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--bits", "3",
                          "--bits-override", "layers.1.*=8", "--bits-override", "layers.1.*.fc2.weight=6")
    assert code == 0 and "W3A3, layers.1.*=8, layers.1.*.fc2.weight=6" in stdout
    assert load_artifact(out).quant_config.bits_overrides == ("layers.1.*=8", "layers.1.*.fc2.weight=6")
    bits = {name: q.bits for name, q in quantizers(load_quantized_model(tiny_checkpoint, out)).items()}
    assert {b for n, b in bits.items() if n.startswith("layers.0.")} == {3}
    assert {b for n, b in bits.items() if n.startswith("layers.1.") and ".fc2.weight" not in n} == {8}
    assert {b for n, b in bits.items() if n.startswith("layers.1.") and ".fc2.weight" in n} == {6}


@pytest.mark.parametrize("extra, message", [
    (["--out", "run/w4a4.bin"], ".safetensors"),
    (["--w-bits", "9"], "w_bits"),
    (["--target", "trt-int4", "--w-bits", "3"], "trt-int4"),
    (["--quantize", "linear,attention"], "quantize"),
    (["--patches", "0"], "--patches"),
    (["--percentile", "20"], "--percentile"),
    (["--include", "*.nothing.*"], "matches no quantizer"),
    (["--bits-override", "layers.1.*"], "PATTERN=BITS"),
    (["--bits-override", "*.nothing.*=8"], "bits_overrides pattern"),
    (["--bits-override", "layers.1.*=8", "--target", "trt-int4"], "trt-int4"),
    (["--learned-rounding"], "it needs one of them"),
    (["--reconstruct", "--learned-rounding", "--gptq"], "pick one"),
    (["--reconstruct", "--method", "2dquant"], "alternative to DQC"),
    (["--reconstruct", "--reconstruct-iters", "0"], "--reconstruct-iters"),
    (["--reconstruct", "--reconstruct-lr", "-1"], "--reconstruct-lr"),
    (["--reconstruct", "--reconstruct-drop", "1"], "--reconstruct-drop"),
    (["--reconstruct-affine"], "it needs --reconstruct"),
    (["--reconstruct", "--reconstruct-affine", "--affine-lr", "0"], "--affine-lr"),
    (["--reconstruct", "--rounding-grids"], "needs --reconstruct and --learned-rounding"),
    (["--method", "2dquant", "--learned-rounding", "--rounding-grids"], "needs --reconstruct and --learned-rounding"),
    (["--reconstruct", "--learned-rounding", "--rounding-grids", "--grid-lr", "0"], "--grid-lr"),
])
def test_usage_errors_exit_2(tmp_path, capsys, tiny_checkpoint, calib_images, extra, message):
    args = base_args(tiny_checkpoint, calib_images, tmp_path / "a.safetensors") + extra
    code, _, stderr = run(capsys, *args)
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "a.safetensors").exists()


def test_unparseable_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--bits", "four"])
    assert exit_info.value.code == 2
    assert "--bits" in capsys.readouterr().err


@pytest.mark.parametrize("extra, name", [
    ((), "w4a4.safetensors"),
    (("--bits", "3", "--method", "minmax"), "w3a3_minmax.safetensors"),
    (("--w-bits", "4", "--a-bits", "8"), "w4a8.safetensors"),
])
def test_default_out_names_checkpoint_bits_and_method(tmp_path, monkeypatch, capsys, tiny_checkpoint, calib_images,
                                                      extra, name):
    """Without --out the artifact goes to runs/<checkpoint stem>_w<W>a<A>[_<method>] and the tool says so."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in base_args(tiny_checkpoint, calib_images, "unused") if a not in ("--out", "unused")]
    code, stdout, _ = run(capsys, *args, *extra)
    expected = Path("runs") / f"{tiny_checkpoint.stem}_{name}"
    assert code == 0 and (tmp_path / expected).is_file() and sidecar_path(tmp_path / expected).is_file()
    assert f"wrote {expected}" in stdout


def test_runtime_failures_exit_1(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "a.safetensors"
    code, _, stderr = run(capsys, *base_args(tmp_path / "missing.pth", calib_images, out))
    assert code == 1 and "missing.pth" in stderr
    code, _, stderr = run(capsys, *base_args(tiny_checkpoint, tmp_path / "no_images", out))
    assert code == 1 and "no_images" in stderr
    assert not out.exists() and not sidecar_path(out).exists()


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert name in text
    assert "--candidates" in text and "--percentile" in text and "Exit codes" in text


def test_2dquant_runs_dobi_then_dqc_and_moves_the_bounds(tmp_path, capsys, tiny_checkpoint, calib_images):
    dobi_out, full_out = tmp_path / "dobi.safetensors", tmp_path / "2dq.safetensors"
    assert run(capsys, *base_args(tiny_checkpoint, calib_images, dobi_out))[0] == 0
    dqc = ["--method", "2dquant", "--dqc-iters", "3", "--dqc-batch", "2", "--dqc-patch-size", "16", "--val-every", "0",
           "--val-patches", "2", "--checkpoint-every", "0", "--dqc-lr", "0.003"]
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, full_out), *dqc)
    assert code == 0, stdout
    meta = load_artifact(full_out).meta
    assert meta["method"] == "2dquant" and meta["method_options"]["candidates"] == 100
    assert meta["method_options"]["dqc"]["config"]["iters"] == 3
    dobi, final = load_artifact(dobi_out).bounds, load_artifact(full_out).bounds
    assert dobi.keys() == final.keys()
    assert any(not torch.equal(dobi[k], final[k]) for k in dobi)  # DQC trained the DOBI bounds
    model = load_quantized_model(tiny_checkpoint, full_out)
    assert all(q.initialized for q in quantizers(model).values())


CALIBRATE = str(Path(sys.executable).with_name("2dq-calibrate"))
#: seconds a console-script run may take (startup and a tiny DOBI take a few)
TIMEOUT = 300
#: the tiny 2DQuant budget of the rerun tests (seconds per run)
TINY_DQC = ["--method", "2dquant", "--dqc-iters", "2", "--dqc-batch", "2", "--dqc-patch-size", "16", "--val-every", "0"]


@pytest.fixture
def random_images(tmp_path) -> Path:
    """A folder of four random 96x96 RGB PNGs (no dependence on ../shared)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tmp_path, tiny_swinir, save_checkpoint, random_images):
    """Through the console script: exit 1, one line naming the file and the tensor, no artifact."""
    model = tiny_swinir(0)
    name = "layers.0.residual_group.blocks.0.mlp.fc1.weight"
    with torch.no_grad():
        model.get_parameter(name)[2, 7] = float("nan")
    checkpoint = save_checkpoint(model, tmp_path / "damaged.safetensors")
    out = tmp_path / "run" / "w4a4.safetensors"
    done = subprocess.run([CALIBRATE, *base_args(checkpoint, random_images, out), "--threads", "1"],
                          capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (f"2dq-calibrate: error: {checkpoint}: tensor '{name}' holds 1 non-finite "
                                            "value (1 nan); the checkpoint is damaged")
    assert not out.exists() and not sidecar_path(out).exists() and not out.parent.exists()


def test_a_finished_2dquant_run_runs_again_with_the_same_command(tmp_path, capsys, tiny_checkpoint, random_images):
    """The same command twice: the second run computes afresh (no --resume needed) and gives the same bounds."""
    out = tmp_path / "2dq.safetensors"
    checkpoint = out.with_name("2dq" + CHECKPOINT_SUFFIX)
    command = [*base_args(tiny_checkpoint, random_images, out), *TINY_DQC]
    assert run(capsys, *command)[0] == 0
    first, first_inodes = load_artifact(out).bounds, (out.stat().st_ino, checkpoint.stat().st_ino)
    assert load_checkpoint(checkpoint).iteration == 2
    code, stdout, stderr = run(capsys, *command)
    assert code == 0, stderr
    again = load_artifact(out)
    assert again.meta["method_options"]["dqc"]["result"]["resumed_from"] is None  # trained, not reused
    assert (out.stat().st_ino, checkpoint.stat().st_ino) != first_inodes  # both rewritten (atomically)
    assert first.keys() == again.bounds.keys()
    for key in first:
        assert torch.equal(first[key], again.bounds[key]), key


def test_an_interrupted_2dquant_run_asks_for_resume(tmp_path, capsys, tiny_checkpoint, random_images):
    """A run killed (SIGKILL) after a checkpoint: the same command without --resume exits 1 saying how far it got."""
    out = tmp_path / "2dq.safetensors"
    checkpoint = out.with_name("2dq" + CHECKPOINT_SUFFIX)
    iters = 200  # far more steps than the run can take before the kill
    command = [*base_args(tiny_checkpoint, random_images, out), *TINY_DQC, "--dqc-iters", str(iters),
               "--checkpoint-every", "1"]
    process = subprocess.Popen([CALIBRATE, *command, "--threads", "1"], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    kill_at_first_checkpoint(process, checkpoint, TIMEOUT)
    done = load_checkpoint(checkpoint).iteration
    assert 1 <= done < iters and not out.exists()

    code, _, stderr = run(capsys, *command)
    assert code == 1
    assert stderr.splitlines()[-1] == (
        f"2dq-calibrate: error: DQC checkpoint {checkpoint} holds an interrupted run ({done} of {iters} steps): "
        "pass --resume to continue it, or delete it to start over")
    assert load_checkpoint(checkpoint).iteration == done and not out.exists()  # nothing touched


def test_reconstruct_with_learned_rounding_writes_its_weights(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "r.safetensors"
    code, _, stderr = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--bits", "3", "--granularity",
                          "per-channel", "--reconstruct", "--learned-rounding", "--reconstruct-iters", "5")
    assert code == 0, stderr
    meta = load_artifact(out).meta
    facts = meta["method_options"]["reconstruct"]
    assert facts["blocks"] == 2 and facts["config"]["rounding"] and facts["config"]["iters"] == 5
    assert facts["end_mse"] <= facts["start_mse"]
    assert meta["refined_weights"] == 8 * facts["improved"]  # four linears per block, in each block kept
    assert not (tmp_path / "r.reconstruct-checkpoint.safetensors").exists()  # written per block, gone once saved
    model = load_quantized_model(tiny_checkpoint, out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 16, 16))).all()
