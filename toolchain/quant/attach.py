"""Attach quantizers to a float model from the outside, where :mod:`.placement` finds them.

The model's code is never edited or re-implemented: :func:`quantize_model` traces one float forward
(:func:`toolchain.quant.placement.find_placement`), then

- ``"linear"``: replaces every ``nn.Linear`` called on image data by a :class:`QuantLinear`
  (quantizers ``<path>.input``, ``<path>.weight``; the ``weight``/``bias`` Parameters keep their names);
- ``"matmul"``: gives every module that multiplies two image-dependent tensors a child
  ``matmul`` (an ``nn.ModuleDict`` keyed by call order) of :class:`QuantMatMul` modules (quantizers
  ``<owner>.matmul.<i>.a`` / ``.b``) and routes its calls there (:mod:`.routing`);
- ``"conv"``: replaces every ``nn.Conv2d`` called on image data by a :class:`QuantConv2d`.

Target ``"trt-int4"`` is weight-only (TensorRT's INT4): only the ``.weight`` quantizers attach.
``include`` / ``exclude`` then filter the names (fnmatch). A selection, an include or exclude
pattern, or a bits override that matches nothing is an error, as is a selected kind absent from the
model. Roles (``Quantizer.role``) come from the traced data flow (see :mod:`.placement`).

Everything is in place: the original ``weight`` / ``bias`` Parameters stay under their names, and
the bounds are the only new Parameters (:func:`bound_parameters`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from .config import QuantConfig
from .modules import QuantConv2d, QuantLinear, QuantMatMul, Quantizer
from .placement import SITES_ATTRIBUTE, Placement, find_placement
from .routing import route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """One quantizer to create: its name suffix, kind and role."""

    suffix: str
    kind: str
    role: str


@dataclass(frozen=True)
class _Site:
    """A module to replace: where it sits, what it is, and the quantizers it may carry."""

    path: str
    parent: nn.Module
    child_name: str
    module: Optional[nn.Module]  # None for a matmul site (a call, not a module)
    selection: str  # "linear" | "matmul" | "conv"
    slots: tuple[_Slot, ...]
    op: str = "matmul"  # matmul sites: the call ("matmul", "bmm", "einsum:<equation>")


def quantize_model(model: nn.Module, config: QuantConfig, example: Optional[torch.Tensor] = None) -> nn.Module:
    """Attach the quantizers ``config`` selects to ``model`` (in place) and return it.

    ``example`` ``(N, C, H, W)``: the input placement traces (default: :func:`toolchain.models.example_input`
    for a model loaded by :func:`toolchain.load_model`). All quantizers start enabled and without
    bounds: running the model quantized before calibration or :func:`load_bounds` raises;
    :func:`float_mode` runs it as the float model.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    >>> model = quantize_model(model, QuantConfig(quantize=("linear",)), torch.rand(1, 4))
    >>> [(name, q.role) for name, q in quantizers(model).items()]
    [('0.input', 'linear_input'), ('0.weight', 'weight'), ('2.input', 'mlp_hidden'), ('2.weight', 'weight')]
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_model expects a QuantConfig, got {type(config).__name__}")
    if any(isinstance(module, Quantizer) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} already carries quantizers; quantize the float model once")
    if example is None:
        from ..models.info import example_input

        example = example_input(model)
    placement = find_placement(model, example)
    sites = _find_sites(model, config, placement)
    for selection in config.quantize:
        if not any(site.selection == selection for site in sites):
            found = Counter(layer.selection for layer in placement.layers) + Counter(matmul=len(placement.matmuls))
            has = ", ".join(f"{count} {kind}" for kind, count in sorted(found.items()) if count) or "none of them"
            raise ValueError(f"{config!r}: quantize={selection!r} finds no {_KIND_WORDS[selection]} in "
                             f"{type(model).__name__}; it has {has}: select those (QuantConfig.quantize, "
                             "2dq-calibrate --quantize)")
    keep = _filter_names([f"{site.path}.{slot.suffix}" for site in sites for slot in site.slots], config,
                         type(model).__name__)
    routed = False
    for site in sites:
        made = {slot.suffix: _make_quantizer(site, slot, config, model) for slot in site.slots
                if f"{site.path}.{slot.suffix}" in keep}
        if not made:
            continue
        if site.selection == "matmul":
            if SITES_ATTRIBUTE not in site.parent._modules:
                site.parent.add_module(SITES_ATTRIBUTE, nn.ModuleDict())
            getattr(site.parent, SITES_ATTRIBUTE)[site.child_name] = _wrap(site, made)
            routed = True
        else:
            setattr(site.parent, site.child_name, _wrap(site, made))
    if routed:
        route(model, placement.calls)
    log.info("attached %d quantizers to %s (%s)", len(keep), type(model).__name__, config)
    return model


_KIND_WORDS = {"linear": "linear layer on the image's data path",
               "matmul": "product of two image-dependent tensors (attention matmul)",
               "conv": "convolution on the image's data path"}


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of ``model`` by name, in module order (stable for a given architecture)."""
    found: dict[str, Quantizer] = {}
    for module in model.modules():
        if isinstance(module, Quantizer):
            if module.name in found:
                raise ValueError(f"two quantizers share the name {module.name!r}")
            found[module.name] = module
    return found


def bound_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lower`` and ``upper`` Parameters of every quantizer (what DQC trains), in order."""
    return [p for q in quantizers(model).values() for p in (q.lower, q.upper)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every quantizer (disabled quantizers are exact identities)."""
    for quantizer in quantizers(model).values():
        quantizer.enabled = bool(enabled)


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the float model inside the block; restores each quantizer's flag after.

    >>> model = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)),
    ...                        QuantConfig(quantize=("linear",)), torch.rand(1, 4))
    >>> with float_mode(model):
    ...     y = model(torch.ones(1, 4))   # no bounds needed in float mode
    """
    previous = {name: q.enabled for name, q in quantizers(model).items()}
    set_quant_enabled(model, False)
    try:
        yield model
    finally:
        for name, quantizer in quantizers(model).items():
            quantizer.enabled = previous.get(name, quantizer.enabled)


def bounds_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<quantizer>.lower": tensor, "<quantizer>.upper": tensor}`` copies, ready for safetensors.

    Raises ``ValueError`` if a quantizer has no bounds yet.
    """
    state: dict[str, torch.Tensor] = {}
    for name, quantizer in quantizers(model).items():
        if not quantizer.initialized:
            raise ValueError(f"quantizer {name} has no bounds yet; calibrate before saving bounds")
        state[f"{name}.lower"] = quantizer.lower.detach().clone()
        state[f"{name}.upper"] = quantizer.upper.detach().clone()
    return state


def load_bounds(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Set every quantizer's bounds from :func:`bounds_state` output; strict, all or nothing.

    Missing, unexpected or mis-shaped names, non-finite values and ``upper <= lower`` are errors,
    raised before any bound changes.
    """
    found = quantizers(model)
    expected = {f"{name}.{end}" for name in found for end in ("lower", "upper")}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        first = (f"no bounds for {missing[0].rpartition('.')[0]}, a quantizer the placement of "
                 f"{type(model).__name__} has" if missing else
                 f"bounds for {unexpected[0].rpartition('.')[0]}, which the placement of {type(model).__name__} lacks")
        raise ValueError(f"bounds do not fit {type(model).__name__}: {first} (missing {len(missing)}: "
                         f"{missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]})")
    for name, quantizer in found.items():
        lower, upper = tensors[f"{name}.lower"], tensors[f"{name}.upper"]
        for label, value in (("lower", lower), ("upper", upper)):
            if tuple(value.shape) != quantizer.bounds_shape:
                raise ValueError(f"bounds {name}.{label}: shape {tuple(value.shape)}, "
                                 f"expected {quantizer.bounds_shape}")
            if not torch.isfinite(value).all():
                raise ValueError(f"bounds {name}.{label} is not finite")
        if not (upper.to(torch.float64) > lower.to(torch.float64)).all():
            raise ValueError(f"bounds {name}: upper must exceed lower everywhere")
    for name, quantizer in found.items():
        quantizer.set_bounds(tensors[f"{name}.lower"], tensors[f"{name}.upper"])


def _find_sites(model: nn.Module, config: QuantConfig, placement: Placement) -> list[_Site]:
    modules = dict(model.named_modules())
    sites = []
    for layer in placement.layers:
        if layer.selection not in config.quantize:
            continue
        parent_path, _, child_name = layer.path.rpartition(".")
        slots = (_Slot("input", "activation", layer.input_role), _Slot("weight", "weight", "weight"))
        sites.append(_Site(layer.path, modules[parent_path], child_name, modules[layer.path], layer.selection, slots))
    if "matmul" in config.quantize:
        for matmul in placement.matmuls:
            slots = (_Slot("a", "activation", matmul.role_a), _Slot("b", "activation", matmul.role_b))
            sites.append(_Site(matmul.path, modules[matmul.owner], str(matmul.index), None, "matmul", slots,
                               matmul.op))
    if config.weight_only:
        # TensorRT's INT4 is weight-only: activations (and so the attention operands) stay float
        sites = [replace(site, slots=tuple(s for s in site.slots if s.kind == "weight")) for site in sites]
    return sites


def _filter_names(names: list[str], config: QuantConfig, model_name: str) -> set[str]:
    for field, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"{config!r}: {field} pattern {pattern!r} matches no quantizer of "
                                 f"{model_name} (names look like {names[:2]})")
    keep = {name for name in names
            if (not config.include or any(fnmatch.fnmatchcase(name, p) for p in config.include))
            and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)}
    if not keep:
        raise ValueError(f"{config!r} selects no quantizer in {model_name}")
    for pattern, _ in config.overrides():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in keep):
            raise ValueError(f"{config!r}: bits_overrides pattern {pattern!r} matches no quantizer kept in "
                             f"{model_name} (names look like {sorted(keep)[:2]})")
    return keep


def _make_quantizer(site: _Site, slot: _Slot, config: QuantConfig, model: nn.Module) -> Quantizer:
    reference = _reference_tensor(site, model)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None else None
    name = f"{site.path}.{slot.suffix}"
    if slot.kind == "weight":
        weight = site.module.weight
        shape: tuple[int, ...] = ()
        if config.weight_granularity == "per-channel":
            shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        # symmetric where the target says so; at 8 bits the grid is symmetric anyway (Quantizer)
        return Quantizer(name, "weight", config.bits_for(name, "weight"), "weight", config.weight_symmetric,
                         shape, device, dtype)
    return Quantizer(name, "activation", config.bits_for(name, "activation"), slot.role, False, (), device, dtype)


def _reference_tensor(site: _Site, model: nn.Module) -> Optional[torch.Tensor]:
    """A parameter whose device and dtype the bounds take: the module's own, else the nearest one."""
    for module in (site.module, site.parent, model):
        if module is None:
            continue
        for parameter in module.parameters():
            return parameter
    return None


def _wrap(site: _Site, made: dict[str, Quantizer]) -> nn.Module:
    if site.selection == "linear":
        return QuantLinear(site.module, made.get("input"), made.get("weight"))
    if site.selection == "matmul":
        return QuantMatMul(made.get("a"), made.get("b"), site.op)
    return QuantConv2d(site.module, made.get("input"), made.get("weight"))
