"""``2dq-calibrate`` end to end on a tiny SwinIR and real training patches; exit codes."""
from __future__ import annotations

import json

import pytest
import torch

from calib.artifact import load_artifact, load_quantized_model, sidecar_path
from calib.cli import METHODS, build_parser, main
from toolchain.quant import quantizers


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def base_args(checkpoint, images, out) -> list[str]:
    return ["--weights", str(checkpoint), "--calib-images", str(images), "--patches", "4", "--patch-size", "16",
            "--batch-size", "2", "--out", str(out), "--no-progress", "-q"]


def test_dobi_end_to_end(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "run" / "w4a4.safetensors"
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--bits", "4", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["artifact"] == str(out) and summary["method"] == "dobi"
    meta = load_artifact(out).meta
    assert meta["calibration"]["patches"] == 4 and meta["calibration"]["patch_size"] == 16
    assert meta["calibration"]["images"] == 100 and meta["calibration"]["seed"] == 0
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
])
def test_usage_errors_exit_2(tmp_path, capsys, tiny_checkpoint, calib_images, extra, message):
    args = base_args(tiny_checkpoint, calib_images, tmp_path / "a.safetensors") + extra
    code, _, stderr = run(capsys, *args)
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "a.safetensors").exists()


def test_missing_required_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", "x.pth"])
    assert exit_info.value.code == 2


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
    dqc = ["--method", "2dquant", "--dqc-iters", "3", "--batch", "2", "--dqc-patch-size", "16", "--val-every", "0",
           "--val-patches", "2", "--checkpoint-every", "0", "--lr", "0.003"]
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
