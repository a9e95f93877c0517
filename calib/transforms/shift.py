"""Exact asymmetric activation grids by shifting the tensor and folding the shift into biases.

DOBI and DQC find bounds ``[lower, upper]``; 2DQuant's grid is ``lower + k*s`` (``s`` the step,
``k = 0 .. 2^b-1``), whose zero point ``-lower/s`` is not an integer, while an integer engine
(section 2 of ARCHITECTURE.md) runs grids ``(k - z)*s`` with integer ``z``. Quantizing
``x' = x - c`` instead of ``x``, with ``c = lower + z*s``, puts 2DQuant's grid on an integer zero
point: ``x'`` has bounds ``[-z*s, (2^b-1-z)*s]``. The offset ``c`` is then folded into the weights
around the tensor, so the exported graph has no extra op. Where the tensor comes from and goes to
decides whether that is possible; the algebra of each fold (per tensor: ``c`` is one number, ``1``
the all-ones vector):

- ``"norm_output"``: a LayerNorm output ``y = gamma*xhat + beta`` read only by linears ``W``
  (bias ``b``): ``beta' = beta - c`` gives ``y' = y - c*1``, and ``b' = b + c * W_q 1`` (row sums of
  the *fake-quantized* weight, the weight the layer multiplies with) gives
  ``W_q y' + b' = W_q y + b``. The exact grid is that of the first consumer's input quantizer; other
  consumers see ``y'`` with their own (integer) zero points.
- ``"attn_value"``: ``v = x W_v^T + b_v`` taken from a slice of the qkv linear; ``b_v' = b_v - c``
  gives ``v' = v - c*1``. Every softmax row sums to one, so ``P v' = P v - c*1``: the attention output
  (the ``proj`` input) moves by the same ``c``, folded into the proj bias as above. With quantized
  probabilities (rows summing to about one) the fold is what the deployed graph computes, not an
  identity; the float model is unchanged. The exact grid is v's; the proj input keeps an integer
  zero point on the shifted tensor.
- ``"attn_key"``: ``k' = k - c*1`` through the k slice of the qkv bias; ``q.k' = q.k - c*sum(q)`` is
  the same for every key of a query, and softmax ignores a constant added to a row (relative
  position biases and window masks add per-key terms, still exact). No bias to fold. Not available
  where k is normalized before the product (cosine attention: NGswin), which detection finds out.

Not folded: q (``(q - c).k`` varies along the keys), the softmax probabilities (their zero is
meaningful), and the GELU output into ``fc2`` (no affine op before it: a shift there needs an
explicit ``Sub`` in the graph; :mod:`calib.transforms.input_shift` offers that per channel,
``--input-shifts``).

Sites are found from data flow like smoothing groups (:mod:`calib.transforms.trace`: per-channel
statistics of one float forward: a LayerNorm output equal to a linear input, an attention operand equal to a slice of a
linear's output), then confirmed by a float forward with random offsets. Each site's offset is a
learnable scalar Parameter (:func:`shift_parameters`), set from the calibrated bounds by
:func:`init_shifts` and trainable in DQC; quantizers keep their own bounds, which are the bounds of
the shifted tensor (what the engine uses). :func:`calib.transforms.fold.bake_transforms` writes
everything into plain biases for export; :mod:`calib.transforms.registry` carries the folds through
an artifact.

Offsets: :func:`init_shifts` makes the current bounds' 2DQuant grid exact (after DQC, or after DOBI
for a quick start); :func:`calibrate_shifts` re-runs DOBI's search for the shifted quantizers scored
on the grid the shift realizes (DOBI's own bounds are the best integer-zero-point grids, not the best
2DQuant grids).

Order: detect (smoothing groups, shift sites) -> add smoothing, SmoothQuant -> add shifts (offset 0)
-> DOBI -> :func:`calibrate_shifts` -> DQC (bounds, offsets, factors) -> bake -> export.

>>> from toolchain.models.examples import tiny_swinir
>>> from toolchain.quant import QuantConfig, quantize_model
>>> model = quantize_model(tiny_swinir(), QuantConfig())
>>> x = torch.rand(1, 3, 16, 16)
>>> with float_mode(model):
...     before = model(x)
>>> sites = find_shift_sites(model, x)
>>> [(site.kind, site.producer.split(".")[-1]) for site in sites]
[('norm_output', 'norm1'), ('attn_key', 'qkv'), ('attn_value', 'qkv'), ('norm_output', 'norm2')]
>>> offsets = add_shifts(model, sites)
>>> with torch.no_grad():
...     for offset in offsets.values():
...         _ = offset.fill_(0.25)
>>> with float_mode(model):   # the folds leave the float model's output unchanged
...     torch.allclose(model(x), before, atol=1e-5)
True
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear, float_mode, grid, quantizers

from ..dobi import DEFAULT_CANDIDATES, candidate_bounds, choose_mode
from ..observers import DEFAULT_BINS, StreamingHistogram
from .fold import FoldParametrization, _check_unfolded, _fold_modules, _module, quantized_weight
from .trace import attention_operands, norm_consumers, trace_channels, verify_folds

log = logging.getLogger(__name__)

KINDS = ("norm_output", "attn_value", "attn_key")


@dataclass(frozen=True)
class ShiftSite:
    """One foldable shift: ``offset`` is subtracted from ``producer.bias[start:stop]``.

    ``exact``: the quantizer whose grid the offset makes 2DQuant's; ``shifted``: every quantizer that
    sees the shifted tensor (``exact`` first); ``bias_folds``: linears whose bias gets
    ``+ offset * W_q 1``.
    """

    kind: str
    producer: str
    start: int
    stop: int
    exact: str
    shifted: tuple[str, ...]
    bias_folds: tuple[str, ...]
    #: among the sites of one producer and kind, in slice order: several attention branches can take
    #: their k (or v) from slices of one qkv linear (DAT's two spatial-attention branches)
    index: int = 0

    @property
    def name(self) -> str:
        base = f"{self.producer}.{self.kind}"
        return base if self.index == 0 else f"{base}.{self.index}"

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "producer": self.producer, "start": self.start, "stop": self.stop,
                "exact": self.exact, "shifted": list(self.shifted), "bias_folds": list(self.bias_folds)}
        return {**data, "index": self.index} if self.index else data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> ShiftSite:
        site = ShiftSite(str(data["kind"]), str(data["producer"]), int(data["start"]), int(data["stop"]),
                         str(data["exact"]), tuple(map(str, data["shifted"])), tuple(map(str, data["bias_folds"])),
                         int(data.get("index", 0)))
        if site.kind not in KINDS:
            raise ValueError(f"shift site {site.name}: kind must be one of {KINDS}")
        return site


class SubtractOffset(FoldParametrization):
    """Producer bias ``(C,)`` -> ``b`` with ``offset`` subtracted from ``b[start:stop]``; owns ``offset``."""

    def __init__(self, offset: nn.Parameter, site: ShiftSite) -> None:
        super().__init__()
        self.site = site
        self._share("offset", offset, owner=True)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        start, stop = self.site.start, self.site.stop
        return torch.cat([bias[:start], bias[start:stop] - self.offset, bias[stop:]])


class AddFoldedOffset(FoldParametrization):
    """Consumer bias ``(C_out,)`` -> ``b + offset * W_q.sum(1)`` with ``W_q`` the layer's current weight
    as its weight quantizer outputs it (the raw weight while the quantizer is off)."""

    def __init__(self, offset: nn.Parameter, site: ShiftSite, linear: QuantLinear) -> None:
        super().__init__()
        self.site = site
        self._share("offset", offset, owner=False)
        object.__setattr__(self, "linear", linear)  # a reference, not a submodule

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.offset * quantized_weight(self.linear).sum(1)


def find_shift_sites(model: nn.Module, example: torch.Tensor, kinds: Iterable[str] = KINDS,
                     verify: bool = True) -> list[ShiftSite]:
    """The foldable shift sites of ``model`` (see the module docstring), in module order of the producers.

    ``example``: an input the model does not pad. Run on the model before any fold is added.
    """
    kinds = tuple(kinds)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"shift kinds must be among {KINDS}, got {sorted(unknown)}")
    _check_unfolded(model)
    modules = dict(model.named_modules())
    trace = trace_channels(model, example)
    sites: list[ShiftSite] = []
    if "norm_output" in kinds:
        for norm, linears in norm_consumers(modules, trace).items():
            if modules[norm].bias is None or any(modules[p].bias is None for p in linears):
                log.info("%s: no bias to fold a shift into", norm)
                continue
            names = tuple(modules[p].input_quantizer.name for p in linears)
            sites.append(ShiftSite("norm_output", norm, 0, modules[norm].bias.shape[0], names[0], names,
                                   tuple(linears)))
    for role, kind in (("attn_k", "attn_key"), ("attn_v", "attn_value")):
        if kind not in kinds:
            continue
        for path, source, readers in attention_operands(modules, trace, role):
            if source is None or modules[source[0]].bias is None:
                log.info("%s: %s is not a slice of a biased linear's output; no %s shift", path, role, kind)
                continue
            exact = modules[path].b_quantizer.name
            if kind == "attn_key":
                sites.append(ShiftSite(kind, *source, exact, (exact,), ()))
                continue
            if len(readers) != 1 or modules[readers[0]].bias is None:
                log.info("%s: attention output not read by exactly one biased linear; no value shift", path)
                continue
            proj = modules[readers[0]]
            shifted = (exact,) + ((proj.input_quantizer.name,) if proj.input_quantizer is not None else ())
            sites.append(ShiftSite(kind, *source, exact, shifted, (readers[0],)))
    order = {path: i for i, path in enumerate(modules)}
    sites.sort(key=lambda site: (order[site.producer], site.start))
    seen: dict[tuple[str, str], int] = {}
    for i, site in enumerate(sites):
        count = seen.get((site.producer, site.kind), 0)
        seen[(site.producer, site.kind)] = count + 1
        if count:
            sites[i] = dataclasses.replace(site, index=count)
    if verify:
        sites = verify_folds(model, example, sites, _random_shifts)
    log.info("shifts: %d sites (%s)", len(sites), ", ".join(f"{k} {sum(s.kind == k for s in sites)}" for k in kinds))
    return sites


def _random_shifts(model: nn.Module, sites: list[ShiftSite]) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    params = add_shifts(model, sites)
    with torch.no_grad():
        for p in params.values():
            p.fill_(float(torch.rand((), generator=generator)) + 0.5)
    return lambda: _remove_shifts(model, sites)


def add_shifts(model: nn.Module, sites: Iterable[ShiftSite]) -> dict[str, nn.Parameter]:
    """Register the folds of ``sites`` with ``offset = 0`` (identity); returns the offsets by site name."""
    modules = dict(model.named_modules())
    existing = {s.name for s in shift_sites(model)}
    made: dict[str, nn.Parameter] = {}
    for site in sites:
        if site.name in existing or site.name in made:
            raise ValueError(f"shift site {site.name} is already folded")
        producer = modules.get(site.producer)
        if producer is None or getattr(producer, "bias", None) is None:
            raise ValueError(f"shift site {site.name}: {site.producer!r} is not a module with a bias")
        if not 0 <= site.start < site.stop <= producer.bias.shape[0]:
            raise ValueError(f"shift site {site.name}: slice [{site.start}:{site.stop}] outside the bias")
        folds = [_module(modules, path, QuantLinear) for path in site.bias_folds]
        if any(linear.bias is None for linear in folds):
            raise ValueError(f"shift site {site.name}: a linear of {site.bias_folds} has no bias")
        if any(linear.input_rotation is not None for linear in folds):
            raise ValueError(f"shift site {site.name}: a linear of {site.bias_folds} has a rotated input, which "
                             "does not keep the bias fold exact (calib.transforms.rotation.conflicting_shift_sites)")
        bias = producer.bias
        offset = nn.Parameter(torch.zeros((), dtype=bias.dtype, device=bias.device))
        parametrize.register_parametrization(producer, "bias", SubtractOffset(offset, site))
        for linear in folds:
            parametrize.register_parametrization(linear, "bias", AddFoldedOffset(offset, site, linear))
        made[site.name] = offset
    return made


def _remove_shifts(model: nn.Module, sites: Iterable[ShiftSite]) -> None:
    """Undo :func:`add_shifts` exactly; only for biases that carry no other fold (verification)."""
    modules = dict(model.named_modules())
    for site in sites:
        for path in (site.producer, *site.bias_folds):
            if parametrize.is_parametrized(modules[path], "bias"):
                parametrize.remove_parametrizations(modules[path], "bias", leave_parametrized=False)


def shift_owners(model: nn.Module) -> list[SubtractOffset]:
    """The parametrizations that own each site's offset, in module order."""
    return [p for m in model.modules() for p in _fold_modules(m, "bias", SubtractOffset)]


def shift_sites(model: nn.Module) -> list[ShiftSite]:
    """The sites currently folded into ``model``."""
    return [p.site for p in shift_owners(model)]


def shift_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scalar ``offset`` Parameters of every shift site (what DQC trains with the bounds)."""
    return [p.offset for p in shift_owners(model)]


@torch.no_grad()
def init_shifts(model: nn.Module) -> dict[str, float]:
    """Give every site the offset that makes its ``exact`` quantizer's grid 2DQuant's ``lower + k*s``.

    Reads the current bounds (from DOBI or DQC, of the tensor as currently shifted), takes them back
    to the unshifted tensor, and sets ``offset = lower + z*s`` (``z`` the grid's integer zero point,
    so ``|offset| <= s/2`` unless ``z`` is clamped); the bounds of every quantizer that sees the
    tensor move by the change of offset. Idempotent. Returns the offsets by site name.
    """
    found = quantizers(model)
    offsets = {}
    for owner in shift_owners(model):
        site = owner.site
        exact = found[site.exact]
        if not exact.initialized:
            raise ValueError(f"init_shifts: quantizer {site.exact} has no bounds yet; run DOBI first")
        old = owner.offset.detach().clone()
        lower, upper = exact.lower + old, exact.upper + old  # bounds of the unshifted tensor
        step, zero_point = grid.step_and_zero_point(lower, upper, exact.bits, exact.symmetric)
        new = lower + zero_point * step
        delta = new - old
        for name in site.shifted:
            quantizer = found[name]
            quantizer.set_bounds(quantizer.lower - delta, quantizer.upper - delta)
        owner.offset.copy_(new)
        offsets[site.name] = float(new)
    log.info("init_shifts: %d offsets set", len(offsets))
    return offsets


def shifted_fake_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                          symmetric: bool = False) -> torch.Tensor:
    """What a shifted quantizer computes, in the tensor's own coordinates: ``c + Q(x - c)`` with
    ``c = lower + z*s``, i.e. 2DQuant's grid ``lower + k*s`` (bounds broadcast against ``x``)."""
    step, zero_point = grid.step_and_zero_point(lower, upper, bits, symmetric)
    offset = lower + zero_point * step
    return offset + grid.fake_quantize(x - offset, lower - offset, upper - offset, bits, symmetric)


@torch.no_grad()
def calibrate_shifts(model: nn.Module, forward_loop: Callable[[nn.Module], None], *,
                     candidates: int = DEFAULT_CANDIDATES, mode: str = "auto", bins: int = DEFAULT_BINS
                     ) -> dict[str, float]:
    """DOBI for every site's ``exact`` quantizer, scored on the grid the shift realizes; sets the offsets.

    Plain DOBI scores its candidates on integer-zero-point grids, so its bounds are the best for
    those; here the same candidates (:func:`calib.dobi.candidate_bounds`, asymmetric even for 8-bit
    quantizers, since the shift makes any grid exact) are scored on 2DQuant's ``lower + k*s``
    (:func:`shifted_fake_quantize`) from a streamed histogram of one float pass. The offset and the
    bounds of every quantizer that sees the tensor then move as in :func:`init_shifts`. Run after
    DOBI (the other quantizers keep DOBI's bounds). Returns the offsets by site name.
    """
    owners = shift_owners(model)
    found = quantizers(model)
    histograms = {owner.site.exact: StreamingHistogram(bins) for owner in owners}
    try:
        for name, histogram in histograms.items():
            found[name].observer = histogram
        with float_mode(model):
            forward_loop(model)
    finally:
        for name in histograms:
            found[name].observer = None
    offsets = {}
    for owner in owners:
        site, histogram = owner.site, histograms[owner.site.exact]
        exact = found[site.exact]
        if histogram.count == 0:
            raise ValueError(f"calibrate_shifts: quantizer {site.exact} saw no data in the forward loop")
        upper_mode = (choose_mode(histogram.min, histogram.max, histogram.skewness(), exact.role) if mode == "auto"
                      else mode) == "upper"
        cand = candidate_bounds(torch.tensor(histogram.min, dtype=torch.float64),
                                torch.tensor(histogram.max, dtype=torch.float64), exact.bits,
                                torch.tensor(upper_mode), False, candidates)
        means, counts = histogram.bin_means()
        lower, upper = cand.lower.float().unsqueeze(-1), cand.upper.float().unsqueeze(-1)  # (n, 1)
        q = shifted_fake_quantize(means.float().unsqueeze(0), lower, upper, exact.bits, exact.symmetric)
        best = int((counts * (means - q.double()).square()).sum(-1).argmin())
        lower, upper = lower[best, 0], upper[best, 0]  # in the coordinates of the tensor as now shifted
        step, zero_point = grid.step_and_zero_point(lower, upper, exact.bits, exact.symmetric)
        delta = lower + zero_point * step
        for name in site.shifted[1:]:
            quantizer = found[name]
            quantizer.set_bounds(quantizer.lower - delta, quantizer.upper - delta)
        exact.set_bounds(lower - delta, upper - delta)
        owner.offset.add_(delta)
        offsets[site.name] = float(owner.offset)
    log.info("calibrate_shifts: %d offsets and exact grids set", len(offsets))
    return offsets
