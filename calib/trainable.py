"""What DQC and block reconstruction train, as one state dict: bounds, fold parameters, rounding logits.

Used for DQC's checkpoints and best state (:mod:`calib.dqc`) and block reconstruction's checkpoints
(:mod:`calib.reconstruct_state`).
"""
from __future__ import annotations

import torch
from torch import nn

from toolchain.quant import bounds_state, load_bounds

from .learned_rounding import ROUNDING_PREFIX, load_rounding_state, rounding_state
from .transforms import load_transforms_state, transforms_state

#: key prefix of fold parameters beside the bounds in the state dicts of DQC (checkpoints, best state) and of block
#: reconstruction's checkpoints
TRANSFORM_PREFIX = "transforms/"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything DQC trains: ``bounds_state`` plus the fold parameters under :data:`TRANSFORM_PREFIX` and the
    learned roundings' logits under :data:`calib.learned_rounding.ROUNDING_PREFIX` (when attached)."""
    state = dict(bounds_state(model))
    state.update({TRANSFORM_PREFIX + k: v for k, v in transforms_state(model).items()})
    state.update(rounding_state(model))
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state` (strict on every part)."""
    prefixes = (TRANSFORM_PREFIX, ROUNDING_PREFIX)
    load_bounds(model, {k: v for k, v in state.items() if not k.startswith(prefixes)})
    load_transforms_state(model, {k[len(TRANSFORM_PREFIX):]: v for k, v in state.items()
                                  if k.startswith(TRANSFORM_PREFIX)})
    load_rounding_state(model, {k: v for k, v in state.items() if k.startswith(ROUNDING_PREFIX)})


def backward(loss: torch.Tensor, model: nn.Module) -> None:
    """``loss.backward()``, with a clear error where the model's own forward writes a tensor in place that autograd
    needs (PLKSR's eval-mode partial convolution does): gradient-based calibration cannot train through it."""
    try:
        loss.backward()
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError(f"{type(model).__name__}'s forward writes into a tensor in place that gradients need, so "
                           "DQC and block reconstruction cannot train through it; calibrate it without them (DOBI, "
                           f"MinMax, percentile, GPTQ). PyTorch: {str(err).splitlines()[0][:200]}") from err
