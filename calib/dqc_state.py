"""DQC's resumable state: the data order, the run hash, and atomic checkpoints.

Resume is exact because nothing in a DQC run consumes a random stream: the patches of iteration
``t`` are a pure function of ``(seed, t)`` (:func:`global_indices`; each rank takes its slice), the
dataset's item ``i`` is a pure function of its own seed and ``i``, and the forward passes are
deterministic. A checkpoint therefore needs the bounds, Adam's moments, the LR scheduler, the
iteration (= the data position), the best validation bounds, the loss history and a hash of the run
configuration, nothing else.

File format: one ``.safetensors`` file (tensors: ``bounds.*``, ``best.*``, ``optimizer.<i>.<key>``)
whose header metadata holds the JSON of everything else under ``"dqc"``. It is written through
:func:`toolchain.files.atomic_path`, so a run killed while saving leaves the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from toolchain.files import atomic_path
from toolchain.quant import bound_parameters

log = logging.getLogger(__name__)

FORMAT = "2dq-dqc-checkpoint/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a different run configuration than the one resuming it."""


@dataclass
class TrainingState:
    """Everything a DQC run needs to continue after ``iteration`` completed steps.

    ``bounds`` / ``best_bounds`` map ``"<quantizer>.lower|upper"`` to tensors (``bounds_state``);
    ``optimizer`` and ``scheduler`` are the ``state_dict()`` of Adam and of the LR scheduler;
    ``train_losses`` holds ``[l1, feature]`` per completed iteration; ``validations`` one dict per
    validation pass.
    """

    iteration: int
    run_hash: str
    bounds: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    best_iteration: Optional[int] = None
    best_val_loss: Optional[float] = None
    best_bounds: Optional[dict[str, torch.Tensor]] = None
    train_losses: list[list[float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    world: int = 1


def run_hash(description: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a run description (what must match to resume)."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor but the bounds and fold parameters of ``model``'s state dict (names, dtypes, shapes, bytes)."""
    from .transforms import transform_parameters  # fold parameters train with the bounds: not "weights"

    bound_ids = {id(p) for p in bound_parameters(model) + transform_parameters(model)}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in bound_ids:
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (sorted names, float32 bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        data = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode() + data.numpy().tobytes())
    return digest.hexdigest()


def global_indices(seed: int, iteration: int, batch: int, length: int) -> list[int]:
    """Dataset indices of the global batch of ``iteration`` (1-based): a pure function of its arguments.

    The training stream walks through the dataset in epochs; epoch ``e`` is a permutation drawn from
    a generator seeded by ``(seed, e)``, so any iteration's batch is computed without replaying the
    ones before it.

    >>> global_indices(0, 3, 4, 10) == global_indices(0, 3, 4, 10)
    True
    """
    if length <= 0:
        raise ValueError("the DQC training dataset is empty")
    if iteration < 1 or batch < 1:
        raise ValueError(f"iteration and batch must be positive, got {iteration}, {batch}")
    first = (iteration - 1) * batch
    indices: list[int] = []
    permutations: dict[int, torch.Tensor] = {}
    for sample in range(first, first + batch):
        epoch, position = divmod(sample, length)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(_mix(seed, epoch))
            permutations[epoch] = torch.randperm(length, generator=generator)
        indices.append(int(permutations[epoch][position]))
    return indices


def _mix(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"2dq-dqc-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def save_checkpoint(path: str | os.PathLike, state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically (safetensors tensors + JSON metadata)."""
    from safetensors.torch import save_file

    tensors = {f"bounds.{k}": _plain(v) for k, v in state.bounds.items()}
    if state.best_bounds is not None:
        tensors.update({f"best.{k}": _plain(v) for k, v in state.best_bounds.items()})
    optimizer_state = {}
    for index, entry in state.optimizer["state"].items():
        optimizer_state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = _plain(value)
            else:
                optimizer_state[str(index)][key] = value
    meta = {
        "format": FORMAT,
        "iteration": state.iteration,
        "run_hash": state.run_hash,
        "world": state.world,
        "optimizer_state": optimizer_state,
        "optimizer_param_groups": state.optimizer["param_groups"],
        "scheduler": state.scheduler,
        "best_iteration": state.best_iteration,
        "best_val_loss": state.best_val_loss,
        "train_losses": state.train_losses,
        "validations": state.validations,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dqc": json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike, expected_hash: Optional[str] = None) -> TrainingState:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: not a DQC checkpoint (or damaged).
        CheckpointMismatchError: ``expected_hash`` given and different from the stored run hash.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DQC checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = json.loads((handle.metadata() or {}).get("dqc", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for each kind of damage
        raise ValueError(f"{path}: not a readable DQC checkpoint ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a DQC checkpoint (expected format {FORMAT!r})")
    if expected_hash is not None and meta["run_hash"] != expected_hash:
        raise CheckpointMismatchError(
            f"{path} was written by a different DQC run (configuration, data, model weights, starting bounds or "
            f"quantizers differ: hash {meta['run_hash'][:12]} != {expected_hash[:12]}); resume with the "
            f"same options or start afresh with another checkpoint path"
        )
    optimizer_state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["optimizer_state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return TrainingState(
        iteration=int(meta["iteration"]),
        run_hash=meta["run_hash"],
        bounds={k[len("bounds."):]: v for k, v in tensors.items() if k.startswith("bounds.")},
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer_param_groups"]},
        scheduler=meta["scheduler"],
        best_iteration=meta["best_iteration"],
        best_val_loss=meta["best_val_loss"],
        best_bounds=best or None,
        train_losses=meta["train_losses"],
        validations=meta["validations"],
        world=int(meta.get("world", 1)),
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its storage (safetensors refuses shared or strided tensors)."""
    return tensor.detach().to("cpu").contiguous().clone()


def refuse_unless_finished(checkpoint_path: str | os.PathLike, digest: str, iters: int) -> bool:
    """An existing checkpoint met without ``resume``: ``False`` (start afresh) if it holds a finished run
    of this very configuration (run hash ``digest``, ``iters`` steps); otherwise an error saying what it holds and what to do.

    Running the same command again after it finished starts the run afresh instead of reusing the
    finished state: the run hash covers options, data, weights and DOBI's bounds but not the code, so
    a rerun (after an update, or to check reproducibility) should compute; it overwrites the
    checkpoint (and the caller the artifact) atomically. ``--resume`` is the way to reuse a finished
    checkpoint: it trains no further and gives back its bounds.
    """
    previous = load_checkpoint(checkpoint_path)  # ValueError if not a DQC checkpoint: never overwritten
    if previous.run_hash != digest:
        raise FileExistsError(
            f"DQC checkpoint {checkpoint_path} was written by a run with other options, data, weights or "
            f"starting bounds (it holds {previous.iteration} steps): delete it or choose another --dqc-checkpoint "
            f"to start afresh, or continue it with its own options and --resume")
    if previous.iteration < iters:
        raise FileExistsError(
            f"DQC checkpoint {checkpoint_path} holds an interrupted run ({previous.iteration} of {iters} "
            f"steps): pass --resume to continue it, or delete it to start over")
    log.info("DQC: %s holds this run, finished (%d steps); running it again from the start (the checkpoint "
             "will be overwritten)", checkpoint_path, previous.iteration)
    return False
