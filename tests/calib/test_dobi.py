"""DOBI: mode choice, equality with the plain 100-pass search, histogram path, model level."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calib.dobi import (
    calibrate_dobi,
    candidate_bounds,
    choose_mode,
    search_bounds,
    search_bounds_full,
    search_histogram,
)
from calib.observers import StreamingHistogram, batch_forward_loop, observe
from toolchain.quant import QuantConfig, quantize_model, quantizers
from toolchain.quant.grid import fake_quantize, levels
from toolchain.tolerances import DOBI_STEP_SLACK

N = 100


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def softmax_like(seed: int = 0) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(24, 64, generator=gen(seed)), dim=-1)


def gelu_like(seed: int = 0) -> torch.Tensor:
    return F.gelu(torch.randn(1500, generator=gen(seed)))


def gaussian(seed: int = 0) -> torch.Tensor:
    return 0.5 * torch.randn(1500, generator=gen(seed)) + 0.1


DISTRIBUTIONS = {"softmax": softmax_like, "gelu": gelu_like, "gaussian": gaussian}


def plain_search(x: torch.Tensor, bits: int, mode: str, symmetric: bool = False, n: int = N):
    """The reference: n full fake-quant passes in a Python loop, first minimum kept (strict <).

    Candidates as in the 2DQuant paper; symmetric grids shrink the step instead (calib.dobi).
    Returns (lower, upper, index, step_lower, step_upper).
    """
    low, high = float(x.min()), float(x.max())
    best, chosen = math.inf, None
    z = 1 << (bits - 1)
    top = levels(bits) - z
    s0 = max(high / top, -low / z)
    for i in range(n):
        if symmetric or bits == 8:
            step = s0 * (n - i) / n
            lower, upper = -z * step, top * step
        elif mode == "upper":
            lower, upper = low, high - i * (high - low) / n
        else:
            lower, upper = low + i * (high - low) / (2 * n), high - i * (high - low) / (2 * n)
        q = fake_quantize(x, torch.tensor(lower), torch.tensor(upper), bits, symmetric)
        error = float((x - q).double().square().sum())
        if error < best:
            best, chosen = error, (lower, upper, i)
    if symmetric or bits == 8:
        steps = (z * s0 / n, top * s0 / n)
    elif mode == "upper":
        steps = (0.0, (high - low) / n)
    else:
        steps = ((high - low) / (2 * n),) * 2
    return (*chosen, *steps)


def assert_within_one_step(lower, upper, ref):
    ref_lower, ref_upper, _, step_lower, step_upper = ref
    assert abs(float(lower) - ref_lower) <= step_lower * (1 + DOBI_STEP_SLACK) + 1e-7
    assert abs(float(upper) - ref_upper) <= step_upper * (1 + DOBI_STEP_SLACK) + 1e-7


# --- mode choice -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [(softmax_like, "upper"), (gelu_like, "upper"), (gaussian, "both")])
def test_auto_mode_from_data(make, expected):
    _, _, mode, _ = search_bounds_full(make(), bits=4)
    assert mode == expected


def test_auto_mode_rule_details():
    # shifted Gaussian: short negative tail but no skew -> both
    assert choose_mode(-0.07, 4.2, 0.0) == "both"
    # a flat softmax has little skew, but its role vouches for the one-sided shape
    assert choose_mode(0.01, 0.024, 0.28) == "both"
    assert choose_mode(0.01, 0.024, 0.28, role="attn_probs") == "upper"
    # GELU output with a long negative tail relative to its max is searched on both ends
    assert choose_mode(-0.17, 0.5, 2.0, role="mlp_hidden") == "both"
    # weights are always bell-shaped searches
    assert choose_mode(0.0, 1.0, 5.0, kind="weight") == "both"


def test_auto_upper_keeps_the_minimum():
    x = softmax_like()
    lower, upper = search_bounds(x, bits=4)
    assert float(lower) == float(x.min())
    assert float(upper) < float(x.max())


# --- equality with the plain loop --------------------------------------------------------------

@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("mode", ["both", "upper"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_search_matches_plain_loop(dist, mode, bits):
    x = DISTRIBUTIONS[dist](bits)
    lower, upper, _, index = search_bounds_full(x, bits, mode)
    ref = plain_search(x, bits, mode)
    assert_within_one_step(lower, upper, ref)
    assert abs(int(index) - ref[2]) <= 1


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dist", ["gaussian", "softmax"])
def test_symmetric_search_matches_plain_loop(bits, dist):
    x = DISTRIBUTIONS[dist](1)
    lower, upper, mode, _ = search_bounds_full(x, bits, "both", symmetric=True)
    assert mode == "symmetric"
    assert_within_one_step(lower, upper, plain_search(x, bits, "both", symmetric=True))


def test_ties_keep_the_first_candidate():
    # an all-zero tensor (range widened to [0, 1e-6]): every upper candidate quantizes it exactly
    x = torch.zeros(50)
    lower, upper, _, index = search_bounds_full(x, bits=4, mode="upper")
    cand = candidate_bounds(torch.tensor(0.0), torch.tensor(0.0), 4, torch.tensor(True))
    errors = [float((fake_quantize(x, cand.lower[i].float(), cand.upper[i].float(), 4) - x).abs().sum())
              for i in (0, 50, 99)]
    assert errors == [0.0, 0.0, 0.0]  # a genuine tie
    assert int(index) == 0
    assert float(lower) == float(cand.lower[0].float()) and float(upper) == float(cand.upper[0].float())
    # ties of a plain loop with "<" on real data: same first minimum
    x = torch.tensor([0.0, 0.5, 1.0] * 10)
    assert int(search_bounds_full(x, bits=4, mode="both")[3]) == plain_search(x, 4, "both")[2]


def test_per_channel_equals_per_row_searches():
    weight = torch.randn(6, 20, generator=gen(3)) * torch.linspace(0.1, 2.0, 6)[:, None]
    lower, upper = search_bounds(weight, bits=3, mode="both", axis=0)
    assert lower.shape == upper.shape == (6, 1)
    for row in range(6):
        lo, hi = search_bounds(weight[row], bits=3, mode="both")
        assert float(lower[row, 0]) == float(lo) and float(upper[row, 0]) == float(hi)


def test_constant_tensor_gets_valid_bounds():
    for value in (0.0, 2.5, -1.0):
        x = torch.full((10,), value)
        lower, upper = search_bounds(x, bits=4)
        assert float(upper) > float(lower)
        assert torch.equal(fake_quantize(x, lower, upper, 4), x)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="mode"):
        search_bounds(torch.randn(10), 4, mode="lower")
    with pytest.raises(ValueError, match="non-finite"):
        search_bounds(torch.tensor([0.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="bits"):
        search_bounds(torch.randn(10), 9)
    with pytest.raises(ValueError, match="candidates"):
        candidate_bounds(torch.tensor(0.0), torch.tensor(1.0), 4, torch.tensor(False), n=0)


# --- histogram path ----------------------------------------------------------------------------

@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("mode", ["auto", "both", "upper"])
@pytest.mark.parametrize("bits", [2, 4, 6])
def test_histogram_matches_exact_search(dist, mode, bits):
    x = DISTRIBUTIONS[dist](7)
    hist = StreamingHistogram()
    # streamed in pieces of growing range, so that the histogram re-bins on the way
    for part in sorted(x.reshape(-1).chunk(5), key=lambda t: float(t.abs().max())):
        hist.update(part)
    result = search_histogram(hist, bits, mode)
    lower, upper, exact_mode, index = search_bounds_full(x, bits, mode)
    assert result.mode == exact_mode
    assert abs(int(result.index) - int(index)) <= 1


@pytest.mark.slow
def test_histogram_matches_exact_on_real_activations(calib_lr, tiny_swinir):
    """Every activation quantizer of a SwinIR (real patches): histogram DOBI vs exact DOBI."""
    model = quantize_model(tiny_swinir(1), QuantConfig(w_bits=4, a_bits=4))
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(q):
        return lambda _, x: captured.setdefault(q.name, []).append(x.detach().clone())

    observe(model, batch_forward_loop(calib_lr, batch_size=2, progress=False), capture)
    results = calibrate_dobi(model, batch_forward_loop(calib_lr, batch_size=2, progress=False))
    compared = 0
    for name, q in quantizers(model).items():
        if q.kind != "activation":
            continue
        data = torch.cat([t.reshape(-1) for t in captured[name]])
        for bits in (4, 6):
            hist = StreamingHistogram()
            for t in captured[name]:
                hist.update(t)
            streamed = search_histogram(hist, bits, "auto", role=q.role)
            _, _, mode, index = search_bounds_full(data, bits, "auto", role=q.role)
            assert streamed.mode == mode, name
            assert abs(int(streamed.index) - int(index)) <= 1, (name, bits)
            if bits == 4:  # the model-level pass saw the same data at the model's 4 bits
                assert abs(int(results[name].index) - int(index)) <= 1, name
        compared += 1
    assert compared == 32


# --- model level -------------------------------------------------------------------------------

def test_calibrate_dobi_sets_every_quantizer(tiny_swinir):
    model = quantize_model(tiny_swinir(), QuantConfig(w_bits=4, a_bits=4))
    lr = torch.rand(2, 3, 16, 16, generator=gen(2))
    results = calibrate_dobi(model, batch_forward_loop(lr, batch_size=1, progress=False))
    found = quantizers(model)
    assert set(results) == set(found)
    assert all(q.initialized and q.observer is None for q in found.values())
    # weights: exactly the exact search on the weight tensor
    q = found["layers.0.residual_group.blocks.0.attn.qkv.weight"]
    lower, upper = search_bounds(model.layers[0].residual_group.blocks[0].attn.qkv.weight, 4, "both")
    assert float(q.lower.detach()) == float(lower) and float(q.upper.detach()) == float(upper)
    # one-sided roles get the upper search: lower stays at the minimum
    probs = found["layers.0.residual_group.blocks.0.attn.matmul.1.a"]
    assert probs.role == "attn_probs"
    assert results[probs.name].mode == "upper" and float(probs.lower.detach()) >= 0.0
    out = model(lr)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_calibrate_dobi_per_channel_and_symmetric_weights(tiny_swinir):
    config = QuantConfig(w_bits=4, a_bits=8, weight_granularity="per-channel", target="trt-int4")
    model = quantize_model(tiny_swinir(), config)
    lr = torch.rand(1, 3, 16, 16, generator=gen(4))
    results = calibrate_dobi(model, batch_forward_loop(lr, progress=False))
    fc1 = quantizers(model)["layers.0.residual_group.blocks.0.mlp.fc1.weight"]
    assert fc1.lower.shape == (24, 1) and results[fc1.name].mode == "symmetric"
    # symmetric grid: the bounds are the grid's own clip values, -8 s and 7 s
    assert torch.allclose(fc1.lower / fc1.upper, torch.full((24, 1), -8 / 7))
    # 8-bit activations are symmetric grids too
    assert all(r.mode == "symmetric" for r in results.values())


def test_calibrate_dobi_does_not_depend_on_batch_size(tiny_swinir):
    lr = torch.rand(3, 3, 16, 16, generator=gen(6))
    found = []
    for batch_size in (1, 3):
        model = quantize_model(tiny_swinir(), QuantConfig())
        found.append(calibrate_dobi(model, batch_forward_loop(lr, batch_size=batch_size, progress=False)))
    for name, first in found[0].items():
        second = found[1][name]
        # the same candidate; bounds equal up to the float forward's own batch-size rounding
        assert int(first.index) == int(second.index), name
        assert torch.allclose(first.lower, second.lower, rtol=1e-5, atol=1e-7), name
        assert torch.allclose(first.upper, second.upper, rtol=1e-5, atol=1e-7), name


def test_calibrate_dobi_mode_override(tiny_swinir):
    model = quantize_model(tiny_swinir(), QuantConfig())
    lr = torch.rand(1, 3, 16, 16, generator=gen(5))
    results = calibrate_dobi(model, batch_forward_loop(lr, progress=False), mode="both")
    assert {r.mode for r in results.values()} == {"both"}
