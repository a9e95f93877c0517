"""Reading checkpoints safely and building the model they belong to, through spandrel.

Only plain tensor files are read: ``.safetensors``, or PyTorch files through
``torch.load(weights_only=True)``, which refuses pickles that would construct arbitrary objects
(spandrel's own loader is not used for reading for that reason). The architecture is then detected
and its hyper-parameters inferred by spandrel (:func:`toolchain.models.registry`: spandrel's
architectures plus NGswin), which loads the tensors strictly into the official architecture code.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .models.info import info_of
from .slim import placeholders, restore_rebuilt

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

    >>> from toolchain.defaults import DEFAULT_WEIGHTS
    >>> state_dict = read_state_dict(DEFAULT_WEIGHTS)
    >>> state_dict["conv_first.weight"].shape
    torch.Size([60, 3, 3, 3])
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


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """The model a checkpoint belongs to, with its weights, in eval mode, float32, on ``device``.

    Any checkpoint spandrel identifies (SwinIR, DAT, HAT, SRFormer, Swin2SR, OmniSR, ...; official
    layouts, ``params`` / ``params_ema``; ``.pth`` / ``.safetensors``) and NGswin. The model carries
    its :class:`~toolchain.models.ModelInfo` (:func:`toolchain.models.info_of`).

    Raises:
        CheckpointError: unreadable file, an architecture spandrel cannot identify (one line naming
            the file and the supported architectures), tensors that do not fit it, or a floating-point
            tensor holding NaN/Inf (:func:`check_finite`, naming the tensor).

    >>> from toolchain.defaults import DEFAULT_WEIGHTS
    >>> model = load_model(DEFAULT_WEIGHTS)
    >>> info_of(model).arch, info_of(model).scale
    ('DAT', 4)
    """
    state_dict = read_state_dict(path)
    # a slim checkpoint (toolchain.slim) left out buffers the architecture rebuilds: placeholders
    # first (spandrel detects some architectures by their keys), then the real values
    rebuilt = {name: value for name, value in placeholders(path).items() if name not in state_dict}
    model = load_state_dict_model({**state_dict, **rebuilt}, str(path))
    restore_rebuilt(model, list(rebuilt))
    log.info("loaded %s x%d from %s", info_of(model).arch, info_of(model).scale, path)
    return model.to(device=device)


def load_state_dict_model(state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> nn.Module:
    """:func:`load_model` for tensors already in memory (e.g. ``model.state_dict()`` of a spandrel class)."""
    from spandrel import UnsupportedModelError, canonicalize_state_dict

    from .models import registry, supported_architectures, with_info

    check_finite(state_dict, where)  # the names as the file holds them, before spandrel strips prefixes
    state_dict = canonicalize_state_dict(dict(state_dict))
    try:
        descriptor = registry().load(state_dict)
    except UnsupportedModelError:
        first = ", ".join(list(state_dict)[:3])
        raise CheckpointError(f"{where}: spandrel cannot identify this checkpoint (tensors {first}, ...); "
                              f"supported architectures: {', '.join(supported_architectures())}") from None
    except Exception as err:  # a detected architecture whose tensors do not fit: spandrel raises many types
        raise CheckpointError(f"{where}: looks like a known architecture but does not load: "
                              f"{type(err).__name__}: {str(err)[:500]}") from err
    if not hasattr(descriptor, "scale") or descriptor.purpose not in ("SR", "Restoration"):
        raise CheckpointError(f"{where}: a {descriptor.architecture.id} model for {descriptor.purpose}, "
                              "not an image-to-image super-resolution model")
    # load_state_dict casts silently: an integer tensor where the model holds floats (or the reverse)
    # is a damaged file, not weights
    held = descriptor.model.state_dict()
    wrong = [f"{k} (checkpoint {v.dtype}, model {held[k].dtype})" for k, v in state_dict.items()
             if k in held and v.is_floating_point() != held[k].is_floating_point()]
    if wrong:
        raise CheckpointError(f"{where}: tensors of the wrong kind (integer for float or the reverse): "
                              f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} ({len(wrong)} in all)")
    return with_info(descriptor)


def check_finite(state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Refuse floating-point tensors holding NaN or Inf: one pass over each tensor.

    Loaded, such weights only fail later and elsewhere (calibration reports non-finite activations of
    whichever quantizer sees them first), so the damage is named here, at the tensor that holds it.

    Raises:
        CheckpointError: ``"<where>: tensor 'name' holds 3 non-finite values (2 nan, 1 inf); the
            checkpoint is damaged"``, naming the other damaged tensors too if there are more.
    """
    # a finite sum proves every element finite (NaN and Inf propagate) at a fifth of isfinite().all()'s
    # cost (DAT-light x4, 10 M values: 60 ms, not 330); only a non-finite sum, damage or an overflow of
    # large finite values, needs the exact element-wise test
    damaged = [name for name, tensor in state_dict.items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum()))
               and not bool(torch.isfinite(tensor).all())]
    if not damaged:
        return
    first = state_dict[damaged[0]]
    nan = int(torch.isnan(first).sum())
    inf = int(torch.isinf(first).sum())
    count = nan + inf
    kinds = ", ".join(f"{n} {kind}" for n, kind in ((nan, "nan"), (inf, "inf")) if n)
    more = len(damaged) - 1
    others = (f"; {more} more tensor{'s hold' if more > 1 else ' holds'} some too: {compact_names(damaged[1:])}"
              if more else "")
    raise CheckpointError(f"{where}: tensor {damaged[0]!r} holds {count} non-finite value{'s' if count > 1 else ''} "
                          f"({kinds}){others}; the checkpoint is damaged")


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
