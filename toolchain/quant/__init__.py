"""Quantization of SR transformers: one config, one verb, fake-quant modules on the grid of ``grid``.

>>> from toolchain.quant import QuantConfig, quantize_model, quantizers, float_mode
"""
from .attach import (
    bound_parameters,
    bounds_state,
    float_mode,
    load_bounds,
    quantize_model,
    quantizers,
    set_quant_enabled,
)
from .config import QuantConfig
from .modules import ROLES, QuantConv2d, QuantLinear, QuantMatMul, Quantizer

__all__ = [
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "Quantizer",
    "ROLES",
    "bound_parameters",
    "bounds_state",
    "float_mode",
    "load_bounds",
    "quantize_model",
    "quantizers",
    "set_quant_enabled",
]
