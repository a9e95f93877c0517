"""Attach quantizers to a float model from the outside, by module type and position only.

The model files know nothing of quantization (STYLE.md); :func:`quantize_model` finds what to
quantize by looking at module types and at where modules sit among their siblings, so any model built
from ``nn.Linear``, ``nn.GELU``, ``nn.Softmax`` and :class:`toolchain.models.common.MatMul` is
handled the same way.

Selection (``QuantConfig.quantize``):

- ``"linear"``: every ``nn.Linear`` (exact type) whose parent module has a ``MatMul`` child (an
  attention block: qkv, proj) or is an MLP (an ``nn.GELU`` child with a Linear registered before
  and one after it: fc1, fc2). Quantizers ``<path>.input`` and ``<path>.weight``.
- target ``"trt-int4"`` is weight-only (TensorRT's INT4): only the ``.weight`` quantizers attach.
- ``"matmul"``: every ``MatMul``. Quantizers ``<path>.a`` and ``<path>.b`` (the left and right
  operands of ``a @ b``).
- ``"conv"``: every ``nn.Conv2d`` (exact type). Quantizers ``<path>.input`` and ``<path>.weight``.

``include`` / ``exclude`` then filter these names (fnmatch). A selection, an include pattern or an
exclude pattern that matches nothing is an error, as is a selected kind absent from the model.

Roles (``Quantizer.role``), decided from the children of the selected module's parent, in their
registration order (which is the order the model's ``__init__`` creates them in, and the models here
create them in execution order):

- weights: ``"weight"``; conv inputs: ``"conv_input"``.
- a Linear registered after an ``nn.GELU`` sibling (fc2 of an MLP): input role ``"mlp_hidden"``
  (GELU output, one-sided); any other selected Linear (qkv, proj, fc1): ``"linear_input"``.
- a parent with an ``nn.Softmax`` child and exactly two ``MatMul`` children is an attention block:
  the first MatMul registered is the score product ``q @ k^T`` (a: ``"attn_q"``, b: ``"attn_k"``),
  the second is the context product ``probs @ v`` (a: ``"attn_probs"``, b: ``"attn_v"``). Any
  other MatMul gets ``"matmul_a"`` / ``"matmul_b"`` and a logged warning. The tests check on the
  real models, with forward hooks, that the ``attn_probs`` operand is the softmax output.
- Cosine attention (NGswin): the model normalizes q and k before the score MatMul, so the operands,
  hence ``attn_q`` / ``attn_k``, are the normalized vectors; the learned logit scale multiplies
  the MatMul's output in float. Scaled dot-product attention: ``attn_q`` is q after the head scale.

Everything is in place: the original ``weight`` / ``bias`` Parameters stay under their names, and
the bounds are the only new Parameters (:func:`bound_parameters`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from ..models.common import MatMul
from .config import QuantConfig
from .modules import QuantConv2d, QuantLinear, QuantMatMul, Quantizer

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
    module: nn.Module
    selection: str  # "linear" | "matmul" | "conv"
    slots: tuple[_Slot, ...]


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Attach the quantizers ``config`` selects to ``model`` (in place) and return it.

    All quantizers start enabled and without bounds: running the model quantized before
    calibration or :func:`load_bounds` raises; :func:`float_mode` runs it as the float model.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    >>> model = quantize_model(model, QuantConfig(quantize=("linear",)))
    >>> [(name, q.role) for name, q in quantizers(model).items()]
    [('0.input', 'linear_input'), ('0.weight', 'weight'), ('2.input', 'mlp_hidden'), ('2.weight', 'weight')]
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_model expects a QuantConfig, got {type(config).__name__}")
    if any(isinstance(module, Quantizer) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} already carries quantizers; quantize the float model once")
    sites = _find_sites(model, config)
    for selection in config.quantize:
        if not any(site.selection == selection for site in sites):
            raise ValueError(f"{config!r}: quantize={selection!r} finds no module of that kind in "
                             f"{type(model).__name__}")
    keep = _filter_names([f"{site.path}.{slot.suffix}" for site in sites for slot in site.slots], config,
                         type(model).__name__)
    for site in sites:
        made = {slot.suffix: _make_quantizer(site, slot, config, model) for slot in site.slots
                if f"{site.path}.{slot.suffix}" in keep}
        if made:
            setattr(site.parent, site.child_name, _wrap(site, made))
    log.info("attached %d quantizers to %s (%s)", len(keep), type(model).__name__, config)
    return model


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
    ...                        QuantConfig(quantize=("linear",)))
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
        raise ValueError(f"bounds do not fit {type(model).__name__}: missing {missing[:5]} "
                         f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
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


def _find_sites(model: nn.Module, config: QuantConfig) -> list[_Site]:
    sites = []
    for path, parent in model.named_modules():
        children = list(parent.named_children())
        types = [child for _, child in children]
        has_matmul = any(type(child) is MatMul for child in types)
        has_gelu = _is_mlp(types)
        matmul_roles = _matmul_roles(path, types) if "matmul" in config.quantize else {}
        for index, (child_name, child) in enumerate(children):
            child_path = f"{path}.{child_name}" if path else child_name
            if "linear" in config.quantize and type(child) is nn.Linear and (has_matmul or has_gelu):
                after_gelu = any(isinstance(sibling, nn.GELU) for sibling in types[:index])
                input_role = "mlp_hidden" if after_gelu else "linear_input"
                slots = (_Slot("input", "activation", input_role), _Slot("weight", "weight", "weight"))
                sites.append(_Site(child_path, parent, child_name, child, "linear", slots))
            elif "matmul" in config.quantize and type(child) is MatMul:
                role_a, role_b = matmul_roles[id(child)]
                slots = (_Slot("a", "activation", role_a), _Slot("b", "activation", role_b))
                sites.append(_Site(child_path, parent, child_name, child, "matmul", slots))
            elif "conv" in config.quantize and type(child) is nn.Conv2d:
                slots = (_Slot("input", "activation", "conv_input"), _Slot("weight", "weight", "weight"))
                sites.append(_Site(child_path, parent, child_name, child, "conv", slots))
    if config.weight_only:
        # TensorRT's INT4 is weight-only: activations (and so the attention operands) stay float
        sites = [replace(site, slots=tuple(s for s in site.slots if s.kind == "weight")) for site in sites]
    return sites


def _is_mlp(children: list[nn.Module]) -> bool:
    """An MLP: a GELU child with a Linear registered before it and one after it (fc1, act, fc2).

    A projection that merely follows a GELU (NGswin's SCDP bottleneck: conv, GELU, Linear) is not
    an MLP block and stays float, as in the paper's per-block scope.
    """
    gelus = [i for i, child in enumerate(children) if isinstance(child, nn.GELU)]
    linears = [i for i, child in enumerate(children) if type(child) is nn.Linear]
    return any(any(i < g for i in linears) and any(i > g for i in linears) for g in gelus)


def _matmul_roles(path: str, children: list[nn.Module]) -> dict[int, tuple[str, str]]:
    """Operand roles of the MatMul children of one module (see the module docstring)."""
    matmuls = [child for child in children if type(child) is MatMul]
    if not matmuls:
        return {}
    if len(matmuls) == 2 and any(isinstance(child, nn.Softmax) for child in children):
        return {id(matmuls[0]): ("attn_q", "attn_k"), id(matmuls[1]): ("attn_probs", "attn_v")}
    log.warning("%s: %d MatMul children without the (scores, softmax, context) pattern; "
                "their operands get the generic roles matmul_a / matmul_b", path or "<root>", len(matmuls))
    return {id(m): ("matmul_a", "matmul_b") for m in matmuls}


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
        for parameter in module.parameters():
            return parameter
    return None


def _wrap(site: _Site, made: dict[str, Quantizer]) -> nn.Module:
    if site.selection == "linear":
        return QuantLinear(site.module, made.get("input"), made.get("weight"))
    if site.selection == "matmul":
        return QuantMatMul(made.get("a"), made.get("b"))
    return QuantConv2d(site.module, made.get("input"), made.get("weight"))
