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

from typing import Optional

import torch

from .compiled import CompiledKernel

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
    if torch.is_grad_enabled() and (x.requires_grad or step.requires_grad):
        return _ClipRoundScale.apply(x, step, low, high)
    # inference stays eager: compiling costs more than it saves in a few forward passes (2dq-eval on Set5: 19 s
    # eager, 41 s with a cold compile, 21 s warm)
    return clip_round_scale(x, step, low, high)


def clip_round_scale(x: torch.Tensor, step: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``round_half_even(clamp(x, low, high) / step) * step``: the fake quantizer's values, in one allocation and
    in-place passes; in training, large tensors run it as one compiled loop (:data:`_CLIP_ROUND_SCALE`: true division
    and half-to-even rounding, the same values bit for bit, ``tests/toolchain/quant/test_compiled.py``)."""
    return torch.clamp(x, low, high).div_(step).round_().mul_(step)


class _ClipRoundScale(torch.autograd.Function):
    """``round_half_even(clamp(x, low, high) / step) * step`` with the straight-through gradients.

    The gradients are those of the composition ``round_ste(maximum(minimum(x, high), low) / step) *
    step`` (what autograd would record), written out so that a training step does not keep and
    re-read the half dozen full-size intermediates autograd would save (DQC spent most of its time
    there); only ``x`` is saved. With ``t = clamp(x) / step`` and ``r = round(t)``:

    - ``d/dx = 1`` strictly inside ``(low, high)``, 0 outside;
    - ``d/dstep = r - t`` (the rounding residual; the clip values' own dependence on the step is
      autograd's, outside this function);
    - ``d/dlow = 1`` below ``low``, ``d/dhigh = 1`` above ``high``;
    - at ``x == low`` or ``x == high`` the gradient is split half to ``x`` and half to the bound, as
      ``torch.minimum`` / ``torch.maximum`` do.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, step, low, high)
        # detached: the compiled kernel would otherwise be compiled once more per requires_grad pattern
        return _CLIP_ROUND_SCALE(x.detach(), step.detach(), low.detach(), high.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, step, low, high = ctx.saved_tensors
        need_x, need_step, need_low, need_high = ctx.needs_input_grad
        grad_x, grad_step, grad_low, grad_high = _STE_GRADIENTS(grad, x.detach(), step.detach(), low.detach(),
                                                                high.detach())
        return (grad_x if need_x else None, grad_step if need_step else None, grad_low if need_low else None,
                grad_high if need_high else None)


def straight_through_gradients(grad: torch.Tensor, x: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
                               high: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four gradients of :class:`_ClipRoundScale` (to ``x``, the step, the two clip values) for ``grad``.

    Per clip end a weight of 0 past it, 1/2 on it, 1 inside (``low < high`` always); every product and
    difference is exact (factors 0, 1/2, 1), so the values are those of the masks written out. Eager, this is
    about twenty passes over ``x``; large tensors run it as one compiled loop (:data:`_STE_GRADIENTS`).
    """
    inside_low = grad * (x - low).sign_().add_(1).mul_(0.5)   # in place on temporaries: fewer allocations eager
    grad_low = (grad - inside_low).sum_to_size(low.shape)
    through = inside_low * (high - x).sign_().add_(1).mul_(0.5)
    grad_high = (inside_low - through).sum_to_size(high.shape)
    t = torch.clamp(x, low, high).div_(step)
    return through, (grad * torch.round(t).sub_(t)).sum_to_size(step.shape), grad_low, grad_high


#: in training (DQC, block reconstruction), tensors of at least this many elements run the quantizer's values and
#: gradients compiled (:mod:`toolchain.quant.compiled`; DAT-light's attention probabilities and wide activations)
COMPILED_MIN_NUMEL = 1 << 18
_CLIP_ROUND_SCALE = CompiledKernel(clip_round_scale, min_numel=COMPILED_MIN_NUMEL)
_STE_GRADIENTS = CompiledKernel(straight_through_gradients, min_numel=COMPILED_MIN_NUMEL)


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


#: AdaRound's stretched sigmoid: the soft rounding of a logit ``v`` is ``clamp(sigmoid(v) * (b - a) + a, 0, 1)``
ROUNDING_STRETCH = (-0.1, 1.1)


def rounding_fraction(v: torch.Tensor) -> torch.Tensor:
    """Soft rounding in ``[0, 1]`` of the logits ``v`` (AdaRound's rectified sigmoid; exactly 0 or 1 far out)."""
    low, high = ROUNDING_STRETCH
    return torch.clamp(torch.sigmoid(v) * (high - low) + low, 0.0, 1.0)


def rounding_logits(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                    symmetric: bool = False) -> torch.Tensor:
    """Logits ``v`` whose soft rounding is the fraction ``x / s - floor(x / s)`` (learned rounding starts as
    the identity); no gradient."""
    low, high = ROUNDING_STRETCH
    with torch.no_grad():
        step, _ = step_and_zero_point(lower, upper, bits, symmetric)
        scaled = x / step
        fraction = (scaled - torch.floor(scaled) - low) / (high - low)
        fraction = fraction.clamp(1e-4, 1 - 1e-4)
        return torch.log(fraction) - torch.log1p(-fraction)


def fake_quantize_rounded(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, symmetric: bool,
                          v: torch.Tensor, hard: bool, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` on the grid of ``[lower, upper]`` with learned rounding: code ``floor(x / s) + r`` clamped to the
    grid, ``r`` the soft rounding of ``v`` (training, differentiable in ``v``) or ``v >= 0`` (``hard``).

    ``base``: the integer part ``floor(x / s0)`` taken once on a starting grid ``s0`` instead of on the current
    one, so that the code moves continuously while the bounds train with the rounding (the values are then
    ``clamp(base + r) * s``, differentiable in the bounds); with the bounds at ``s0`` the same as ``None``.

    A hard result ``w`` lies on the grid: :func:`fake_quantize` and :func:`integer_codes` of ``w`` give it
    back exactly, so a weight replaced by it deploys with the codes learned here.

    >>> x = torch.tensor([0.26, 0.26]); v = torch.tensor([-5.0, 5.0])
    >>> fake_quantize_rounded(x, torch.tensor(-1.0), torch.tensor(2.0), 2, False, v, hard=True)
    tensor([0., 1.])
    """
    step, zero_point = step_and_zero_point(lower, upper, bits, symmetric)
    up = (v >= 0).to(x.dtype) if hard else rounding_fraction(v)
    codes = (torch.floor(x.detach() / step) if base is None else base).add(up)
    return torch.maximum(torch.minimum(codes, levels(bits) - zero_point), -zero_point) * step


def order_bounds_(lower: torch.Tensor, upper: torch.Tensor, eps: float = BOUND_EPS) -> None:
    """Keep ``upper > lower + eps`` in place (call after every optimizer step)."""
    with torch.no_grad():
        upper.copy_(torch.maximum(upper, lower + eps))
