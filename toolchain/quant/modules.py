"""Fake-quant modules: a :class:`Quantizer` and the layers that carry quantizers on their inputs.

The layers replace ``nn.Linear`` and ``nn.Conv2d`` in place and keep the original ``weight`` / ``bias`` Parameters under the same names, so the model's
state-dict keys of the original weights do not change; the quantizers add only their bounds.
:class:`QuantMatMul` serves one matmul call of a model's own code (:mod:`toolchain.quant.routing`).
All arithmetic is :mod:`toolchain.quant.grid`'s. Use :func:`toolchain.quant.quantize_model` rather
than building these by hand.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import grid
from .routing import opaque

KINDS = ("weight", "activation")
#: what a quantizer's tensor is; DOBI chooses its search mode from it and the report groups by it
ROLES = (
    "weight",  # a weight tensor
    "linear_input",  # input of an attention linear (qkv, proj) or of an MLP's first linear
    "mlp_hidden",  # input of an MLP linear that comes after its GELU (fc2): one-sided
    "attn_q",  # a-operand of q @ k^T: q after the head scale (or normalized q, cosine attention)
    "attn_k",  # b-operand of q @ k^T: k^T
    "attn_probs",  # a-operand of probs @ v: softmax output, one-sided
    "attn_v",  # b-operand of probs @ v
    "matmul_a",  # operands of a MatMul outside the two-matmul attention pattern
    "matmul_b",
    "conv_input",  # input of an nn.Conv2d
)

Observer = Callable[["Quantizer", torch.Tensor], Any]


class Quantizer(nn.Module):
    """Fake quantization of one tensor on the grid of learnable bounds ``[lower, upper]``.

    ``lower`` / ``upper`` have ``bounds_shape``: ``()`` per tensor, ``(C_out, 1)`` for a per-channel
    Linear weight ``(C_out, C_in)``, ``(C_out, 1, 1, 1)`` for a conv weight; they broadcast against
    the tensor. Forward, in order of precedence:

    - ``observer`` set: calls ``observer(self, x)`` and returns ``x`` unchanged (calibration
      statistics are streamed this way, nothing is stored here);
    - ``enabled`` False: returns ``x`` itself (float mode, exactly the float model);
    - no bounds yet (``initialized`` False): raises ``RuntimeError``;
    - ``rounding`` set (learned weight rounding while it trains): ``rounding(self, x)``;
    - otherwise :func:`grid.fake_quantize` (same shape as ``x``).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        bits: int,
        role: str,
        symmetric: bool = False,
        bounds_shape: tuple[int, ...] = (),
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Quantizer {name!r}: kind must be one of {KINDS}, got {kind!r}")
        if role not in ROLES:
            raise ValueError(f"Quantizer {name!r}: role must be one of {ROLES}, got {role!r}")
        self.name = name
        self.kind = kind
        self.bits = grid.check_bits(bits)
        self.role = role
        # at 8 bits the grid is symmetric whatever the flag says (grid.step_and_zero_point)
        self.symmetric = bool(symmetric) or bits == grid.MAX_BITS
        self.lower = nn.Parameter(torch.zeros(bounds_shape, device=device, dtype=dtype))
        self.upper = nn.Parameter(torch.ones(bounds_shape, device=device, dtype=dtype))
        self.enabled = True
        self.initialized = False
        self.observer: Optional[Observer] = None
        # learned rounding of a weight while it is trained (calib.learned_rounding): called as
        # ``rounding(self, x)`` in place of the grid's round to nearest; never part of the model
        self.rounding: Optional[Callable[["Quantizer", torch.Tensor], torch.Tensor]] = None

    def __setattr__(self, key: str, value: Any) -> None:
        # an observer or a rounding is a callback, never part of the model (not a submodule, not in state_dict)
        if key in ("observer", "rounding"):
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @property
    def bounds_shape(self) -> tuple[int, ...]:
        return tuple(self.lower.shape)

    def set_bounds(self, lower: Any, upper: Any) -> None:
        """Copy bounds in (tensors or floats of ``bounds_shape``) and mark the quantizer initialized.

        Raises ``ValueError`` on a wrong shape, a non-finite value or ``upper <= lower``.
        """
        with torch.no_grad():
            lower = torch.as_tensor(lower, dtype=self.lower.dtype, device=self.lower.device)
            upper = torch.as_tensor(upper, dtype=self.upper.dtype, device=self.upper.device)
            for label, value in (("lower", lower), ("upper", upper)):
                if tuple(value.shape) != self.bounds_shape:
                    raise ValueError(
                        f"quantizer {self.name}: {label} bound has shape {tuple(value.shape)}, "
                        f"expected {self.bounds_shape}"
                    )
                if not torch.isfinite(value).all():
                    raise ValueError(f"quantizer {self.name}: {label} bound is not finite")
            if not (upper > lower).all():
                raise ValueError(f"quantizer {self.name}: upper bound must exceed lower bound everywhere")
            self.lower.copy_(lower)
            self.upper.copy_(upper)
        self.initialized = True

    def step_and_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and integer zero point of the current grid (``bounds_shape`` each)."""
        return grid.step_and_zero_point(self.lower, self.upper, self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
            return x
        if not self.enabled:
            return x
        if not self.initialized:
            raise RuntimeError(
                f"quantizer {self.name} has no bounds yet: calibrate the model (DOBI, MinMax) or "
                f"load_bounds() before running it quantized, or run it inside float_mode(model)"
            )
        if self.rounding is not None:
            return self.rounding(self, x)
        return grid.fake_quantize(x, self.lower, self.upper, self.bits, self.symmetric)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # bounds restored through model.load_state_dict are bounds set
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "lower" in state_dict and prefix + "upper" in state_dict:
            self.initialized = True

    def extra_repr(self) -> str:
        return (f"name={self.name}, kind={self.kind}, role={self.role}, bits={self.bits}, "
                f"symmetric={self.symmetric}, bounds_shape={self.bounds_shape}, enabled={self.enabled}, "
                f"initialized={self.initialized}")


def _maybe(quantizer: Optional[Quantizer], x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


class QuantLinear(nn.Module):
    """An ``nn.Linear`` whose input and weight pass through quantizers (either may be ``None``).

    Shares the original ``weight`` ``(C_out, C_in)`` and ``bias`` ``(C_out,)`` Parameters. Input
    ``(..., C_in)`` -> output ``(..., C_out)``.
    """

    def __init__(self, linear: nn.Linear, input_quantizer: Optional[Quantizer],
                 weight_quantizer: Optional[Quantizer]) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer
        # optional (C_in,) factor applied to the input before its quantizer: explicit channel
        # smoothing (calib.transforms.smoothing, kind "input"), exported as one Mul; None: no op
        self.register_buffer("input_multiplier", None)
        # optional (C_in,) offset subtracted after the multiplier (calib.transforms.input_shift; the bias carries
        # it back), exported as one Sub; None: no op
        self.register_buffer("input_offset", None)
        # optional orthogonal (C_in, C_in) matrix R: the input becomes x @ R after the multiplier, before the
        # offset (calib.transforms.rotation; the weight carries W @ R), exported as one constant MatMul
        self.register_buffer("input_rotation", None)

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., C_in)`` after the multiplier and the rotation (what the offset is subtracted from)."""
        if self.input_multiplier is not None:
            x = x * self.input_multiplier
        if self.input_rotation is not None:
            with opaque():  # this product is the linear's own, not a call of the module that holds it
                x = torch.matmul(x, self.input_rotation)
        return x

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight multiplies: ``x`` after the multiplier, the rotation, the offset and the input quantizer."""
        x = self.transformed_input(x)
        if self.input_offset is not None:
            x = x - self.input_offset
        return _maybe(self.input_quantizer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), _maybe(self.weight_quantizer, self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantMatMul(nn.Module):
    """One product of two activations with a quantizer on each operand (either may be ``None``).

    For attention scores ``a`` is q ``(..., N, d)`` after the head scale and ``b`` is k^T
    ``(..., d, N)``; for the context ``a`` is the softmax probabilities ``(..., N, N)`` and ``b`` is
    v ``(..., N, d)``. ``op`` is the call the model made (``"matmul"``, ``"bmm"`` or
    ``"einsum:<equation>"``); the router passes the product function with the operands.
    """

    def __init__(self, a_quantizer: Optional[Quantizer], b_quantizer: Optional[Quantizer], op: str = "matmul") -> None:
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer
        self.op = op

    def forward(self, a: torch.Tensor, b: torch.Tensor, product: Callable = torch.matmul) -> torch.Tensor:
        return product(_maybe(self.a_quantizer, a), _maybe(self.b_quantizer, b))

    def extra_repr(self) -> str:
        return f"op={self.op}"


class QuantConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose input and weight pass through quantizers (either may be ``None``).

    Subclasses ``nn.Conv2d`` so that padding modes and every convolution option run through
    PyTorch's own code; shares the original ``weight`` ``(C_out, C_in/groups, kh, kw)`` and ``bias``.
    """

    def __init__(self, conv: nn.Conv2d, input_quantizer: Optional[Quantizer],
                 weight_quantizer: Optional[Quantizer]) -> None:
        # built on the meta device (no memory, no init cost), then given the original Parameters
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_maybe(self.input_quantizer, x), _maybe(self.weight_quantizer, self.weight),
                                  self.bias)
