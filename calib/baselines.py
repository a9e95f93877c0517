"""MinMax and Percentile calibration: the baselines of the 2DQuant paper's tables.

Both stream through the same observer interface as DOBI (:func:`calib.observers.observe`), in one
forward pass, and set every quantizer's bounds:

- MinMax: ``lower = min``, ``upper = max`` of everything the quantizer saw.
- Percentile: ``lower`` / ``upper`` = the ``100 - p`` / ``p`` percentiles, default ``p = 99.99``
  (0.01% clipped at each end). The paper cites its Percentile row to Li et al. 2019 (FQN) without
  stating ``p``; 99.99 is our documented choice (``--percentile`` changes it). Activations are read
  from a :class:`~calib.observers.StreamingHistogram` (within one bin width, 1/4096 of the range
  or better); weights exactly with :func:`torch.quantile`.

Weights use their own tensor, per output channel when the quantizer's bounds are per channel.
On a symmetric grid (``z = 2^(b-1)``) the bounds become the smallest such grid that covers
``[lower, upper]``, as DOBI's widest candidate.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .dobi import candidate_bounds
from .observers import DEFAULT_BINS, MinMaxObserver, StreamingHistogram, WeightObserver, apply_bounds, observe

log = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 99.99

Bounds = dict[str, tuple[torch.Tensor, torch.Tensor]]


def grid_bounds(low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds for the range ``[low, high]`` (float32, same shape): itself, or the covering symmetric grid."""
    cand = candidate_bounds(low, high, bits, torch.zeros_like(low, dtype=torch.bool), symmetric, n=1)
    return cand.lower[0].float(), cand.upper[0].float()


def calibrate_minmax(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> Bounds:
    """MinMax bounds for every quantizer of ``model`` from one ``forward_loop(model)``; sets them.

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> from toolchain.quant import QuantConfig, quantize_model
    >>> from calib.observers import batch_forward_loop
    >>> model = quantize_model(model, QuantConfig())
    >>> lr_patches = torch.rand(4, 3, 16, 16)
    >>> bounds = calibrate_minmax(model, batch_forward_loop(lr_patches, progress=False))
    >>> lower, upper = bounds["layers.0.residual_group.blocks.0.mlp.fc1.input"]
    >>> bool(lower < 0 < upper), model(lr_patches).shape
    (True, torch.Size([4, 3, 32, 32]))
    """
    stats = observe(model, forward_loop, lambda q: WeightObserver() if q.kind == "weight" else MinMaxObserver())
    bounds: Bounds = {}
    for name, (quantizer, observer) in stats.items():
        if isinstance(observer, WeightObserver):
            rows = _weight_rows(observer.tensor, quantizer.bounds_shape)
            low, high = rows.aminmax(dim=1)
        else:
            low, high = torch.tensor(observer.min), torch.tensor(observer.max)
        bounds[name] = _shaped(grid_bounds(low.double(), high.double(), quantizer.bits, quantizer.symmetric),
                               quantizer.bounds_shape)
    apply_bounds(model, bounds)
    log.info("MinMax set %d quantizers", len(bounds))
    return bounds


def calibrate_percentile(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                         percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS) -> Bounds:
    """Percentile bounds (``100 - percentile`` / ``percentile``) for every quantizer; sets them.

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> from toolchain.quant import QuantConfig, quantize_model
    >>> from calib.observers import batch_forward_loop
    >>> model = quantize_model(model, QuantConfig())
    >>> bounds = calibrate_percentile(model, batch_forward_loop(torch.rand(4, 3, 16, 16), progress=False), 99.99)
    >>> len(bounds)
    12
    """
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    upper_q = float(percentile) / 100.0
    lower_q = 1.0 - upper_q
    stats = observe(model, forward_loop, lambda q: WeightObserver() if q.kind == "weight"
                    else StreamingHistogram(bins))
    bounds: Bounds = {}
    for name, (quantizer, observer) in stats.items():
        if isinstance(observer, WeightObserver):
            rows = _weight_rows(observer.tensor, quantizer.bounds_shape).double()
            levels = torch.tensor([lower_q, upper_q], dtype=torch.float64)
            low, high = torch.quantile(rows, levels, dim=1)
        else:
            low = torch.tensor(observer.quantile(lower_q), dtype=torch.float64)
            high = torch.tensor(observer.quantile(upper_q), dtype=torch.float64)
        bounds[name] = _shaped(grid_bounds(low, high, quantizer.bits, quantizer.symmetric), quantizer.bounds_shape)
    apply_bounds(model, bounds)
    log.info("Percentile (%.4g%%) set %d quantizers", percentile, len(bounds))
    return bounds


def _weight_rows(weight: torch.Tensor, bounds_shape: tuple[int, ...]) -> torch.Tensor:
    """``(1, numel)`` per tensor, ``(C_out, numel / C_out)`` per channel."""
    return weight.reshape(weight.shape[0], -1) if bounds_shape else weight.reshape(1, -1)


def _shaped(pair: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return pair[0].reshape(shape), pair[1].reshape(shape)
