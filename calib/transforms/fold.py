"""The parametrization base every transform folds with, the helpers they share, and baking.

A transform (:mod:`.smoothing`, :mod:`.shift`, :mod:`.input_shift`) rewrites tensors of the model
(a LayerNorm's ``weight``, a linear's ``bias`` ...) through :mod:`torch.nn.utils.parametrize`:
``module.<name>`` becomes ``fold(original)``, driven by a learnable Parameter the fold owns (one
state-dict entry) and its partner folds on other tensors share (a plain reference). Every such fold
is a :class:`FoldParametrization`, which is what :func:`bake_transforms` writes back into plain
tensors for export.

>>> from torch.nn.utils import parametrize
>>> class AddOne(FoldParametrization):
...     def forward(self, t):
...         return t + 1
>>> linear = nn.Linear(2, 2)
>>> before = linear.bias.detach().clone()
>>> _ = parametrize.register_parametrization(linear, "bias", AddOne())
>>> torch.equal(_original(linear, "bias"), before), [type(p).__name__ for p in _fold_modules(linear, "bias")]
(True, ['AddOne'])
>>> _ = bake_transforms(linear)
>>> parametrize.is_parametrized(linear), torch.equal(linear.bias, before + 1)
(False, True)
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear

log = logging.getLogger(__name__)


class FoldParametrization(nn.Module):
    """Base of every fold of :mod:`calib.transforms` (what :func:`bake_transforms` bakes)."""

    def _share(self, name: str, parameter: nn.Parameter, owner: bool) -> None:
        # one Parameter drives several tensors; only its owner registers it (one state-dict entry,
        # one optimizer entry), the others keep a plain reference
        if owner:
            self.register_parameter(name, parameter)
        else:
            object.__setattr__(self, name, parameter)


def bake_transforms(model: nn.Module) -> nn.Module:
    """Write every fold (smoothing and shifts) into plain Parameters, in place; returns ``model``.

    The baked model computes bit for bit what the parametrized model computed; it has no
    ``log_scale`` / ``offset`` Parameters left, only the folded LayerNorm affine parameters, weights
    and biases under their usual names. Bias folds of shifts read the quantized weights of their
    linears, so those weight quantizers must be enabled and calibrated (``ValueError`` otherwise).
    """
    readers = [p.linear for m in model.modules() for n in _parametrized_names(m) for p in _fold_modules(m, n)
               if getattr(p, "linear", None) is not None]
    idle = sorted({r.weight_quantizer.name for r in readers if r.weight_quantizer is not None and (
        not r.weight_quantizer.enabled or not r.weight_quantizer.initialized
        or r.weight_quantizer.observer is not None)})
    if idle:
        raise ValueError(f"bake_transforms: {len(idle)} weight quantizers that bias folds read are disabled, "
                         f"uncalibrated or observed (e.g. {idle[0]}); bake the calibrated quantized model")
    baked = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name in _parametrized_names(module):
                folds = _fold_modules(module, name)
                if not folds:
                    continue
                if len(folds) != len(module.parametrizations[name]):
                    raise ValueError(f"bake_transforms: {type(module).__name__}.{name} carries foreign "
                                     "parametrizations; refusing to bake them")
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                baked += 1
    log.info("baked %d folded tensors", baked)
    return model


def quantized_weight(linear: QuantLinear) -> torch.Tensor:
    """The weight ``linear`` multiplies with in its forward (same call, same values)."""
    weight, quantizer = linear.weight, linear.weight_quantizer
    if quantizer is None or not quantizer.enabled or not quantizer.initialized or quantizer.observer is not None:
        return weight
    return quantizer(weight)


def _parametrized_names(module: nn.Module) -> list[str]:
    return list(module.parametrizations.keys()) if parametrize.is_parametrized(module) else []


def _fold_modules(module: nn.Module, name: str, kind: type = FoldParametrization) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, name):
        return []
    return [p for p in module.parametrizations[name] if isinstance(p, kind)]


def _folds(module: nn.Module, name: str, kind: type) -> bool:
    return bool(_fold_modules(module, name, kind))


def _original(module: nn.Module, name: str) -> torch.Tensor:
    """The unparametrized tensor ``module.<name>``."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _module(modules: dict[str, nn.Module], path: str, kind: type) -> nn.Module:
    module = modules.get(path)
    if not isinstance(module, kind):
        found = "nothing" if module is None else type(module).__name__
        raise ValueError(f"no {kind.__name__} at {path!r} (found {found})")
    return module


def _check_unfolded(model: nn.Module) -> None:
    if any(_fold_modules(m, n) for m in model.modules() for n in _parametrized_names(m)):
        raise ValueError("detection runs on a model without folds: find groups/sites before adding any")
