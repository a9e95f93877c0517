"""``torch.distributed`` helpers for DQC: one process, or several launched by ``torchrun``.

DQC trains only the quantizer bounds (a few hundred scalars), so data parallelism needs no DDP
wrapper: every rank runs its share of the global batch, the bound gradients are summed with one
``all_reduce`` of a flat buffer, and every rank takes the same Adam step from the same gradient, so
the bounds stay identical on every rank. Only rank 0 writes files and shows progress.

Backends: ``gloo`` for CPU, ``nccl`` for CUDA. Under ``torchrun`` the environment carries
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; each rank then uses
``cuda:<LOCAL_RANK>`` when the requested device is CUDA.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world`` processes, running on ``device``.

    ``world == 1`` is the plain single-process run; every collective below is then a no-op.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    #: whether :func:`init_from_env` created the process group (then :func:`shutdown` destroys it)
    owned: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this rank writes checkpoints, artifacts and progress (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu", init_method: Optional[str] = None) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, or run alone.

    With ``WORLD_SIZE`` unset or 1 (and no group already initialized) this returns a single-process
    context on ``device``. Otherwise it initializes the default group (if not already done) with
    the backend of ``device`` and, for CUDA, picks ``cuda:<LOCAL_RANK>``.

    >>> "WORLD_SIZE" in os.environ, init_from_env("cpu").world
    (False, 1)
    """
    device = torch.device(device)
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext(0, 1, device)
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed")
        rank = int(os.environ.get("RANK", "0"))
        dist.init_process_group(backend_for(device), init_method=init_method or "env://",
                                rank=rank, world_size=world)
        owned = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        torch.cuda.set_device(device)
    log.info("distributed: rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return DistContext(rank, world, device, owned)


def is_main_process() -> bool:
    """Whether this process is rank 0 (of a live group, else of ``torchrun``'s ``RANK``, else alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shutdown(context: DistContext) -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    if context.owned and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: Sequence[int], context: DistContext) -> list[int]:
    """This rank's contiguous share of a global batch; the batch must split evenly.

    >>> shard([10, 11, 12, 13], DistContext(rank=1, world=2))
    [12, 13]
    """
    if len(indices) % context.world:
        raise ValueError(f"global batch of {len(indices)} does not split evenly over {context.world} processes; "
                         f"choose a batch that is a multiple of the world size")
    per_rank = len(indices) // context.world
    return list(indices[context.rank * per_rank:(context.rank + 1) * per_rank])


def sum_gradients_(parameters: Sequence[torch.Tensor], context: DistContext) -> None:
    """Sum ``.grad`` of ``parameters`` over ranks in place (one all_reduce of a flat buffer).

    Parameters without a gradient take part as zeros (and receive the sum), so every rank calls the
    collective with the same layout.
    """
    if not context.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        count = grad.numel()
        parameter.grad = flat[offset:offset + count].view_as(parameter).clone()
        offset += count


def sum_tensor(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The elementwise sum of ``values`` over ranks (a copy; ``values`` itself when alone)."""
    if not context.active:
        return values
    total = values.to(context.device, copy=True)  # nccl reduces CUDA tensors only
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def broadcast_(parameters: Sequence[torch.Tensor], context: DistContext, source: int = 0) -> None:
    """Copy ``parameters`` from rank ``source`` to every rank (in place)."""
    if not context.active:
        return
    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=source)


def barrier(context: DistContext) -> None:
    """Wait for every rank (no-op alone)."""
    if context.active:
        dist.barrier()
