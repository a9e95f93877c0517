"""MinMax and Percentile: bounds equal the statistics of everything each quantizer saw."""
from __future__ import annotations

import pytest
import torch

from calib.baselines import calibrate_minmax, calibrate_percentile, grid_bounds
from calib.observers import batch_forward_loop, observe
from toolchain.quant import QuantConfig, quantize_model, quantizers
from toolchain.quant.grid import clip_values, step_and_zero_point


def captured_inputs(model, lr) -> dict[str, torch.Tensor]:
    """Every tensor each quantizer sees in one pass, flattened and concatenated."""
    seen: dict[str, list[torch.Tensor]] = {}
    observe(model, batch_forward_loop(lr, batch_size=2, progress=False),
            lambda q: lambda _, x: seen.setdefault(q.name, []).append(x.detach().reshape(-1).clone()))
    return {name: torch.cat(parts) for name, parts in seen.items()}


@pytest.fixture
def lr() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_minmax_bounds_are_min_and_max(tiny_swinir, lr):
    model = quantize_model(tiny_swinir(0), QuantConfig(w_bits=4, a_bits=4))
    data = captured_inputs(model, lr)
    bounds = calibrate_minmax(model, batch_forward_loop(lr, batch_size=2, progress=False))
    for name, q in quantizers(model).items():
        assert q.initialized
        values = data[name] if q.kind == "activation" else data[name][: q_weight_numel(model, name)]
        assert float(q.lower.detach()) == float(values.min()), name
        assert float(q.upper.detach()) == float(values.max()), name
        assert torch.equal(bounds[name][0], q.lower.detach())


def q_weight_numel(model, name: str) -> int:
    """Weights are seen once per batch; the first occurrence is the tensor itself."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return module.weight.numel()


def test_minmax_per_channel_weights(tiny_swinir, lr):
    model = quantize_model(tiny_swinir(0), QuantConfig(weight_granularity="per-channel"))
    calibrate_minmax(model, batch_forward_loop(lr, progress=False))
    q = quantizers(model)["layers.1.residual_group.blocks.1.mlp.fc2.weight"]
    weight = model.get_submodule("layers.1.residual_group.blocks.1.mlp.fc2").weight.detach()
    assert q.lower.shape == (12, 1)
    assert torch.equal(q.lower.detach(), weight.amin(dim=1, keepdim=True))
    assert torch.equal(q.upper.detach(), weight.amax(dim=1, keepdim=True))


def test_symmetric_grid_covers_the_range():
    low, high = torch.tensor([-0.3, -2.0]), torch.tensor([1.0, 0.5])
    lower, upper = grid_bounds(low.double(), high.double(), bits=4, symmetric=True)
    step, zero_point = step_and_zero_point(lower, upper, 4, symmetric=True)
    clip_low, clip_high = clip_values(step, zero_point, 4)
    assert torch.all(clip_low <= low + 1e-6) and torch.all(clip_high >= high - 1e-6)
    # the smallest such grid: one side touches the range
    assert torch.allclose(torch.minimum(clip_high / high, clip_low / low), torch.ones(2))


def test_percentile_bounds(tiny_swinir, lr):
    model = quantize_model(tiny_swinir(0), QuantConfig(w_bits=4, a_bits=4))
    data = captured_inputs(model, lr)
    calibrate_percentile(model, batch_forward_loop(lr, batch_size=2, progress=False), percentile=99.0, bins=4096)
    for name, q in quantizers(model).items():
        if q.kind == "weight":
            values = data[name][: q_weight_numel(model, name)].double()
            expected = torch.quantile(values, torch.tensor([0.01, 0.99], dtype=torch.float64))
            assert torch.allclose(torch.stack([q.lower.detach(), q.upper.detach()]).double(), expected, atol=1e-7)
        else:
            values = data[name].double()
            ordered = values.sort().values
            n = values.numel()
            # histogram quantiles: within one bin (range / 2048 at 4096 bins) of the order statistics
            tolerance = 2 * float(values.max() - values.min()) / 4096 + 1e-7
            low_rank, high_rank = int(0.01 * n), int(0.99 * n)
            assert float(ordered[max(low_rank - 1, 0)]) - tolerance <= float(q.lower.detach()) \
                <= float(ordered[low_rank]) + tolerance, name
            assert float(ordered[high_rank - 1]) - tolerance <= float(q.upper.detach()) \
                <= float(ordered[min(high_rank, n - 1)]) + tolerance, name
            assert values.min() <= q.lower and q.upper <= values.max()


def test_percentile_100_is_minmax(tiny_swinir, lr):
    first = quantize_model(tiny_swinir(0), QuantConfig())
    second = quantize_model(tiny_swinir(0), QuantConfig())
    loop = batch_forward_loop(lr, progress=False)
    calibrate_percentile(first, loop, percentile=100.0)
    calibrate_minmax(second, loop)
    for (name, a), b in zip(quantizers(first).items(), quantizers(second).values()):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), name


def test_percentile_is_validated(tiny_swinir, lr):
    model = quantize_model(tiny_swinir(0), QuantConfig())
    with pytest.raises(ValueError, match="percentile"):
        calibrate_percentile(model, batch_forward_loop(lr, progress=False), percentile=40.0)
