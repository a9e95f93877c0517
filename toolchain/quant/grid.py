"""The quantizer arithmetic of 2dq: the one place where a grid is defined.

Fake quantization (calibration, DQC), export (scales, clip values, integer weights) and the tests
all call these functions, so what is calibrated is what the engines run (ARCHITECTURE.md section 2).

For ``b`` bits and learnable bounds ``lower < upper``::

    step       s = (upper - lower) / (2^b - 1)
    zero point z = clamp(round(-lower / s), 2^b - 128, 128)      (z = 2^(b-1) when symmetric)
    codes      q = clamp(round_half_even(x / s), -z, 2^b - 1 - z)
    value  x_hat = q * s

Every code lies in the signed int8 range for any ``b <= 8``, so the grid runs on an engine as
``Clip(x, -z*s, (2^b-1-z)*s) -> QuantizeLinear(s, 0:int8) -> DequantizeLinear(s, 0)``.
At ``b = 8`` the only grid that fits is the symmetric one (``z = 128``): the quantizer learns a step.

Gradients are straight-through for the two roundings; the bounds receive gradient from clipped
elements (through the clip values) and from every element through the step. Tensors of bounds
broadcast against ``x`` (a scalar per tensor, or e.g. ``(C_out, 1)`` per output channel).
"""
from __future__ import annotations

import torch

MIN_BITS = 2
MAX_BITS = 8
#: smallest gap kept between the bounds (in the tensor's units), see :func:`order_bounds_`
BOUND_EPS = 1e-6


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported width (2..8), else raise ``ValueError``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def levels(bits: int) -> int:
    """Number of steps of a ``bits`` grid: ``2^b - 1``."""
    return (1 << check_bits(bits)) - 1


def zero_point_range(bits: int) -> tuple[int, int]:
    """Allowed integer zero points: every code stays inside int8 ``[-128, 127]``."""
    return (1 << bits) - 128, 128


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """Half-to-even rounding forward, identity backward (straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def step_and_zero_point(
    lower: torch.Tensor, upper: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``s`` and integer zero point ``z`` of the grid spanned by ``[lower, upper]``.

    ``z`` is integer-valued (float dtype, straight-through gradient). With ``symmetric`` (and always
    at 8 bits) ``z = 2^(b-1)``, so ``lower`` then only acts through the step.
    """
    lower = torch.as_tensor(lower)
    upper = torch.as_tensor(upper, dtype=lower.dtype, device=lower.device)
    step = (upper - lower) / levels(bits)
    zmin, zmax = zero_point_range(bits)
    if symmetric or bits == MAX_BITS:
        zero_point = torch.full_like(step, float(1 << (bits - 1)))
    else:
        zero_point = torch.clamp(round_ste(-lower / step), zmin, zmax)
    return step, zero_point


def clip_values(step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real interval the grid covers: ``(-z*s, (2^b-1-z)*s)``; the export's Clip min/max."""
    return -zero_point * step, (levels(bits) - zero_point) * step


def fake_quantize(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, symmetric: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid of ``[lower, upper]`` (differentiable in all three).

    Computed as the engine does: clip to the grid's interval, divide by the step, round half to
    even, multiply by the step.

    >>> fake_quantize(torch.tensor([-1.0, 0.26, 5.0]), torch.tensor(-1.0), torch.tensor(2.0), 2)
    tensor([-1.,  0.,  2.])
    """
    step, zero_point = step_and_zero_point(lower, upper, bits, symmetric)
    low, high = clip_values(step, zero_point, bits)
    if not (torch.is_grad_enabled() and (x.requires_grad or step.requires_grad)):
        # inference: the same values with one allocation and in-place passes (evaluation and
        # verification spend most of their time here); ``t + (round(t) - t)`` of the straight-through
        # form equals ``round(t)`` exactly, because ``round(t) - t`` is exact (Sterbenz)
        out = torch.clamp(x, low, high)
        return out.div_(step).round_().mul_(step)
    clipped = torch.maximum(torch.minimum(x, high), low)
    return round_ste(clipped / step) * step


def integer_codes(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, symmetric: bool = False
) -> torch.Tensor:
    """The int8 codes ``q`` of ``x`` (what QuantizeLinear with zero point 0 produces); no gradient."""
    with torch.no_grad():
        step, zero_point = step_and_zero_point(lower, upper, bits, symmetric)
        low, high = clip_values(step, zero_point, bits)
        clipped = torch.maximum(torch.minimum(x, high), low)
        codes = torch.round(clipped / step)
        # the division of a clip value by the step can land one ulp outside; the codes cannot
        codes = torch.maximum(torch.minimum(codes, levels(bits) - zero_point), -zero_point)
    return codes.to(torch.int8)


def order_bounds_(lower: torch.Tensor, upper: torch.Tensor, eps: float = BOUND_EPS) -> None:
    """Keep ``upper > lower + eps`` in place (call after every optimizer step)."""
    with torch.no_grad():
        upper.copy_(torch.maximum(upper, lower + eps))
