"""The whole chain through the console scripts, as a user runs it, on every model family.

calibrate -> export (lint clean; as many integer-ready MatMuls as placed linears + matmuls) ->
build the ORT engine with ``--verify`` (the criterion of ARCHITECTURE.md s. 7, both halves
reported) -> ``2dq-eval`` on the engine -> ``2dq-upscale``. Tiny spandrel models (SwinIR with the
golden configuration, DAT, HAT, SRFormer; random weights) run every method; the real DAT-light x4
runs the main job (marked slow).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from toolchain.quant import QuantConfig, quantize_model, quantizers

from . import tiny_models


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(*cmd: str) -> subprocess.CompletedProcess:
    done = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def _both_inputs_dequantized(path: Path) -> int:
    """MatMul/Gemm nodes whose two inputs are both DequantizeLinear outputs."""
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(node.op_type in ("MatMul", "Gemm") and all(i in dequantized for i in node.input[:2])
               for node in graph.node)


def chain(tmp: Path, checkpoint: Path, datasets: Path, scale: int, tile: int, *calibrate: str) -> dict:
    artifact = tmp / "q.safetensors"
    _run("2dq-calibrate", "--weights", str(checkpoint), "--calib-images", str(datasets / "train" / "DIV2K_valid_256"),
         "--out", str(artifact), "--patches", "8", "--no-progress", "-q", *calibrate)
    onnx_path = tmp / "q.onnx"
    _run("2dq-export", "--onnx", str(onnx_path), "--weights", str(checkpoint), "--calib", str(artifact),
         "--tile", str(tile), "-q")
    engine, report = tmp / "q.ort.onnx", tmp / "build.json"
    _run("2dq-build-engine", "--backend", "ort", "--onnx", str(onnx_path), "--out", str(engine), "--verify",
         "--weights", str(checkpoint), "--calib", str(artifact), "--data", str(datasets), "--sets", "Set5",
         "--no-progress", "--json", str(report), "-q")
    evaluated = tmp / "eval.json"
    _run("2dq-eval", "--backend", "ort", "--engine", str(engine), "--data", str(datasets), "--sets", "Set5",
         "--scales", str(scale), "--json", str(evaluated), "--no-progress", "-q")
    lr = datasets / "Set5" / "LR_bicubic" / f"X{scale}" / f"bird{'x'}{scale}.png"
    out = tmp / "bird_sr.png"
    _run("2dq-upscale", str(lr), "--engine", str(engine), "--out", str(out), "-q")
    return {"onnx": onnx_path, "verification": json.loads(report.read_text())["verification"],
            "eval": json.loads(evaluated.read_text()), "upscaled": out}


TINY = {
    "swinir": (tiny_models.tiny_swinir, 4, 32),
    "dat": (tiny_models.tiny_dat, 2, 64),
    "hat": (tiny_models.tiny_hat, 2, 32),
    "srformer": (tiny_models.tiny_srformer, 2, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_dobi_chain_on_every_family(family: str, tmp_path: Path, datasets_dir: Path) -> None:
    build, scale, tile = TINY[family]
    checkpoint = tiny_models.save_checkpoint(build(scale=scale), tmp_path / f"{family}.safetensors")
    placed = quantize_model(build(scale=scale), QuantConfig())
    names = quantizers(placed)
    linears = sum(name.endswith(".weight") for name in names)
    matmuls = sum(name.endswith(".a") for name in names)
    result = chain(tmp_path, checkpoint, datasets_dir, scale, tile, "--method", "dobi")
    assert _both_inputs_dequantized(result["onnx"]) == linears + matmuls
    verdict = result["verification"]
    assert verdict["passed"] and verdict["psnr_passed"] and verdict["task_passed"]
    assert verdict["psnr_vs_reference"] == "inf" or verdict["psnr_vs_reference"] >= verdict["floor"]
    assert abs(verdict["task"]["psnr_difference"]) <= 0.02
    assert result["eval"]["results"][0]["images"] == 5
    assert result["upscaled"].stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ("--method", "minmax"),
    ("--method", "2dquant", "--dqc-iters", "2", "--batch", "2", "--val-every", "0"),
    ("--method", "dobi", "--granularity", "per-channel", "--smooth", "all", "--shifts", "--input-shifts", "--gptq"),
], ids=["minmax", "2dquant", "dobi+beyond"])
def test_methods_chain_on_tiny_swinir(options: tuple, tmp_path: Path, datasets_dir: Path) -> None:
    checkpoint = tiny_models.save_checkpoint(tiny_models.tiny_swinir(scale=4), tmp_path / "swinir.safetensors")
    result = chain(tmp_path, checkpoint, datasets_dir, 4, 32, *options)
    assert result["verification"]["passed"], result["verification"]


@pytest.mark.slow
def test_main_job_chain_on_dat_light_x4(tmp_path: Path, shared_dir: Path) -> None:
    """The README's main job (DAT-light x4, W4A4, DOBI) through export, a verified engine and evaluation."""
    checkpoint = shared_dir / "models" / "DAT-light" / "DAT_light_x4.pth"
    result = chain(tmp_path, checkpoint, shared_dir / "datasets", 4, 64, "--method", "dobi", "--bits", "4")
    assert _both_inputs_dequantized(result["onnx"]) == 72 + 54
    verdict = result["verification"]
    assert verdict["passed"], verdict
    # quantization shows on real weights: the W4A4 engine is below FP (32.57) and above bicubic (28.42)
    psnr = result["eval"]["results"][0]["psnr"]
    assert 28.42 < psnr < 32.57
    assert abs(psnr - verdict["task"]["engine_psnr"]) < 0.5   # whole-image tiles vs the verifier's tiles
