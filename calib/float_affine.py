"""The float affine parameters of a block: what block reconstruction may train besides the bounds.

A quantized graph keeps some parameters in float: every bias (added after the integer product), and the
one-dimensional weights of normalization layers and per-channel scales (LayerNorm's affine, a layer
scale). Quantization shrinks and shifts a block's activations; these parameters can undo part of it
exactly, since the deployed graph computes them as they are (bias correction, Nagel et al. 2019, and
norm tweaking, Li et al. AAAI 2024, set them in closed form or by training). :func:`affine_parameters`
finds them in a block; block reconstruction (:mod:`calib.reconstruct`, ``ReconstructConfig.affine``)
trains them with the block's bounds and returns their new values by the checkpoint's parameter names,
which the artifact stores like GPTQ's weights (:func:`calib.artifact.save_artifact`'s ``weights``).

A parameter under a fold (:mod:`calib.transforms`: smoothing divides a LayerNorm's affine, a shift
moves a bias) is trained where it is stored, under the fold (``parametrizations.<name>.original``), so
the value written back is the checkpoint's and the folds apply to it as to the original.
"""
from __future__ import annotations

import torch
from torch import nn

from toolchain.quant import QuantConv2d, QuantLinear, Quantizer

__all__ = ["affine_parameters", "stored_parameter", "write_stored"]


def stored_parameter(module: nn.Module, attribute: str) -> nn.Parameter:
    """The tensor ``module.<attribute>`` is computed from: under its folds, or the parameter itself."""
    parametrizations = getattr(module, "parametrizations", {})
    if attribute in parametrizations:
        return parametrizations[attribute].original
    value = module._parameters.get(attribute)
    if value is None:
        raise ValueError(f"{type(module).__name__} has no parameter {attribute!r}")
    return value


def _owns(module: nn.Module, attribute: str) -> bool:
    return attribute in getattr(module, "parametrizations", {}) or module._parameters.get(attribute) is not None


def affine_parameters(unit: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    """Every bias and one-dimensional weight under ``unit``, by the checkpoint's parameter name
    (``prefix.<module>.bias``): the stored tensors (under their folds), not the quantizers' bounds, not a
    quantized layer's weight, not a fold's own parameters.

    >>> block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    >>> sorted(affine_parameters(block, "layers.0"))
    ['layers.0.0.bias', 'layers.0.0.weight', 'layers.0.1.bias']
    """
    found: dict[str, nn.Parameter] = {}
    for name, module in unit.named_modules():
        if isinstance(module, Quantizer) or "parametrizations" in name.split("."):
            continue  # a quantizer's bounds, or a fold (its own parameters, and the stored tensor's list)
        path = ".".join(part for part in (prefix, name) if part)
        if _owns(module, "bias"):
            found[f"{path}.bias"] = stored_parameter(module, "bias")
        if (_owns(module, "weight") and not isinstance(module, (QuantLinear, QuantConv2d))
                and stored_parameter(module, "weight").dim() == 1):
            found[f"{path}.weight"] = stored_parameter(module, "weight")
    return found


@torch.no_grad()
def write_stored(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` (by parameter name, ``<module>.<attribute>``) into the tensors they are stored in."""
    for name, value in values.items():
        module_name, _, attribute = name.rpartition(".")
        stored_parameter(model.get_submodule(module_name), attribute).copy_(value)
