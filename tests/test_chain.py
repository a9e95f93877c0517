"""The whole chain through the console scripts, as a user runs it, on every model family.

calibrate -> export (lint clean; as many integer-ready MatMuls as placed linears + matmuls) ->
build the ORT engine with ``--verify`` (the criterion of ARCHITECTURE.md s. 7, both halves
reported) -> ``2dq-eval`` on the engine -> ``2dq-upscale``. Tiny spandrel models (SwinIR with the
golden configuration, DAT, HAT, SRFormer; random weights) run every method; the real NGswin x2 runs DOBI W4A4 (marked slow). The main job on DAT-light x4 runs in tests/test_readme.py, as the
README writes it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from toolchain.quant import QuantConfig, quantize_model, quantizers
from toolchain.tolerances import TASK_PSNR_TOLERANCE

from . import tiny_models


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(*cmd: str) -> subprocess.CompletedProcess:
    done = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def _both_inputs_dequantized(path: Path) -> int:
    """MatMul/Gemm/Conv nodes whose two inputs are both DequantizeLinear outputs."""
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(node.op_type in ("MatMul", "Gemm", "Conv") and all(i in dequantized for i in node.input[:2])
               for node in graph.node)


def chain(tmp: Path, checkpoint: Path, datasets: Path, scale: int, tile: int, *calibrate: str,
          report: bool = True, verify: tuple[str, ...] = ()) -> dict:
    """calibrate -> export -> build with --verify -> eval -> upscale (-> report); each tool as a subprocess."""
    artifact = tmp / "q.safetensors"
    _run("2dq-calibrate", "--weights", str(checkpoint), "--calib-images", str(datasets / "train" / "DIV2K_valid_256"),
         "--out", str(artifact), "--patches", "8", "--no-progress", "-q", *calibrate)
    onnx_path = tmp / "q.onnx"
    _run("2dq-export", "--onnx", str(onnx_path), "--weights", str(checkpoint), "--calib", str(artifact),
         "--tile", str(tile), "-q")
    engine, built = tmp / "q.ort.onnx", tmp / "build.json"
    _run("2dq-build-engine", "--backend", "ort", "--onnx", str(onnx_path), "--out", str(engine), "--verify",
         "--weights", str(checkpoint), "--calib", str(artifact), "--data", str(datasets), "--sets", "Set5",
         "--no-progress", "--json", str(built), "-q", *verify)
    evaluated = tmp / "eval.json"
    _run("2dq-eval", "--backend", "ort", "--engine", str(engine), "--data", str(datasets), "--sets", "Set5",
         "--scales", str(scale), "--json", str(evaluated), "--no-progress", "-q")
    lr = datasets / "Set5" / "LR_bicubic" / f"X{scale}" / f"bird{'x'}{scale}.png"
    out = tmp / "bird_sr.png"
    _run("2dq-upscale", str(lr), "--engine", str(engine), "--out", str(out), "-q")
    pages = tmp / "report"
    if report:
        _run("2dq-report", "--weights", str(checkpoint), "--calib", str(artifact), "--data", str(datasets),
             "--sets", "Set5", "--max-images", "2", "--crops", "1", "--top", "2", "--out-dir", str(pages),
             "--no-progress", "-q")
    return {"onnx": onnx_path, "verification": json.loads(built.read_text())["verification"],
            "eval": json.loads(evaluated.read_text()), "upscaled": out,
            "report": json.loads((pages / "report.json").read_text()) if report else None}


#: the tiny random-weight models agree with themselves near 100 dB under noise: one noise draw sets their floor (the
#: default 4 draws, which measure a task spread a 4-bit real model has, run in the README main job on DAT-light)
ONE_DRAW = ("--noise-draws", "1")

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
    report = family == "swinir"   # the report's own chain, once (real weights: tests/test_readme.py); CI time
    result = chain(tmp_path, checkpoint, datasets_dir, scale, tile, "--method", "dobi", report=report, verify=ONE_DRAW)
    assert _both_inputs_dequantized(result["onnx"]) == linears + matmuls
    verdict = result["verification"]
    assert verdict["passed"] and verdict["psnr_passed"] and verdict["task_passed"]
    assert verdict["psnr_vs_reference"] == "inf" or verdict["psnr_vs_reference"] >= verdict["floor"]
    assert abs(verdict["task"]["psnr_difference"]) <= TASK_PSNR_TOLERANCE
    assert result["eval"]["results"][0]["images"] == 5
    assert result["upscaled"].stat().st_size > 0
    if report:
        assert (tmp_path / "report" / "index.html").stat().st_size > 0
        assert len(result["report"]["quantizers"]) == len(names)   # the report covers every placed quantizer


@pytest.mark.slow
@pytest.mark.parametrize("options", [   # MinMax bounds deploy as DOBI's do (same artifact format): left out for CI time
    ("--method", "2dquant", "--dqc-iters", "2", "--dqc-batch", "2", "--val-every", "0"),
    ("--method", "dobi", "--granularity", "per-channel", "--smooth", "all", "--shifts", "--input-shifts", "--gptq"),
], ids=["2dquant", "dobi+beyond"])
def test_methods_chain_on_tiny_swinir(options: tuple, tmp_path: Path, datasets_dir: Path) -> None:
    checkpoint = tiny_models.save_checkpoint(tiny_models.tiny_swinir(scale=4), tmp_path / "swinir.safetensors")
    result = chain(tmp_path, checkpoint, datasets_dir, 4, 32, *options, report=False,   # the report: the family test
                   verify=ONE_DRAW)
    assert result["verification"]["passed"], result["verification"]


def _placed_calls(checkpoint: Path, tile: int) -> int:
    """Calls of placed linears and matmuls in one forward of a ``tile`` x ``tile`` input (the default placement of
    ``checkpoint``'s model; :func:`placed_calls`)."""
    from toolchain import load_model

    return placed_calls(quantize_model(load_model(checkpoint), QuantConfig()), tile)


def placed_calls(model, tile: int) -> int:
    """Calls of ``model``'s placed linears, matmuls and convolutions in one forward of a ``tile`` x ``tile`` input: a
    module called several times (NGswin reuses some linears) is one site but as many integer nodes in the graph."""
    import torch

    from toolchain.quant import QuantConv2d, QuantLinear, QuantMatMul, float_mode

    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, (QuantLinear, QuantMatMul, QuantConv2d))]
    try:
        with torch.no_grad(), float_mode(model):
            model(torch.rand(1, 3, tile, tile))
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("model, scale, floor, fp", [
    # NGswin x2 W4A4 DOBI falls below bicubic (27.6 dB here; ARCHITECTURE.md s. 7 records 27.8): bicubic is no floor.
    # DAT-light x2 (its W4A4 DOBI Set5 above bicubic's 33.66 dB) ran here too and passed; it is left out of CI for time
    # (209 s): DAT-light's chain on real weights is the README main job (x4), x2 real weights are NGswin's
    ("NGswin/NGswin_x2.pth", 2, 20.0, 38.05),
], ids=["ngswin_x2"])
def test_chain_on_real_x2_weights(model: str, scale: int, floor: float, fp: float, tmp_path: Path,
                                  shared_dir: Path) -> None:
    """The other real checkpoints (official weights) through the same chain at W4A4 DOBI.

    The engine passes ARCHITECTURE.md s. 7 (NGswin's floor comes from its own noise floor, far below
    60 dB at 4 bits), its MatMuls are integer wherever placement put quantizers, and quantization shows
    (Set5 below FP). The report runs on real weights in tests/test_readme.py; two noise draws here keep
    CI short (x2 images are four times the x4 pixels).
    """
    checkpoint = shared_dir / "models" / model
    result = chain(tmp_path, checkpoint, shared_dir / "datasets", scale, 64, "--method", "dobi", "--bits", "4",
                   report=False, verify=("--noise-draws", "2"))
    assert _both_inputs_dequantized(result["onnx"]) == _placed_calls(checkpoint, 64)
    verdict = result["verification"]
    assert verdict["passed"] and verdict["task_passed"], verdict
    psnr = result["eval"]["results"][0]["psnr"]
    assert floor < psnr < fp
    assert abs(psnr - verdict["task"]["engine_psnr"]) < 0.5   # the same engine and tiles; whole-image eval


@pytest.mark.slow
def test_chain_on_dat_light_x4_at_w8a8(tmp_path: Path, datasets_dir: Path) -> None:
    """The shipped DAT-light x4 (official weights) at W8A8 DOBI through the same chain: the engine passes ARCHITECTURE.md
    s. 7 (W4A4 runs as the README main job, tests/test_readme.py), every placed linear and matmul is an integer
    MatMul, and 8 bits keep Set5 close to FP (32.57 dB) while still below it, and above the W4A4 main job's 30.8 dB.
    """
    from toolchain.defaults import DEFAULT_WEIGHTS

    result = chain(tmp_path, DEFAULT_WEIGHTS, datasets_dir, 4, 64, "--method", "dobi", "--bits", "8",
                   report=False, verify=("--noise-draws", "2"))
    assert _both_inputs_dequantized(result["onnx"]) == _placed_calls(DEFAULT_WEIGHTS, 64)
    verdict = result["verification"]
    assert verdict["passed"] and verdict["psnr_passed"] and verdict["task_passed"], verdict
    psnr = result["eval"]["results"][0]["psnr"]
    assert 32.0 < psnr < 32.57, psnr
    assert abs(psnr - verdict["task"]["engine_psnr"]) < 0.5   # the same engine and tiles; whole-image eval
