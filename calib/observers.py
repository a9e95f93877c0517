"""Streaming statistics of quantizer inputs, fed through the quantizers' ``observer`` hook.

Calibration runs the float model once over the calibration patches; every quantizer hands each
tensor it sees to its observer and passes it on unchanged, so no activation outlives its layer.

- :class:`StreamingHistogram`: exact min/max, count and a fine histogram (count and sum per bin)
  whose range grows as data arrives. Bins are aligned to multiples of a power-of-two width ``w``;
  when data falls outside, ``w`` doubles as often as needed and pairs of bins merge exactly (the
  edges of the wider grid are edges of the finer one), so what was seen is never approximated
  twice. The width is always the smallest power of two that holds the range in ``bins`` bins
  (so more than ``bins/2`` bins span the data), whatever the batching of the data.
  DOBI scores its candidates from it, Percentile reads quantiles from it.
- :class:`MinMaxObserver`: running min/max only.
- :class:`WeightObserver`: keeps a reference to the weight tensor (no copy) for exact searches.

:func:`observe` installs observers, runs a forward loop and removes them whatever happens.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from toolchain.quant import Quantizer, quantizers

log = logging.getLogger(__name__)

DEFAULT_BINS = 8192
#: values binned per step of :meth:`StreamingHistogram.update`: 4 MiB of scratch, cache-sized (faster
#: than larger steps here, and small enough not to grow the allocator's heap)
_CHUNK = 1 << 18
#: narrowest bin width (2^-100): keeps x / width finite in float32 for |x| up to ~1e8
_MIN_WIDTH = 2.0 ** -100


class StreamingHistogram:
    """Histogram of everything passed to :meth:`update`, in bounded memory.

    State: ``min``, ``max``, ``count`` (exact), bin ``width`` (a power of two), index of the first bin
    ``first`` (bin ``k`` covers ``[k*w, (k+1)*w)``), and per-bin ``counts`` and ``sums`` (float64).

    >>> hist = StreamingHistogram(bins=1024)
    >>> hist.update(torch.randn(10_000)); hist.update(10 + torch.randn(10_000))  # the range grows
    >>> hist.count, round(hist.quantile(0.75))
    (20000, 10)
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"histogram bins must be an integer >= 16, got {bins!r}")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.width: Optional[float] = None
        self.first = 0
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.sums = torch.zeros(0, dtype=torch.float64)

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        """Observer hook signature: ``observer(quantizer, x)``."""
        try:
            self.update(x)
        except ValueError as err:
            raise ValueError(f"quantizer {quantizer.name}: {err}") from None

    def update(self, x: torch.Tensor) -> None:
        """Add every value of ``x`` (any shape; computed in float32 on ``x``'s device)."""
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if flat.dtype != torch.float32:
            flat = flat.float()
        low, high = (float(v) for v in torch.aminmax(flat))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("calibration data holds non-finite values (inf or nan)")
        self._cover(min(low, self.min), max(high, self.max))
        self.min, self.max = min(low, self.min), max(high, self.max)
        self.count += flat.numel()
        counts = torch.zeros_like(self.counts, device=flat.device)
        sums = torch.zeros_like(self.sums, device=flat.device)
        # x * 2^-e, its floor, and that minus `first` (a float32 integer too) are all exact in float32,
        # so the bin index is exact; the local index is small enough for int32
        scale = 1.0 / self.width
        size = min(_CHUNK, flat.numel())
        scaled = torch.empty(size, dtype=torch.float32, device=flat.device)
        index = torch.empty(size, dtype=torch.int32, device=flat.device)
        values = torch.empty(size, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK]
            n = part.numel()
            torch.mul(part, scale, out=scaled[:n]).floor_().sub_(self.first)
            idx = index[:n]
            idx.copy_(scaled[:n])
            vals = values[:n]
            vals.copy_(part)
            counts += torch.bincount(idx, minlength=counts.numel()).to(torch.float64)
            sums += torch.bincount(idx, weights=vals, minlength=sums.numel())
        self.counts += counts.cpu()
        self.sums += sums.cpu()

    def _cover(self, low: float, high: float) -> None:
        """Make the bins cover ``[low, high]``, doubling the width (merging bins) as needed."""
        if self.width is None:
            spread = high - low if high > low else max(abs(high), 1e-30)
            self.width = 2.0 ** math.ceil(math.log2(spread / (self.bins - 1)))
            # the smallest power of two that fits: growth then keeps the width the smallest that fits
            # everything seen, so the final histogram does not depend on how the data was batched
            while high > low and self.width / 2 >= _MIN_WIDTH and self._fits(low, high, self.width / 2):
                self.width /= 2
            # x / width must stay finite in float32 (only a range below ~1e-26 reaches this)
            self.width = max(self.width, _MIN_WIDTH)
            self.first = math.floor(low / self.width)
            size = math.floor(high / self.width) - self.first + 1
            self.counts = torch.zeros(size, dtype=torch.float64)
            self.sums = torch.zeros(size, dtype=torch.float64)
            return
        first, last = math.floor(low / self.width), math.floor(high / self.width)
        old_last = self.first + self.counts.numel() - 1
        if first >= self.first and last <= old_last:
            return
        first, last = min(first, self.first), max(last, old_last)
        shift = 0
        while (last >> shift) - (first >> shift) + 1 > self.bins:
            shift += 1
        # bin k of width w lies inside bin k >> shift of width w * 2^shift (floor for negatives too)
        old_index = torch.arange(self.first, old_last + 1, dtype=torch.int64) >> shift
        new_first = first >> shift
        size = (last >> shift) - new_first + 1
        counts = torch.zeros(size, dtype=torch.float64).index_add_(0, old_index - new_first, self.counts)
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, old_index - new_first, self.sums)
        self.width *= 2.0 ** shift
        self.first, self.counts, self.sums = new_first, counts, sums

    def _fits(self, low: float, high: float, width: float) -> bool:
        return math.floor(high / width) - math.floor(low / width) + 1 <= self.bins

    def bin_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean value and count of every non-empty bin, float64 ``(B,)`` each, in increasing order."""
        used = self.counts > 0
        counts = self.counts[used]
        return self.sums[used] / counts, counts

    def mean_std(self) -> tuple[float, float]:
        means, counts = self.bin_means()
        mean = float((means * counts).sum() / counts.sum())
        var = float((counts * (means - mean).square()).sum() / counts.sum())
        return mean, math.sqrt(var)

    def skewness(self) -> float:
        """Skewness of the data, from bin means (0 for a constant tensor)."""
        means, counts = self.bin_means()
        mean, std = self.mean_std()
        if std == 0.0:
            return 0.0
        return float((counts * ((means - mean) / std).pow(3)).sum() / counts.sum())

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``0 <= q <= 1``), interpolated linearly inside its bin.

        Exact at ``q = 0`` and ``q = 1`` (the streamed min/max); elsewhere within one bin width.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        if self.count == 0:
            raise ValueError("quantile of an empty histogram")
        if q == 0.0:
            return self.min
        if q == 1.0:
            return self.max
        cumulative = torch.cumsum(self.counts, 0)
        target = q * float(cumulative[-1])
        k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
        k = min(k, self.counts.numel() - 1)
        before = float(cumulative[k - 1]) if k > 0 else 0.0
        inside = float(self.counts[k])
        fraction = (target - before) / inside if inside > 0 else 0.0
        value = (self.first + k + fraction) * self.width
        return min(max(value, self.min), self.max)


class MinMaxObserver:
    """Running minimum and maximum over everything observed (per tensor)."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        low, high = (float(v) for v in torch.aminmax(x.detach().reshape(-1)))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"quantizer {quantizer.name}: calibration data holds non-finite values")
        self.min, self.max = min(low, self.min), max(high, self.max)

    @property
    def seen(self) -> bool:
        return self.min <= self.max


class WeightObserver:
    """Keeps the (first) weight tensor a quantizer sees; weights are constant within a pass."""

    def __init__(self) -> None:
        self.tensor: Optional[torch.Tensor] = None

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = x.detach()


AnyObserver = Union[StreamingHistogram, MinMaxObserver, WeightObserver]


def observe(model: nn.Module, forward_loop: Callable[[nn.Module], None],
            make_observer: Callable[[Quantizer], Any]) -> dict[str, tuple[Quantizer, Any]]:
    """Run ``forward_loop(model)`` once with ``make_observer(q)`` on every quantizer ``q``.

    The model runs as the float model (observers pass tensors through) under ``torch.no_grad()``.
    Observers are removed afterwards even on error. Returns ``{name: (quantizer, observer)}``.

    Raises:
        ValueError: the model has no quantizers, or a quantizer saw no tensor (not on the path
            the forward loop ran).
    """
    found = quantizers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no quantizers: call quantize_model() first")
    observers = {name: (q, make_observer(q)) for name, q in found.items()}
    seen: set[str] = set()

    def hook_for(observer: Any) -> Callable[[Quantizer, torch.Tensor], None]:
        def hook(quantizer: Quantizer, x: torch.Tensor) -> None:
            seen.add(quantizer.name)
            observer(quantizer, x)
        return hook

    try:
        for q, observer in observers.values():
            q.observer = hook_for(observer)
        with torch.no_grad():
            forward_loop(model)
    finally:
        for q, _ in observers.values():
            q.observer = None
    unseen = [name for name in found if name not in seen]
    if unseen:
        raise ValueError(f"{len(unseen)} quantizer(s) saw no data during calibration (not on the forward "
                         f"path of the calibration input): {unseen[:5]}")
    return observers


def apply_bounds(model: nn.Module, bounds: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``quantizer.set_bounds(lower, upper)`` for every named quantizer (all must be named)."""
    found = quantizers(model)
    missing = sorted(set(found) - set(bounds))
    if missing:
        raise ValueError(f"no bounds for {len(missing)} quantizer(s): {missing[:5]}")
    for name, (lower, upper) in bounds.items():
        found[name].set_bounds(lower, upper)


def batch_forward_loop(images: torch.Tensor, batch_size: int = 8, device: Union[str, torch.device] = "cpu",
                       progress: bool = True, desc: str = "calibration") -> Callable[[nn.Module], None]:
    """A forward loop over ``images`` ``(N, C, H, W)`` in batches of ``batch_size`` on ``device``.

    Every image goes through the model exactly once (one pass); outputs are discarded.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"calibration images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    def loop(model: nn.Module) -> None:
        for batch in tqdm(list(_batches(images, batch_size)), desc=desc, unit="batch", disable=not progress):
            model(batch.to(device))

    return loop


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]
