"""The PTQ grid: merging result files, the per-cell difference table, and remaking lost artifacts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from calib.dqc_cli import CHECKPOINT_SUFFIX

from ..tiny_models import save_checkpoint, tiny_swinir

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
    assert lines[:3] == ["PSNR difference from 2dquant, per cell (dB):", "",
                         "| scale | W/A | set | FP | 2dquant | 2dquant+pc (Δ dB) |"]
    assert lines[3].count("---") == 6
    assert lines[4:] == ["| x2 | W4A4 | Set5 | 38.00 | 30.50 | +2.75 |",
                         "| x2 | W4A4 | Set14 | – | 28.00 | – |",
                         "| x3 | W3A3 | Set5 | – | 21.00 | – |"]


def test_remake_table_pairs_the_first_run_with_the_remake_and_merge_carries_it():
    first = [_cell(2, "2dquant+pc", 3, "Set14", 28.5), _cell(2, "2dquant+pc", 3, "Set5", 31.0)]
    data = {"cells": [_cell(2, "2dquant+pc", 3, "Set5", 32.75), _cell(2, "2dquant+pc", 3, "Set14", 28.0),
                      _cell(2, "2dquant+pc", 3, "B100", 27.0)], "calibrations": {}}
    other = {"cells": [], "calibrations": {},
             "superseded": [{"key": "x2_2dquant+pc_w3a3", "reason": "r", "calibration": {}, "cells": first}]}
    ptq_grid.merge(data, other, {"dobi"})
    assert "superseded" not in data  # filtered out with its method
    ptq_grid.merge(data, other)
    ptq_grid.merge(data, other)  # not twice
    assert len(data["superseded"]) == 1
    lines = ptq_grid.remake_table(data).splitlines()
    assert lines[4:] == ["| x2 | W3A3 | 2dquant+pc | Set5 | 31.00 | 32.75 | +1.75 |",
                         "| x2 | W3A3 | 2dquant+pc | Set14 | 28.50 | 28.00 | -0.50 |"]


def test_reconcile_keeps_the_first_run_and_refuses_other_bounds():
    first = {"seconds": 10.0, "cmd": "a", "bounds_sha256": "h1"}
    assert ptq_grid.reconcile("k", None, first) is first
    same = {"seconds": 12.0, "cmd": "a", "bounds_sha256": "h1"}
    assert ptq_grid.reconcile("k", first, same) == {**first, "remade": same}
    with pytest.raises(SystemExit, match="k: the remade artifact's bounds"):
        ptq_grid.reconcile("k", first, {"seconds": 9.0, "cmd": "a", "bounds_sha256": "h2"})


def test_reconcile_names_the_cpus_when_a_remake_on_another_one_differs():
    first = {"seconds": 10.0, "cmd": "a", "bounds_sha256": "h1", "cpu": "Intel Xeon (AVX512)"}
    with pytest.raises(SystemExit, match=r"on another CPU \(AMD EPYC \(AVX2\); the first run: Intel Xeon"):
        ptq_grid.reconcile("k", first, {"seconds": 9.0, "cmd": "a", "bounds_sha256": "h2", "cpu": "AMD EPYC (AVX2)"})
    with pytest.raises(SystemExit) as same_cpu:
        ptq_grid.reconcile("k", first, {"seconds": 9.0, "cmd": "a", "bounds_sha256": "h2", "cpu": first["cpu"]})
    assert "another CPU" not in str(same_cpu.value)


def test_cpu_model_names_the_kernel_level():
    name = ptq_grid.cpu_model()
    assert name.endswith(f"({torch.backends.cpu.get_cpu_capability()})") and len(name) > len("()") + 3


def test_reconcile_notes_a_remake_of_a_record_without_hash(capsys):
    legacy = {"seconds": 10.0, "cmd": "a"}
    remade = {"seconds": 8.0, "cmd": "a", "bounds_sha256": "h"}
    assert ptq_grid.reconcile("x2_m_w4a4", legacy, remade) == {**legacy, "remade": remade}
    assert "x2_m_w4a4 was remade" in capsys.readouterr().err


def test_merge_notes_a_calibration_made_again_elsewhere():
    data = {"cells": [], "calibrations": {"a": {"seconds": 1}, "b": {"seconds": 1, "bounds_sha256": "h"}}}
    other = {"cells": [], "calibrations": {"a": {"seconds": 2, "bounds_sha256": "h"},
                                            "b": {"seconds": 3, "bounds_sha256": "h"}}}
    ptq_grid.merge(data, other)
    assert data["calibrations"] == {"a": {"seconds": 1, "remade": {"seconds": 2, "bounds_sha256": "h"}},
                                    "b": {"seconds": 1, "bounds_sha256": "h"}}


def test_a_lost_artifact_is_remade_with_the_same_bounds(tmp_path, datasets_dir):
    """The real ``2dq-calibrate`` (DOBI, then 2 DQC steps) on a tiny SwinIR, twice: the remake matches."""
    save_checkpoint(tiny_swinir(scale=4, seed=0, depths=[2], num_heads=[2]), tmp_path / "tiny_x4.safetensors")
    args = argparse.Namespace(
        weights=str(tmp_path / "tiny_x{scale}.safetensors"), calib_images=datasets_dir / "train" / "DIV2K_valid_256",
        work=tmp_path / "work", threads=1,
        calib_extra="--patches 4 --patch-size 16 --dqc-iters 2 --dqc-batch 2 --dqc-patch-size 16 --val-every 0 "
                    "--val-patches 2 --checkpoint-every 0")
    args.work.mkdir()
    data = ptq_grid.load(tmp_path / "none.json")
    artifact = ptq_grid.calibrate(args, 4, "2dquant", 4, data)
    first = data["calibrations"]["x4_2dquant_w4a4"]
    assert len(first["bounds_sha256"]) == 64 and "remade" not in first
    assert ptq_grid.calibrate(args, 4, "2dquant", 4, data) == artifact and data["calibrations"]["x4_2dquant_w4a4"] is first
    checkpoint = artifact.with_name("x4_2dquant_w4a4" + CHECKPOINT_SUFFIX)
    assert checkpoint.exists()
    artifact.unlink()  # the artifact lost, its finished DQC checkpoint kept: the run resumes from it
    ptq_grid.calibrate(args, 4, "2dquant", 4, data)
    record = data["calibrations"]["x4_2dquant_w4a4"]
    assert record["remade"]["cmd"].endswith("--resume")
    assert record["seconds"] == first["seconds"] and record["remade"]["bounds_sha256"] == first["bounds_sha256"]
    artifact.unlink()
    checkpoint.unlink()  # everything lost, as on a new VM of the same CPU: calibrated from scratch, same bounds
    ptq_grid.calibrate(args, 4, "2dquant", 4, data)
    again = data["calibrations"]["x4_2dquant_w4a4"]["remade"]
    assert not again["cmd"].endswith("--resume") and again["bounds_sha256"] == first["bounds_sha256"]


def test_bounds_digest_reads_the_tensors_not_the_file(tmp_path):
    bounds = {"b.upper": torch.tensor(2.0), "a.lower": torch.tensor([-1.0, 0.5])}
    save_file(bounds, str(tmp_path / "one.safetensors"), metadata={"format": "2dq-bounds", "format_version": "1"})
    save_file(dict(reversed(bounds.items())), str(tmp_path / "two.safetensors"), metadata={"other": "x"})
    digest = ptq_grid.bounds_digest(tmp_path / "one.safetensors")
    assert ptq_grid.bounds_digest(tmp_path / "two.safetensors") == digest
    save_file({**bounds, "b.upper": torch.tensor(2.0001)}, str(tmp_path / "three.safetensors"))
    assert ptq_grid.bounds_digest(tmp_path / "three.safetensors") != digest
