"""Block reconstruction's checkpoint: the state after each finished block, so that a killed run resumes.

One safetensors file (written atomically after every block): the trainable state (bounds and fold
parameters, :func:`calib.trainable.trainable_state`), the learned-rounding weights so far, and JSON metadata: the
run hash (what must match to resume: configuration, blocks, patches, weights and starting bounds), the
blocks done and their results.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.files import atomic_path

from .trainable import load_trainable_state, trainable_state
from .dqc_state import run_hash, tensor_digest, weights_fingerprint

KIND = "2dq-reconstruct-checkpoint"
_STATE, _WEIGHTS = "state/", "weights/"


@dataclass
class Progress:
    """Blocks done (in order) and their results (``UnitResult`` as dicts)."""

    digest: str
    done: int
    results: list[dict[str, Any]]
    refined: dict[str, torch.Tensor]


def reconstruct_hash(model: nn.Module, patches: torch.Tensor, config: dict[str, Any], units: list[str]) -> str:
    """What a checkpoint must match: the configuration, the blocks, the patches, the weights, the starting state."""
    return run_hash({"config": config, "units": units, "patches": tensor_digest({"lr": patches}),
                     "weights": weights_fingerprint(model), "start": tensor_digest(trainable_state(model))})


def save_progress(path: str | os.PathLike, model: nn.Module, progress: Progress) -> None:
    from safetensors.torch import save_file

    tensors = {_STATE + k: v.detach().to("cpu").contiguous() for k, v in trainable_state(model).items()}
    tensors.update({_WEIGHTS + k: v.detach().to("cpu").contiguous() for k, v in progress.refined.items()})
    meta = {"kind": KIND, "hash": progress.digest, "done": str(progress.done), "results": json.dumps(progress.results)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_progress(path: str | os.PathLike, digest: str) -> tuple[Progress, dict[str, torch.Tensor]]:
    """The checkpoint's progress and trainable state; ``ValueError`` if it is another run's or not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} is not a block-reconstruction checkpoint")
        if meta.get("hash") != digest:
            raise ValueError(f"{path} holds another reconstruction run (different options, patches, weights or "
                             "starting bounds); delete it to start again")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    state = {k[len(_STATE):]: v for k, v in tensors.items() if k.startswith(_STATE)}
    refined = {k[len(_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(_WEIGHTS)}
    return Progress(digest, int(meta["done"]), json.loads(meta["results"]), refined), state


def restore_progress(model: nn.Module, state: dict[str, torch.Tensor], refined: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's bounds, fold parameters and refined weights (rounded, biases, affines) into ``model``."""
    from .float_affine import write_stored

    load_trainable_state(model, state)
    write_stored(model, refined)
