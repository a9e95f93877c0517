"""Streaming statistics: exact re-binning, quantiles, and the observer life cycle."""
from __future__ import annotations

import math

import pytest
import torch

from calib.observers import MinMaxObserver, StreamingHistogram, apply_bounds, batch_forward_loop, observe
from toolchain.quant import QuantConfig, quantize_model, quantizers


def direct_histogram(x: torch.Tensor, hist: StreamingHistogram) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums of ``x`` binned directly on the histogram's final grid (float64)."""
    index = torch.floor(x.double() / hist.width).long() - hist.first
    size = hist.counts.numel()
    counts = torch.bincount(index, minlength=size).double()
    sums = torch.bincount(index, weights=x.double(), minlength=size)
    return counts, sums


def test_rebinning_is_exact():
    gen = torch.Generator().manual_seed(0)
    parts = [0.01 * torch.randn(1000, generator=gen), torch.randn(1000, generator=gen),
             50 + torch.rand(1000, generator=gen), -300 * torch.rand(1000, generator=gen)]
    hist = StreamingHistogram(bins=256)
    widths = []
    for part in parts:
        hist.update(part)
        widths.append(hist.width)
    assert widths == sorted(widths) and widths[-1] > widths[0]  # the range grew, bins merged
    x = torch.cat(parts)
    counts, sums = direct_histogram(x, hist)
    assert torch.equal(hist.counts, counts)
    assert torch.allclose(hist.sums, sums, rtol=1e-12, atol=1e-9)
    assert hist.count == x.numel()
    assert (hist.min, hist.max) == (float(x.min()), float(x.max()))
    # never more than `bins` bins, at least half of them over the data's range
    assert hist.counts.numel() <= 256
    assert (hist.max - hist.min) / hist.width >= 128 - 1
    assert math.log2(hist.width).is_integer()


def test_histogram_does_not_depend_on_batching():
    x = torch.randn(30_000, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 3, 30_000)
    whole = StreamingHistogram(bins=512)
    whole.update(x)
    for pieces in (2, 7, 30):
        parts = StreamingHistogram(bins=512)
        for part in x.chunk(pieces):
            parts.update(part)
        assert (parts.width, parts.first) == (whole.width, whole.first)
        assert torch.equal(parts.counts, whole.counts)
        assert torch.allclose(parts.sums, whole.sums, rtol=1e-12, atol=1e-12)
    # the width is the smallest power of two that holds the range in `bins` bins
    assert not whole._fits(whole.min, whole.max, whole.width / 2)


def test_quantile_within_one_bin():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) ** 3
    hist = StreamingHistogram(bins=4096)
    for part in x.chunk(7):
        hist.update(part)
    ordered = x.sort().values
    for q in (0.0001, 0.01, 0.5, 0.99, 0.9999):
        # between the order statistics around rank q*N (quantile definitions differ inside a gap)
        rank = math.ceil(q * x.numel())
        low, high = float(ordered[rank - 1]), float(ordered[min(rank, x.numel() - 1)])
        assert low - hist.width <= hist.quantile(q) <= high + hist.width
    assert hist.quantile(0.0) == float(x.min()) and hist.quantile(1.0) == float(x.max())
    with pytest.raises(ValueError, match="quantile"):
        hist.quantile(1.5)


def test_constant_and_tiny_inputs():
    hist = StreamingHistogram(bins=64)
    hist.update(torch.full((10,), 3.0))
    hist.update(torch.tensor([3.0]))
    means, counts = hist.bin_means()
    assert means.tolist() == [3.0] and counts.tolist() == [11.0]
    assert hist.skewness() == 0.0
    hist.update(torch.tensor([-3.0]))
    assert hist.count == 12 and hist.min == -3.0
    # a range of denormals: the width stays at its floor, x / width stays finite
    tiny = StreamingHistogram(bins=64)
    tiny.update(torch.tensor([0.0, 1e-44, 2e-44]))
    tiny.update(torch.tensor([1.0]))
    assert tiny.counts.sum() == 4 and tiny.quantile(1.0) == 1.0


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        StreamingHistogram().update(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="non-finite"):
        StreamingHistogram().update(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="bins"):
        StreamingHistogram(bins=4)


def test_observe_streams_and_removes_observers(tiny_swinir):
    model = quantize_model(tiny_swinir(0), QuantConfig())
    lr = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    calls: dict[str, int] = {}

    def counter(q):
        def hook(_, x):
            calls[q.name] = calls.get(q.name, 0) + 1
        return hook

    stats = observe(model, batch_forward_loop(lr, batch_size=2, progress=False), counter)
    assert set(stats) == set(quantizers(model))
    assert set(calls.values()) == {2}  # one call per batch, two batches
    assert all(q.observer is None for q in quantizers(model).values())


def test_observe_removes_observers_on_error(tiny_swinir):
    model = quantize_model(tiny_swinir(0), QuantConfig())

    def broken_loop(m):
        m(torch.rand(1, 3, 16, 16))
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        observe(model, broken_loop, lambda q: MinMaxObserver())
    assert all(q.observer is None for q in quantizers(model).values())


def test_observe_names_quantizers_that_saw_nothing(tiny_swinir):
    model = quantize_model(tiny_swinir(0), QuantConfig())
    with pytest.raises(ValueError, match="saw no data"):
        observe(model, lambda m: None, lambda q: MinMaxObserver())
    with pytest.raises(ValueError, match="no quantizers"):
        observe(tiny_swinir(0), lambda m: None, lambda q: MinMaxObserver())


def test_apply_bounds_needs_every_quantizer(tiny_swinir):
    model = quantize_model(tiny_swinir(0), QuantConfig())
    with pytest.raises(ValueError, match="no bounds"):
        apply_bounds(model, {})


def test_batch_forward_loop_validates():
    with pytest.raises(ValueError, match="batch_size"):
        batch_forward_loop(torch.rand(2, 3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        batch_forward_loop(torch.rand(0, 3, 8, 8))
