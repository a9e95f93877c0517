"""A DQC run killed with SIGKILL after a checkpoint, then resumed, ends bit-identical to an uninterrupted run.

Both runs are real subprocesses of ``tests/calib/dqc_worker.py`` (tiny SwinIR x2 W4A4, DOBI, then
``run_dqc`` on 16x16 patches of T91), one thread each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest
from safetensors.torch import load_file

from calib.dqc_state import load_checkpoint
from ..processes import kill_at_first_checkpoint

WORKER = Path(__file__).with_name("dqc_worker.py")
REPO = Path(__file__).resolve().parents[2]
ITERS = 12
#: seconds a worker may take before the test gives up (startup, DOBI and 12 tiny steps take a few)
TIMEOUT = 300


def _command(images: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), "--calib-images", str(images), "--bounds-out", str(out),
            "--dqc-checkpoint", str(checkpoint), "--dqc-iters", str(ITERS), "--dqc-batch", "4", "--patch-size", "16",
            "--dqc-patch-size", "16", "--checkpoint-every", "3", "--val-every", "4", "--val-patches", "4",
            "--threads", "1", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(command: list[str]) -> dict:
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(datasets_dir: Path, tmp_path: Path):
    images = datasets_dir / "train" / "T91"
    reference = _run(_command(images, tmp_path / "reference.safetensors", tmp_path / "reference_ckpt.safetensors"))

    checkpoint = tmp_path / "killed_ckpt.safetensors"
    command = _command(images, tmp_path / "resumed.safetensors", checkpoint)
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at_first_checkpoint(process, checkpoint, TIMEOUT)
    killed_at = load_checkpoint(checkpoint).iteration
    assert 3 <= killed_at < ITERS and killed_at % 3 == 0
    assert not (tmp_path / "resumed.safetensors").exists()  # the killed run never finished

    resumed = _run(command + ["--resume"])
    assert resumed["result"]["resumed_from"] == killed_at
    expected, got = load_file(tmp_path / "reference.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    for key in ("iterations", "best_iteration", "best_val_loss", "validations", "last_train_losses"):
        assert resumed["result"][key] == reference["result"][key], key
    # the final checkpoints agree too (bounds and Adam's moments)
    final_reference = load_checkpoint(tmp_path / "reference_ckpt.safetensors")
    final_resumed = load_checkpoint(checkpoint)
    assert final_resumed.iteration == final_reference.iteration == ITERS
    for index, entry in final_reference.optimizer["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, final_resumed.optimizer["state"][index][key]), (index, key)
