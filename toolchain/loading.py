"""Reading checkpoints safely and building the model they belong to.

Only plain tensor files are read: ``.safetensors``, or PyTorch files through
``torch.load(weights_only=True)``, which refuses pickles that would construct arbitrary objects.
The architecture is found by asking each module of :func:`toolchain.models.architectures`
whether the tensors are its own; its configuration is inferred from tensor shapes.

Only learnable tensors are taken from a checkpoint. Buffers it stores (attention masks, relative
position indices, ...) are dropped and recomputed by the model: they are derived data, and a stale
or tampered one would silently change the output. An architecture module may list such stored
names in ``STORED_BUFFERS`` (last component of the key); the model's own buffers are dropped too.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

log = logging.getLogger(__name__)

# BasicSR-style files nest the weights; the EMA copy is the one the official tests evaluate.
NESTED_KEYS = ("params_ema", "params")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pth`` checkpoint, on CPU, as stored.

    ``.pth`` files may hold the dict bare or under ``params_ema`` / ``params`` (preferred in
    that order, as the official SwinIR test script does).

    Raises:
        CheckpointError: missing, empty, truncated or foreign file; pickled non-tensor objects
            (refused without being constructed); anything but a dict of named tensors.

    >>> state_dict = read_state_dict("SwinIR-light_x4.pth")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    where = str(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for every kind of damage
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        tensors = _torch_load(path)
        if isinstance(tensors, Mapping):
            for key in NESTED_KEYS:
                if key in tensors:
                    tensors, where = tensors[key], f"{path}[{key!r}]"
                    break
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{where}: holds a {type(tensors).__name__}, not a dict of tensors")
    bad = [str(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a dict of named tensors; these entries are not: {compact_names(bad)}")
    if not tensors:
        raise CheckpointError(f"{where}: holds no tensors")
    return dict(tensors)


def _torch_load(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers, with errors that name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            # Deliberately not chained: torch's text suggests retrying with weights_only=False.
            raise CheckpointError(
                f"{path}: refused: not a plain tensor checkpoint (it pickles Python objects other "
                "than tensors and plain containers, and loading it could run code)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format: "
            f"{type(err).__name__}: {str(err)[:200]})"
        ) from err


def architecture_of(state_dict: Mapping[str, torch.Tensor], where: str = "checkpoint") -> ModuleType:
    """The first architecture module whose ``matches`` accepts these tensors."""
    from .models import architectures

    modules = architectures()
    for module in modules:
        if module.matches(state_dict):
            return module
    names = ", ".join(module.ARCH for module in modules)
    first = ", ".join(list(state_dict)[:3])
    raise CheckpointError(f"{where}: its tensors ({first}, ...) match no known architecture ({names})")


def load_model(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", **overrides
) -> nn.Module:
    """The model a checkpoint belongs to, with its weights, in eval mode, float32, on ``device``.

    ``overrides`` replace entries of the inferred configuration (e.g. ``img_range=255.0``); they
    must name keys of that configuration.

    Raises:
        CheckpointError: unreadable file, unknown architecture, or learnable tensors missing,
            unexpected or of the wrong shape (all named).
        ValueError: an override that is not a configuration key.

    >>> model = load_model("SwinIR-light_x4.pth")              # doctest: +SKIP
    >>> model.arch, model.scale, model.config["embed_dim"]     # doctest: +SKIP
    ('swinir', 4, 60)
    """
    state_dict = read_state_dict(path)
    module = architecture_of(state_dict, str(path))
    try:
        config = module.config_from_state_dict(state_dict)
    except ValueError as err:
        raise CheckpointError(f"{path}: looks like {module.ARCH} but cannot be configured: {err}") from err
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {module.ARCH}; known: {sorted(config)}")
    config.update(overrides)
    model = module.build(**config)
    dropped = load_learnable(model, state_dict, getattr(module, "STORED_BUFFERS", ()), str(path))
    log.info("loaded %s %s from %s (%d stored buffers recomputed)", module.ARCH, config, path, dropped)
    return model.to(device=device, dtype=torch.float32).eval()


def load_learnable(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], stored_buffers: Iterable[str] = (),
    where: str = "checkpoint",
) -> int:
    """Copy the learnable tensors of ``state_dict`` into ``model``; returns how many were dropped.

    Entries that are not parameters of the model but are its buffers, or whose last key component
    is in ``stored_buffers``, are dropped. Every other difference is an error.
    """
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    stored_buffers = set(stored_buffers)
    learnable = {
        k: v for k, v in state_dict.items()
        if k in params or (k not in buffers and k.rsplit(".", 1)[-1] not in stored_buffers)
    }
    missing = sorted(set(params) - set(learnable))
    unexpected = sorted(set(learnable) - set(params))
    wrong: dict[str, list[str]] = {}
    for name in sorted(set(params) & set(learnable)):
        got, want = learnable[name], params[name]
        if got.shape != want.shape or not got.is_floating_point():
            kind = f"checkpoint {list(got.shape)} {got.dtype}, model {list(want.shape)}"
            wrong.setdefault(kind, []).append(name)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {compact_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {compact_names(unexpected)}")
    for kind, names in wrong.items():
        problems.append(f"wrong shape/dtype ({kind}) {len(names)}: {compact_names(names)}")
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise CheckpointError(f"{where}: tensors do not fit {arch} {getattr(model, 'config', '')}: "
                              + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in learnable.items():
            params[name].copy_(tensor)
    return len(state_dict) - len(learnable)


def compact_names(names: Iterable[str]) -> str:
    """Dotted names grouped with their numeric parts collapsed, e.g. ``layers.{0-3}.conv.weight (4)``.

    The pattern of a group may cover more names than it holds; the count in brackets is exact.
    """
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for name in names:
        parts = name.split(".")
        groups.setdefault(tuple("#" if p.isdigit() else p for p in parts), []).append(parts)
    shown = []
    for pattern, members in groups.items():
        if len(members) == 1:
            shown.append(".".join(members[0]))
            continue
        parts = [_ranges(sorted({int(m[i]) for m in members})) if p == "#" else p
                 for i, p in enumerate(pattern)]
        shown.append(f"{'.'.join(parts)} ({len(members)})")
    return ", ".join(shown)


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"{0-2,5}"``; a single value stays bare: ``[3]`` -> ``"3"``."""
    if len(values) == 1:
        return str(values[0])
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return "{" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) + "}"
