"""The PTQ grid's result handling: merging result files and the per-cell difference table."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ptq_grid  # noqa: E402


def _cell(scale, method, bits, set_name, psnr):
    return {"scale": scale, "method": method, "bits": bits, "set": set_name, "psnr": psnr, "ssim": 0.5,
            "images": 5, "eval_s": 1.0, "cmd": ""}


def test_merge_keeps_existing_cells_and_filters_methods():
    data = {"cells": [_cell(2, "2dquant", 4, "Set5", 30.0)], "calibrations": {"a": {"seconds": 1}}}
    other = {"cells": [_cell(2, "2dquant", 4, "Set5", 99.0), _cell(2, "FP", 32, "Set5", 38.0),
                       _cell(2, "dobi", 4, "Set5", 27.0)], "calibrations": {"a": {"seconds": 2}, "b": {"seconds": 3}}}
    ptq_grid.merge(data, other, {"2dquant", "FP"})
    assert [(c["method"], c["psnr"]) for c in data["cells"]] == [("2dquant", 30.0), ("FP", 38.0)]
    assert data["calibrations"] == {"a": {"seconds": 1}, "b": {"seconds": 3}}


def test_delta_table_rows_and_missing_cells():
    data = {"cells": [_cell(2, "FP", 32, "Set5", 38.0), _cell(2, "2dquant", 4, "Set5", 30.5),
                      _cell(2, "2dquant", 4, "Set14", 28.0), _cell(2, "2dquant+pc", 4, "Set5", 33.25),
                      _cell(3, "2dquant", 3, "Set5", 21.0)], "calibrations": {}}
    lines = ptq_grid.delta_table(data, "2dquant").splitlines()
    assert lines[0] == "| scale | W/A | set | FP | 2dquant | 2dquant+pc (Δ dB) |"
    assert lines[1].count("---") == 6
    assert lines[2:] == ["| x2 | W4A4 | Set5 | 38.00 | 30.50 | +2.75 |",
                         "| x2 | W4A4 | Set14 | – | 28.00 | – |",
                         "| x3 | W3A3 | Set5 | – | 21.00 | – |"]
