"""Slim checkpoints: a model's tensors without the buffers its architecture rebuilds by itself.

Relative-position tables, position indices and attention masks are computed by an architecture's
constructor from its hyper-parameters (in DAT-light x4 they are 44 buffers, 41 of the official
file's 44 MB). A slim ``.safetensors`` keeps the parameters and the buffers that carry learned data
(BatchNorm statistics) and records the dropped ones (name, shape, dtype) under
:data:`REBUILT_KEY` in its metadata. Which buffers are dropped is decided on the model, not per
architecture: those that a fresh instance of the same class and hyper-parameters (spandrel's
``model.hyperparameters``) holds with equal values, and that are larger than
:data:`KEEP_BELOW_BYTES`. Small derived buffers stay: spandrel reads some of their values to infer
hyper-parameters (DAT's split size from the last row of ``rpe_biases``), while it reads only the
shapes of the large ones (masks, position indices).

Loading (:func:`toolchain.loading.load_model`) puts zero placeholders of the recorded shapes back
first, because spandrel detects some architectures by those keys (DAT among them), then copies
the real values from a fresh instance (:func:`restore_rebuilt`), so the model equals the one the
full checkpoint gives, tensor for tensor.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .files import atomic_path

#: safetensors metadata key: JSON ``{name: {"shape": [...], "dtype": "float32"}}`` of dropped buffers
REBUILT_KEY = "2dq.rebuilt_buffers"
#: derived buffers smaller than this stay in a slim file (their values may identify the architecture)
KEEP_BELOW_BYTES = 16 * 1024


def fresh_instance(model: nn.Module) -> nn.Module:
    """A new instance of ``model``'s class built from its recorded hyper-parameters (spandrel's
    ``model.hyperparameters``); its constructor computes the derived buffers."""
    hyper = getattr(model, "hyperparameters", None)
    if not isinstance(hyper, Mapping):
        raise ValueError(f"{type(model).__name__} records no hyper-parameters (spandrel models do): "
                         "its derived buffers cannot be rebuilt")
    return type(model)(**hyper)


def rebuilt_buffers(model: nn.Module) -> list[str]:
    """Names of the persistent buffers of ``model`` that a fresh instance reproduces exactly and
    that hold at least :data:`KEEP_BELOW_BYTES`."""
    state = model.state_dict()
    fresh = fresh_instance(model).state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    return [name for name, value in state.items()
            if name not in parameters and value.numel() * value.element_size() >= KEEP_BELOW_BYTES
            and name in fresh and fresh[name].shape == value.shape
            and fresh[name].dtype == value.dtype and torch.equal(fresh[name], value)]


def save_slim(model: nn.Module, path: str | os.PathLike, metadata: Optional[dict[str, str]] = None) -> dict:
    """Write ``model``'s state dict without its rebuilt buffers to ``path`` (atomically).

    Returns ``{"kept": n, "dropped": n, "bytes": size}``. ``metadata`` (strings) is stored beside
    :data:`REBUILT_KEY`.
    """
    from safetensors.torch import save_file

    dropped = set(rebuilt_buffers(model))
    state = model.state_dict()
    kept = {name: value.detach().contiguous().cpu() for name, value in state.items() if name not in dropped}
    record = {name: {"shape": list(state[name].shape), "dtype": str(state[name].dtype).removeprefix("torch.")}
              for name in state if name in dropped}
    meta = {**(metadata or {}), REBUILT_KEY: json.dumps(record, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(kept, str(tmp), metadata=meta)
    return {"kept": len(kept), "dropped": len(dropped), "bytes": Path(path).stat().st_size}


def placeholders(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Zero tensors for the buffers a slim ``path`` dropped (empty for any other checkpoint)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(REBUILT_KEY)
    if not text:
        return {}
    try:
        record = json.loads(text)
        return {name: torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
                for name, spec in record.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable {REBUILT_KEY} metadata ({err})") from None


def restore_rebuilt(model: nn.Module, names: list[str]) -> None:
    """Copy the buffers ``names`` from a fresh instance of ``model`` into ``model`` (in place)."""
    if not names:
        return
    fresh = fresh_instance(model).state_dict()
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name in names:
            buffers[name].copy_(fresh[name])
