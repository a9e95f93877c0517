"""The quantizer arithmetic (toolchain/quant/grid.py) against an independent numpy reference.

Integer codes are compared exactly (atol 0). The reference repeats ARCHITECTURE.md section 2 with
numpy in the tensor's own dtype: IEEE float32/float64 subtraction, division and multiplication are
correctly rounded on both sides, so identical operation order gives identical bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.quant import grid

ALL_BITS = range(grid.MIN_BITS, grid.MAX_BITS + 1)
DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def reference_codes(x: np.ndarray, lower, upper, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes as int64, zero point) from numpy; float ops in x's dtype, ``np.rint`` = half to even."""
    dtype = x.dtype.type
    levels = dtype(2 ** bits - 1)
    step = (dtype(upper) - dtype(lower)) / levels
    if symmetric or bits == 8:
        zero_point = np.full_like(step, dtype(2 ** (bits - 1)))
    else:
        zero_point = np.clip(np.rint(-dtype(lower) / step), dtype(2 ** bits - 128), dtype(128))
    low, high = -zero_point * step, (levels - zero_point) * step
    codes = np.rint(np.maximum(np.minimum(x, high), low) / step)
    codes = np.clip(codes, -zero_point, levels - zero_point)
    return codes.astype(np.int64), zero_point


def random_case(rng: np.random.Generator, dtype, shape=(4, 257)):
    """Bounds over many decades and both signs (zero point clamps at both ends), data past both ends."""
    lower = rng.uniform(-5.0, 5.0)
    width = 10.0 ** rng.uniform(-3.0, 1.0)
    upper = lower + width
    x = (lower + width * rng.uniform(-0.5, 1.5, size=shape)).astype(dtype)
    return x, dtype(lower), dtype(upper)


@pytest.mark.parametrize("torch_dtype", list(DTYPES))
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_integer_codes_match_numpy_reference_exactly(bits, symmetric, torch_dtype):
    rng = np.random.default_rng(1000 * bits + symmetric)
    np_dtype = DTYPES[torch_dtype]
    for _ in range(40):
        x, lower, upper = random_case(rng, np_dtype)
        codes = grid.integer_codes(torch.from_numpy(x), torch.tensor(lower), torch.tensor(upper), bits, symmetric)
        expected, _ = reference_codes(x, lower, upper, bits, symmetric)
        np.testing.assert_array_equal(codes.numpy().astype(np.int64), expected)


@pytest.mark.parametrize("torch_dtype", list(DTYPES))
@pytest.mark.parametrize("bits", ALL_BITS)
def test_ties_round_half_to_even(bits, torch_dtype):
    """Power-of-two steps make ``x / s = m + 0.5`` exact: every such tie goes to the even code."""
    np_dtype = DTYPES[torch_dtype]
    levels = 2 ** bits - 1
    zmin, zmax = grid.zero_point_range(bits)
    for exponent in (-7, -2, 0, 3):
        step = 2.0 ** exponent
        zero_points = [2 ** (bits - 1)] if bits == 8 else sorted({zmin, 0, 1, 2 ** (bits - 1), zmax})
        for zero_point in zero_points:
            lower, upper = -zero_point * step, (levels - zero_point) * step
            m = np.arange(-zero_point, levels - zero_point)  # ties between codes m and m + 1
            x = ((m + 0.5) * step).astype(np_dtype)
            codes = grid.integer_codes(torch.from_numpy(x), torch.tensor(lower, dtype=torch_dtype),
                                       torch.tensor(upper, dtype=torch_dtype), bits).numpy().astype(np.int64)
            expected, _ = reference_codes(x, np_dtype(lower), np_dtype(upper), bits, False)
            np.testing.assert_array_equal(codes, expected)
            np.testing.assert_array_equal(codes, np.where(m % 2 == 0, m, m + 1))


@pytest.mark.parametrize("bits", range(grid.MIN_BITS, grid.MAX_BITS))
def test_every_grid_of_up_to_7_bits_fits_int8(bits):
    rng = np.random.default_rng(bits)
    lower = torch.from_numpy(rng.uniform(-5.0, 5.0, size=5000)).float()
    upper = lower + torch.from_numpy(10.0 ** rng.uniform(-3.0, 1.0, size=5000)).float()
    step, zero_point = grid.step_and_zero_point(lower, upper, bits)
    zmin, zmax = grid.zero_point_range(bits)
    assert torch.equal(zero_point, torch.round(zero_point))
    assert zero_point.min() >= zmin and zero_point.max() <= zmax
    assert zero_point.min() == zmin and zero_point.max() == zmax  # both clamps were exercised
    assert (-zero_point >= -128).all() and (2 ** bits - 1 - zero_point <= 127).all()
    # codes of data far past both clip values: the int8 cast never wraps (reference is int64)
    x = torch.stack([lower - 10.0, upper + 10.0, (lower + upper) / 2], dim=-1)
    codes = grid.integer_codes(x, lower[:, None], upper[:, None], bits).to(torch.int64)
    reference, _ = reference_codes(x.numpy(), lower[:, None].numpy(), upper[:, None].numpy(), bits, False)
    np.testing.assert_array_equal(codes.numpy(), reference)
    assert codes.min() >= -128 and codes.max() <= 127


def test_8_bits_is_symmetric_whatever_the_bounds():
    lower = torch.tensor([-3.0, 0.5, -0.1])
    upper = torch.tensor([1.0, 4.0, 10.0])
    _, zero_point = grid.step_and_zero_point(lower, upper, 8)
    assert zero_point.tolist() == [128.0, 128.0, 128.0]
    codes = grid.integer_codes(torch.tensor([-1e3, 1e3]), torch.tensor(-1.0), torch.tensor(1.0), 8)
    assert codes.tolist() == [-128, 127]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_symmetric_flag_puts_zero_point_at_half(bits):
    _, zero_point = grid.step_and_zero_point(torch.tensor(0.3), torch.tensor(2.0), bits, symmetric=True)
    assert zero_point.item() == 2 ** (bits - 1)


@pytest.mark.parametrize("torch_dtype", list(DTYPES))
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_is_codes_times_step_exactly(bits, symmetric, torch_dtype):
    rng = np.random.default_rng(50 + bits)
    for _ in range(20):
        x, lower, upper = random_case(rng, DTYPES[torch_dtype])
        x, lower, upper = torch.from_numpy(x), torch.tensor(lower), torch.tensor(upper)
        step, _ = grid.step_and_zero_point(lower, upper, bits, symmetric)
        codes = grid.integer_codes(x, lower, upper, bits, symmetric)
        assert torch.equal(grid.fake_quantize(x, lower, upper, bits, symmetric), codes.to(torch_dtype) * step)


@pytest.mark.parametrize("torch_dtype", list(DTYPES))
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_inference_path_equals_differentiable_path(bits, per_channel, torch_dtype):
    """Under no_grad fake_quantize takes an in-place path; its values are the training path's, ties included."""
    rng = np.random.default_rng(70 + bits)
    for case in range(20):
        x, lower, upper = random_case(rng, DTYPES[torch_dtype], shape=(6, 129))
        x = torch.from_numpy(x)
        if per_channel:
            lower = torch.tensor(lower) - torch.from_numpy(rng.uniform(0, 1, (6, 1)).astype(DTYPES[torch_dtype]))
            upper = torch.tensor(upper) + torch.from_numpy(rng.uniform(0, 1, (6, 1)).astype(DTYPES[torch_dtype]))
        else:
            lower, upper = torch.tensor(lower), torch.tensor(upper)
        if case % 4 == 0:  # a power-of-two step puts exact ties on the grid
            lower, upper = torch.full_like(lower, -1.0), torch.full_like(upper, -1.0 + grid.levels(bits) * 0.25)
            x = torch.arange(-21, 201, dtype=x.dtype).reshape(6, 37) * 0.125
        with torch.no_grad():
            fast = grid.fake_quantize(x, lower, upper, bits)
        slow = grid.fake_quantize(x.clone().requires_grad_(), lower, upper, bits).detach()
        assert fast.shape == slow.shape and torch.equal(fast, slow)


class FrozenRound:
    """``round_ste`` with the residual ``round(t) - t`` recorded at a base point, then held fixed.

    The straight-through forward is piecewise constant, so finite differences of it are 0 or jumps and
    cannot check a gradient. Holding the rounding residuals fixed gives a smooth surrogate
    ``t + r0`` that equals the quantizer at the base point and whose exact derivative is what the
    STE claims (d round / dt = 1); gradcheck verifies that derivative, and the STE's autograd
    gradient at the base point must equal it.
    """

    def __init__(self) -> None:
        self.residuals: list[torch.Tensor] = []
        self.recording = True
        self.calls = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.residuals.append((torch.round(t) - t).detach())
            return t + self.residuals[-1]
        residual = self.residuals[self.calls % len(self.residuals)]
        self.calls += 1
        return t + residual


def composed_fake_quantize(x, lower, upper, bits: int, symmetric: bool = False) -> torch.Tensor:
    """The quantizer as a plain autograd composition, rounding through ``grid.round_ste``: the
    definition of the straight-through gradients that ``grid.fake_quantize`` writes out by hand."""
    step, zero_point = grid.step_and_zero_point(lower, upper, bits, symmetric)
    low, high = grid.clip_values(step, zero_point, bits)
    return grid.round_ste(torch.maximum(torch.minimum(x, high), low) / step) * step


def gradient_case(bits: int, symmetric: bool, per_channel: bool):
    """Bounds with an unclamped zero point; data in range and clipped, all well away from the kinks."""
    generator = torch.Generator().manual_seed(bits * 10 + symmetric + 2 * per_channel)
    shape = (3, 1) if per_channel else ()
    lower = -0.2 - 1.5 * torch.rand(shape, generator=generator, dtype=torch.float64)
    upper = 0.3 + 2.0 * torch.rand(shape, generator=generator, dtype=torch.float64)
    step, zero_point = grid.step_and_zero_point(lower, upper, bits, symmetric)
    low, high = grid.clip_values(step, zero_point, bits)
    fraction = 0.05 + 0.9 * torch.rand(3, 6, generator=generator, dtype=torch.float64)
    inside = low + (high - low) * fraction
    below = low - 0.1 - torch.rand(3, 2, generator=generator, dtype=torch.float64)
    above = high + 0.1 + torch.rand(3, 2, generator=generator, dtype=torch.float64)
    return torch.cat([inside, below, above], dim=1), lower, upper


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bound_gradients_match_finite_differences(bits, symmetric, per_channel, monkeypatch):
    x, lower, upper = gradient_case(bits, symmetric, per_channel)
    inputs = [t.clone().requires_grad_(True) for t in (x, lower, upper)]

    def quantize(x, lower, upper):
        return grid.fake_quantize(x, lower, upper, bits, symmetric)

    out = quantize(*inputs)
    ste_grads = torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    inputs)

    def surrogate(x, lower, upper):
        return composed_fake_quantize(x, lower, upper, bits, symmetric)

    frozen = FrozenRound()
    monkeypatch.setattr(grid, "round_ste", frozen)
    surrogate_out = surrogate(*inputs)
    frozen.recording = False
    assert torch.equal(surrogate_out, out)  # the surrogate is the quantizer at the base point
    assert torch.autograd.gradcheck(surrogate, inputs, eps=1e-7, atol=1e-6)
    surrogate_grads = torch.autograd.grad(
        (surrogate(*inputs) * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum(), inputs)
    for ste, exact in zip(ste_grads, surrogate_grads):
        torch.testing.assert_close(ste, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("torch_dtype", list(DTYPES))
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_hand_written_gradients_equal_the_autograd_composition(bits, per_channel, torch_dtype):
    """Random data past both ends, values exactly on the clip values (ties split the gradient half
    and half, as torch.minimum/maximum do), per-tensor and per-channel bounds, a batch dimension."""
    rng = np.random.default_rng(300 + bits)
    np_dtype = DTYPES[torch_dtype]
    for case in range(6):
        x, lower, upper = random_case(rng, np_dtype, shape=(2, 5, 64))
        x = torch.from_numpy(x)
        shape = (5, 1) if per_channel else ()
        lower = torch.tensor(lower) - torch.from_numpy(rng.uniform(0, 0.5, shape).astype(np_dtype))
        upper = torch.tensor(upper) + torch.from_numpy(rng.uniform(0, 0.5, shape).astype(np_dtype))
        with torch.no_grad():
            step, zero_point = grid.step_and_zero_point(lower, upper, bits)
            low, high = grid.clip_values(step, zero_point, bits)
            x[:, :, :4] = low.expand(5, 4) if per_channel else low  # ties with the clip values
            x[:, :, 4:8] = high.expand(5, 4) if per_channel else high
        weights = torch.from_numpy(rng.uniform(-1, 1, x.shape).astype(np_dtype))
        grads = []
        for quantize in (grid.fake_quantize, composed_fake_quantize):
            inputs = [t.clone().requires_grad_(True) for t in (x, lower, upper)]
            out = quantize(*inputs, bits)
            grads.append((out.detach(), torch.autograd.grad((out * weights).sum(), inputs)))
        (out, mine), (expected_out, theirs) = grads
        assert torch.equal(out, expected_out)
        eps = torch.finfo(torch_dtype).eps
        # d/dx: g against autograd's (g * s) / s, one rounding apart
        torch.testing.assert_close(mine[0], theirs[0], rtol=2 * eps, atol=0)
        # bound gradients are sums of terms up to |g| * 2^b; the two summations round differently
        sum_bound = 4 * eps * weights.abs().sum().item() * 2 ** bits
        for got, want in zip(mine[1:], theirs[1:]):
            torch.testing.assert_close(got, want, rtol=0, atol=sum_bound)


@pytest.mark.parametrize("bits", range(grid.MIN_BITS, grid.MAX_BITS))
def test_clipped_elements_pass_gradient_to_their_bound(bits):
    """d x_hat / d upper ~ 1 above the grid, d x_hat / d lower ~ 1 below, d x_hat / dx = 1 inside.

    "~": the zero point is rounded, so the clip value moves by ``1 + (z - (-lower/s)) / (2^b - 1)``
    per unit of bound, within ``0.5 / (2^b - 1)`` of 1 (asymmetric grids, zero point unclamped).
    """
    x, lower, upper = gradient_case(bits, False, False)
    x, lower, upper = (t.clone().requires_grad_(True) for t in (x, lower, upper))
    tolerance = 0.5 / (2 ** bits - 1) + 1e-12
    inside, below, above = x[:, :6], x[:, 6:8], x[:, 8:]
    for part, bound, other in ((above, upper, lower), (below, lower, upper)):
        for value in part.flatten():
            out = grid.fake_quantize(value, lower, upper, bits)
            d_bound, d_x = torch.autograd.grad(out, [bound, x])
            assert abs(d_bound.item() - 1.0) <= tolerance
            assert d_x.abs().sum() == 0  # clipped: no gradient to the data
    out = grid.fake_quantize(inside, lower, upper, bits)
    (d_x,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(d_x[:, :6], torch.ones_like(inside))
    assert d_x[:, 6:].abs().sum() == 0


def test_order_bounds_keeps_upper_above_lower():
    lower = torch.tensor([0.0, 1.0, -2.0, 5.0], dtype=torch.float64)
    upper = torch.tensor([1.0, 0.5, -2.0, 5.0 + 1e-3], dtype=torch.float64)
    before = upper.clone()
    grid.order_bounds_(lower, upper)
    assert (upper > lower).all()
    assert (upper - lower >= grid.BOUND_EPS * (1 - 1e-9)).all()
    assert upper[0] == before[0] and upper[3] == before[3]  # already ordered: untouched


def test_check_bits_rejects_out_of_range():
    for bad in (1, 9, 4.0, True, "4"):
        with pytest.raises(ValueError, match="bits"):
            grid.check_bits(bad)
