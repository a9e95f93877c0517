"""The CPU speed benchmark's float baselines: the float graph with our passes, and the two ratios per runtime."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from ..tiny_models import tiny_dat

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cpu_speed  # noqa: E402


def _transposes(path: Path) -> int:
    return sum(node.op_type == "Transpose" for node in onnx.load(str(path)).graph.node)


def test_float_baselines_with_passes_and_both_ratios(tmp_path):
    files = cpu_speed.export_files("tiny-dat", lambda: tiny_dat(scale=4), "0" * 64, None, tmp_path, widths={})
    assert sorted(files) == ["fp32", "fp32-passes", "fp32-plain"]
    # the passes are real on the float graph (DAT's head split chains collapse) and exact on ORT
    assert _transposes(files["fp32-passes"]) < _transposes(files["fp32"])
    tile = torch.rand(1, 3, cpu_speed.TILE, cpu_speed.TILE, generator=torch.Generator().manual_seed(1))
    plain = cpu_speed.PlainOrt(files["fp32"], 1, 4, 1)(tile).numpy()
    passed = cpu_speed.PlainOrt(files["fp32-passes"], 1, 4, 1)(tile).numpy()
    assert plain.shape == (1, 3, 4 * cpu_speed.TILE, 4 * cpu_speed.TILE)
    np.testing.assert_allclose(passed, plain, rtol=0, atol=1e-5)

    runners = {
        "ort-fp32-plain": cpu_speed.PlainOrt(files["fp32-plain"], 1, 4, 1),
        "ort-fp32": cpu_speed.PlainOrt(files["fp32"], 1, 4, 1),
        "openvino-fp32": cpu_speed.PlainOpenVino(files["fp32"], 1, 4, 1, "f32"),
        "ort-fp32-passes": cpu_speed.PlainOrt(files["fp32-passes"], 1, 4, 1),
        "openvino-fp32-passes": cpu_speed.PlainOpenVino(files["fp32-passes"], 1, 4, 1, "f32"),
    }
    row = cpu_speed.measure("tiny-dat", runners, 1, tile_rounds=1, image_rounds=1)
    for what in ("tile", "image"):
        assert row[f"best_fp32_{what}"] in cpu_speed.FP32_BASELINES
        assert row[f"fp32_passes_{what}"] in cpu_speed.FP32_BASELINES + cpu_speed.FP32_PASSES_BASELINES
        best, ms = row[f"fp32_passes_{what}"], row[f"{what}_ms"]
        assert ms[best] == min(ms.values())  # every runner here is a float baseline
        for key in runners:  # the second set holds the first, so its best is never slower
            assert row[f"x_vs_fp32_passes_{what}"][key] <= row[f"x_vs_best_fp32_{what}"][key]
            assert row[f"x_vs_best_fp32_{what}"][key] == ms[row[f"best_fp32_{what}"]] / ms[key]
    lines = cpu_speed.table([row]).splitlines()
    assert len(lines) == 2 + len(runners)
    marked = [line.split(" | ")[2] for line in lines[2:] if "(a" in line or "b)" in line]
    assert row["best_fp32_tile"] in marked and row["fp32_passes_tile"] in marked
