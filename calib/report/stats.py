"""Per-quantizer calibration data for the report, collected in one streamed pass.

The float model runs once over the calibration patches an artifact describes (same images, patch
count, patch size and seed, so the same patches) with an observer on every quantizer. Nothing is
dumped: each activation quantizer keeps a histogram and, for every known set of bounds, an exact
count of the values that set's grid does not clip; weight quantizers keep a reference to their
weight tensor.

"In range" means that the quantizer's clamp leaves the value alone: its code ``round(x/s)`` is a
code of the grid, ``-z <= round(x/s) <= 2^b-1-z`` (:mod:`toolchain.quant.grid`), i.e. ``x`` lies in
the clip interval ``[-z*s, (2^b-1-z)*s]`` widened by half a step on each side
(:func:`kept_interval`; half-way points count as in range). A value in range is only rounded
(error <= s/2); a value out of range is clipped. For an asymmetric grid this interval lies within
one step of ``[lower, upper]`` (MinMax bounds keep 100%); it also holds for symmetric grids, whose
range is set by the step alone.

DOBI bounds: taken from an artifact made by DOBI on the same calibration data and quantization
(the main artifact itself, or a ``--compare`` one), otherwise recomputed here with
:func:`calib.dobi.search_histogram` / :func:`calib.dobi.search_bounds_full` from the same
:class:`~calib.observers.StreamingHistogram` DOBI uses (so the recomputed bounds are the ones
``2dq-calibrate --method dobi`` writes). Their in-range share is then read from that histogram
(within one of its bins, 1/4096 of the range or better) and marked inexact.

"Affected": quantizers are ranked by the share of calibration values the final bounds clip, then
by how far the bounds moved from DOBI to final relative to the data range (:attr:`QuantizerStats.shift`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from calib.dobi import DEFAULT_CANDIDATES, search_bounds_full, search_histogram
from calib.observers import DEFAULT_BINS, StreamingHistogram, observe
from toolchain.quant import Quantizer, grid, quantizers

log = logging.getLogger(__name__)

#: bins of the counting histogram kept per activation quantizer when DOBI need not be recomputed
COUNT_BINS = 1024


@dataclass(frozen=True)
class Histogram:
    """Counts of ``len(counts)`` bins of width ``width``; bin ``k`` covers ``[(first+k)*w, (first+k+1)*w)``."""

    first: int
    width: float
    counts: np.ndarray  # float64 (B,)

    @property
    def edges(self) -> np.ndarray:
        return (self.first + np.arange(self.counts.size + 1)) * self.width

    def merged(self, max_bins: int) -> "Histogram":
        """The same data in at most ``max_bins`` bins, merging groups of ``2^k`` bins (exact)."""
        shift = 0
        last = self.first + self.counts.size - 1
        while (last >> shift) - (self.first >> shift) + 1 > max_bins:
            shift += 1
        if shift == 0:
            return self
        index = (np.arange(self.first, last + 1) >> shift) - (self.first >> shift)
        counts = np.bincount(index, weights=self.counts, minlength=int(index[-1]) + 1)
        return Histogram(self.first >> shift, self.width * 2.0 ** shift, counts)

    def share_inside(self, low: float, high: float) -> float:
        """Estimated share of the values in ``[low, high]``, linear inside the two edge bins."""
        total = float(self.counts.sum())
        if total == 0:
            return math.nan
        edges = self.edges
        below_high = np.clip((high - edges[:-1]) / self.width, 0.0, 1.0)
        below_low = np.clip((low - edges[:-1]) / self.width, 0.0, 1.0)
        return float((self.counts * (below_high - below_low)).sum() / total)


class CountHistogram:
    """Counts-only streamed histogram with power-of-two bin widths (as StreamingHistogram, no sums).

    The range grows as data arrives; bins merge in pairs exactly. Counting uses ``torch.histc``,
    several times faster than the sums DOBI needs. Keeps at most ``bins`` bins.
    """

    def __init__(self, bins: int = COUNT_BINS) -> None:
        self.bins = bins
        self.count = 0
        self.min, self.max = math.inf, -math.inf
        self.width: Optional[float] = None
        self.first = 0
        self.counts = torch.zeros(0, dtype=torch.float64)

    def update(self, x: torch.Tensor, extent: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Add every value of ``x`` (``extent``: its ``aminmax`` if already computed)."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        low, high = (float(v) for v in (extent if extent is not None else torch.aminmax(flat)))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("calibration data holds non-finite values (inf or nan)")
        self.min, self.max = min(low, self.min), max(high, self.max)
        self._cover(self.min, self.max)
        self.count += flat.numel()
        size = self.counts.numel()
        start = self.first * self.width
        counts = torch.histc(flat, bins=size, min=start, max=start + size * self.width)
        self.counts += counts.to("cpu", torch.float64)

    def _cover(self, low: float, high: float) -> None:
        if self.width is None:
            spread = high - low if high > low else max(abs(high), 1e-30)
            self.width = 2.0 ** math.ceil(math.log2(spread / (self.bins - 1)))
        first, last = math.floor(low / self.width), math.floor(high / self.width)
        if self.counts.numel() == 0:
            self.first, self.counts = first, torch.zeros(last - first + 1, dtype=torch.float64)
            return
        old_last = self.first + self.counts.numel() - 1
        first, last = min(first, self.first), max(last, old_last)
        shift = 0
        while (last >> shift) - (first >> shift) + 1 > self.bins:
            shift += 1
        index = (torch.arange(self.first, old_last + 1) >> shift) - (first >> shift)
        counts = torch.zeros((last >> shift) - (first >> shift) + 1, dtype=torch.float64)
        self.counts = counts.index_add_(0, index, self.counts)
        self.first, self.width = first >> shift, self.width * 2.0 ** shift


def as_histogram(hist: Union[CountHistogram, StreamingHistogram]) -> Histogram:
    return Histogram(int(hist.first), float(hist.width), hist.counts.numpy().astype(np.float64))


def kept_interval(lower: torch.Tensor, upper: torch.Tensor, bits: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Values the grid of ``[lower, upper]`` does not clip: ``[(-z-1/2)*s, (2^b-1-z+1/2)*s]``, float32.

    Bounds have ``bounds_shape``; so do the interval ends.
    """
    lower, upper = lower.detach().float(), upper.detach().float()
    step, zero_point = grid.step_and_zero_point(lower, upper, bits, symmetric)
    low, high = grid.clip_values(step, zero_point, bits)
    return low - step / 2, high + step / 2


def count_inside(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                 extent: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> int:
    """Values of ``x`` in ``[low, high]`` (bounds broadcast against ``x``: 0-d or ``(C_out, 1, ...)``).

    Counts what lies outside, and only on a side that the bounds cut into (the tensor's minimum and
    maximum, ``extent`` if already known, say which), so a side with nothing clipped costs nothing.
    """
    x = x.detach().float()
    low, high = low.to(x.device), high.to(x.device)
    data_min, data_max = extent if extent is not None else torch.aminmax(x)
    outside = 0
    if bool((low > data_min).any()):
        outside += int(torch.count_nonzero(x < low))
    if bool((high < data_max).any()):
        outside += int(torch.count_nonzero(x > high))
    return x.numel() - outside


@dataclass(frozen=True)
class Bounds:
    """One set of bounds of a quantizer (``bounds_shape``) and the share of data they keep in range."""

    lower: torch.Tensor
    upper: torch.Tensor
    inside: float
    exact: bool = True


@dataclass
class QuantizerStats:
    """What the report shows about one quantizer: its data and every set of bounds."""

    name: str
    kind: str
    role: str
    bits: int
    symmetric: bool
    count: int
    minimum: float
    maximum: float
    histogram: Histogram
    final: Bounds
    dobi: Bounds
    others: dict[str, Bounds] = field(default_factory=dict)

    @property
    def block(self) -> str:
        return block_of(self.name)

    @property
    def short(self) -> str:
        return self.name[len(self.block) + 1:] if self.block else self.name

    @property
    def clipped(self) -> float:
        """Share of calibration values the final bounds clip."""
        return 1.0 - self.final.inside

    @property
    def shift(self) -> float:
        """``(|dlower| + |dupper|) / (max - min)``, DOBI -> final, averaged over channels."""
        span = self.maximum - self.minimum
        if span <= 0:
            return 0.0
        moved = (self.final.lower - self.dobi.lower).abs() + (self.final.upper - self.dobi.upper).abs()
        return float(moved.double().mean()) / span


def block_of(name: str) -> str:
    """The block a quantizer belongs to: its name up to the last numeric component.

    ``layers.0.residual_group.blocks.1.attn.qkv.input`` -> ``layers.0.residual_group.blocks.1``;
    ``""`` when the name has no numeric component.
    """
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
    return ".".join(parts[:numeric[-1] + 1]) if numeric else ""


def rank_affected(stats: Sequence[QuantizerStats]) -> list[QuantizerStats]:
    """Most affected first: clipped share, then bound shift DOBI -> final (see the module docstring)."""
    return sorted(stats, key=lambda s: (-s.clipped, -s.shift, s.name))


class _ActivationCollector:
    """Observer of one activation quantizer: a histogram plus exact in-range counts per bound set."""

    def __init__(self, hist: Union[CountHistogram, StreamingHistogram],
                 intervals: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.hist = hist
        self.intervals = dict(intervals)
        self.inside = {label: 0 for label in self.intervals}

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        extent = torch.aminmax(x.detach().reshape(-1).float())
        try:
            if isinstance(self.hist, CountHistogram):
                self.hist.update(x, extent)
            else:
                self.hist.update(x)
        except ValueError as err:
            raise ValueError(f"quantizer {quantizer.name}: {err}") from None
        for label, (low, high) in self.intervals.items():
            self.inside[label] += count_inside(x, low, high, extent)


class _WeightCollector:
    def __init__(self) -> None:
        self.tensor: Optional[torch.Tensor] = None

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = x.detach()


class BoundSpec(NamedTuple):
    """Bounds of one quantizer in one artifact, with the grid they span."""

    lower: torch.Tensor
    upper: torch.Tensor
    bits: int
    symmetric: bool

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        return kept_interval(self.lower, self.upper, self.bits, self.symmetric)


def bound_specs(model: nn.Module) -> dict[str, BoundSpec]:
    """The current bounds of every quantizer of ``model`` (copies, CPU float32)."""
    return {name: BoundSpec(*_float((q.lower, q.upper)), q.bits, q.symmetric)
            for name, q in quantizers(model).items()}


#: ``{label: {quantizer name: BoundSpec}}``
BoundSets = Mapping[str, Mapping[str, BoundSpec]]


@dataclass(frozen=True)
class DobiOptions:
    """How to recompute DOBI (the artifact's ``method_options``; defaults of ``2dq-calibrate``)."""

    candidates: int = DEFAULT_CANDIDATES
    mode: str = "auto"
    bins: int = DEFAULT_BINS


def collect_stats(model: nn.Module, forward_loop: Callable[[nn.Module], None], final: str,
                  bound_sets: BoundSets, dobi: Union[str, DobiOptions]) -> list[QuantizerStats]:
    """Run ``forward_loop(model)`` once and return every quantizer's :class:`QuantizerStats`, in model order.

    ``bound_sets``: ``{label: {quantizer name: BoundSpec}}``; ``final`` is the label of the
    main artifact's bounds; ``dobi`` is the label of a set that holds DOBI's bounds for this
    calibration data, or :class:`DobiOptions` to recompute them. Sets that do not name every
    quantizer are skipped for the quantizers they miss.
    """
    recompute = isinstance(dobi, DobiOptions)
    if final not in bound_sets or (not recompute and dobi not in bound_sets):
        raise ValueError(f"bound sets {sorted(bound_sets)} lack {final!r} or {dobi!r}")

    def make(q: Quantizer):
        if q.kind == "weight":
            return _WeightCollector()
        hist = StreamingHistogram(dobi.bins) if recompute else CountHistogram()
        intervals = {label: bounds[q.name].interval() for label, bounds in bound_sets.items() if q.name in bounds}
        return _ActivationCollector(hist, intervals)

    observed = observe(model, forward_loop, make)
    return [_summarize(q, collector, final, bound_sets, dobi) for q, collector in observed.values()]


def _summarize(q: Quantizer, collector, final: str, bound_sets: BoundSets,
               dobi: Union[str, DobiOptions]) -> QuantizerStats:
    sets = {label: bounds[q.name] for label, bounds in bound_sets.items() if q.name in bounds}
    if isinstance(collector, _WeightCollector):
        weight = collector.tensor
        hist = CountHistogram()
        hist.update(weight)
        count = weight.numel()
        inside = {label: count_inside(weight, *spec.interval()) / count for label, spec in sets.items()}
    else:
        hist = collector.hist
        count = hist.count
        inside = {label: n / count for label, n in collector.inside.items()}
    histogram = as_histogram(hist)
    if isinstance(dobi, DobiOptions):
        dobi_bounds = _recompute_dobi(q, collector, hist, dobi)
        low, high = kept_interval(*dobi_bounds, q.bits, q.symmetric)
        if isinstance(collector, _WeightCollector):
            dobi_entry = Bounds(*dobi_bounds, count_inside(weight, low, high) / count)
        else:  # the data is gone: read the share from the histogram
            dobi_entry = Bounds(*dobi_bounds, histogram.share_inside(float(low), float(high)), exact=False)
    else:
        dobi_entry = Bounds(sets[dobi].lower, sets[dobi].upper, inside[dobi])
    others = {label: Bounds(spec.lower, spec.upper, inside[label]) for label, spec in sets.items()
              if label not in (final, dobi)}
    return QuantizerStats(q.name, q.kind, q.role, q.bits, q.symmetric, int(count), float(hist.min),
                          float(hist.max), histogram, Bounds(sets[final].lower, sets[final].upper, inside[final]),
                          dobi_entry, others)


def _recompute_dobi(q: Quantizer, collector, hist, options: DobiOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """DOBI's bounds for this quantizer, as :func:`calib.dobi.calibrate_dobi` computes them."""
    if isinstance(collector, _WeightCollector):
        axis = 0 if q.bounds_shape else None
        lower, upper, _, _ = search_bounds_full(collector.tensor, q.bits, "both", q.symmetric,
                                                options.candidates, axis, q.role, q.kind)
        return _float((lower.reshape(q.bounds_shape), upper.reshape(q.bounds_shape)))
    result = search_histogram(hist, q.bits, options.mode, q.symmetric, options.candidates, q.role)
    return _float((result.lower, result.upper))


def _float(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.detach().to("cpu", torch.float32).clone() for t in pair)
