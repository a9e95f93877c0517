"""Two CPU processes (``torchrun``, gloo) run DQC to the bounds one process gets on the same global batch.

Exactness: a rank computes the gradient of its half of the batch; gloo sums the two halves. One
process with ``--dqc-accumulation 2`` computes the same two half-batch gradients and sums them in
the same way, so the bounds agree bit for bit. One process on the whole batch at once sums over the
batch inside each kernel, in another order: equal within :data:`toolchain.tolerances.WHOLE_BATCH_ATOL`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calib.distributed import DistContext, shard
from calib.dqc_state import load_checkpoint
from toolchain.tolerances import WHOLE_BATCH_ATOL

WORKER = Path(__file__).with_name("dqc_worker.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def _run(command: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _options(images: Path, out: Path, checkpoint: Path) -> list[str]:
    # --val-every 0: every process ends with the bounds of the last step (no best-step selection)
    return ["--calib-images", str(images), "--bounds-out", str(out), "--dqc-checkpoint", str(checkpoint),
            "--dqc-iters", "4", "--dqc-batch", "4", "--patch-size", "16", "--dqc-patch-size", "16",
            "--checkpoint-every", "2", "--val-every", "0", "--threads", "1"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(datasets_dir: Path, tmp_path: Path):
    images = datasets_dir / "train" / "T91"
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", "2", str(WORKER), "--dobi-out", str(tmp_path / "dobi.safetensors"),
                *_options(images, tmp_path / "rank{rank}.safetensors", tmp_path / "two.safetensors")])
    one = _run([sys.executable, str(WORKER), *_options(images, tmp_path / "halves.safetensors",
                                                       tmp_path / "one.safetensors"), "--dqc-accumulation", "2"])
    _run([sys.executable, str(WORKER), *_options(images, tmp_path / "whole.safetensors",
                                                 tmp_path / "whole_ckpt.safetensors")])
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    halves, whole = load_file(tmp_path / "halves.safetensors"), load_file(tmp_path / "whole.safetensors")
    dobi = load_file(tmp_path / "dobi.safetensors")

    assert (two["processes"], one["processes"]) == (2, 1)
    assert rank0.keys() == rank1.keys() == halves.keys() == whole.keys() == dobi.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], halves[name]), name
        assert torch.allclose(rank0[name], whole[name], rtol=0, atol=WHOLE_BATCH_ATOL), name
    # the bounds did move away from DOBI's, so the agreement is about training
    moved = sum(not torch.equal(rank0[name], dobi[name]) for name in rank0)
    assert moved > len(rank0) // 2
    # the logged losses (averaged over ranks) agree exactly as well
    assert two["result"]["first_train_losses"] == one["result"]["first_train_losses"]
    assert two["result"]["last_train_losses"] == one["result"]["last_train_losses"]
    # rank 0 wrote the checkpoint; it holds the final bounds
    saved = load_checkpoint(tmp_path / "two.safetensors")
    assert saved.iteration == 4 and saved.world == 2
    for name in rank0:
        assert torch.equal(saved.bounds[name], rank0[name]), name


def test_shard_splits_a_global_batch_by_rank():
    batch = [5, 1, 4, 0, 2, 3]
    shares = [shard(batch, DistContext(rank, 3)) for rank in range(3)]
    assert shares == [[5, 1], [4, 0], [2, 3]]
    try:
        shard(batch, DistContext(0, 4))
    except ValueError as err:
        assert "multiple of the world size" in str(err)
    else:
        raise AssertionError("an uneven split must be refused")
