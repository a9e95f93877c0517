"""The peer PTQ benchmark: row selection, the batch probe of foreign ONNX graphs, the table."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_ptq  # noqa: E402


def test_selected_restricts_names_to_widths():
    spec = "minmax,dobi+pc+smooth+shifts@w4a4,dobi@w8a8+w4a4"
    assert peer_ptq.selected(spec, "w8a8", peer_ptq.OURS, "--ours") == ["minmax", "dobi"]
    assert peer_ptq.selected(spec, "w4a4", peer_ptq.OURS, "--ours") == ["minmax", "dobi+pc+smooth+shifts", "dobi"]


@pytest.mark.parametrize("spec", ["minmax,gptq", "minmax@w3a3"])
def test_selected_refuses_unknown_names_and_widths(spec):
    with pytest.raises(SystemExit, match="--ours: unknown entry"):
        peer_ptq.selected(spec, "w4a4", peer_ptq.OURS, "--ours")


def _graph(path: Path, mix_batch: bool) -> Path:
    """(N, 3, 64, 64) -> the same; with ``mix_batch`` every tile gets the mean over the whole batch added,
    as a graph traced for one tile mixes a batch up."""
    shape = ["N", 3, peer_ptq.TILE, peer_ptq.TILE]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)
    if mix_batch:
        nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1),
                 helper.make_node("Add", ["input", "mean"], ["output"])]
    else:
        nodes = [helper.make_node("Identity", ["input"], ["output"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_onnx_tiles_runs_a_batch_only_where_the_graph_keeps_tiles_apart(tmp_path):
    tiles = torch.rand(3, 3, peer_ptq.TILE, peer_ptq.TILE, generator=torch.Generator().manual_seed(0))
    honest = peer_ptq.OnnxTiles(_graph(tmp_path / "honest.onnx", False), threads=1)
    assert honest.batched
    assert torch.equal(honest(tiles), tiles)
    mixing = peer_ptq.OnnxTiles(_graph(tmp_path / "mixing.onnx", True), threads=1)
    assert not mixing.batched
    # one tile per call: each tile gets its own mean, not the batch's
    expected = tiles + tiles.mean(dim=(1, 2, 3), keepdim=True)
    np.testing.assert_allclose(mixing(tiles).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_table_reports_speed_against_fp32_and_failures():
    rows = [{"key": "fp32", "tool": "FP", "method": "float", "width": "FP32", "psnr": 32.5, "ssim": 0.9,
             "latency_ms": 200.0, "engine_ops": {"integer_kernels": 0}},
            {"key": "modelopt_default_w4a4", "tool": "ModelOpt", "method": "mtq default", "width": "W4A4",
             "psnr": 14.5, "ssim": 0.12, "calib_s": 34.8, "errors": {"engine_eval": "ORT cannot load it"}},
            {"key": "ort_minmax_w8a8", "tool": "ORT quantize_static", "method": "MinMax", "width": "W8A8",
             "psnr": 32.55, "ssim": 0.8987, "calib_s": 38.5, "latency_ms": 100.0, "engine_ops": {"integer_kernels": 126}}]
    lines = peer_ptq.table(rows).splitlines()
    assert lines[2].startswith("| FP | float | FP32 | 32.50 / 0.9000 | – | – | 200.0 | 1.00 | 0 |")
    assert lines[3] == ("| ModelOpt | mtq default | W4A4 | – | 14.50 / 0.1200 | 35 | – | – | – | "
                        "engine_eval: ORT cannot load it |")
    assert lines[4] == "| ORT quantize_static | MinMax | W8A8 | 32.55 / 0.8987 | – | 38 | 100.0 | 2.00 | 126 |  |"
