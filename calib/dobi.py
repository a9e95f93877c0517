"""DOBI: distribution-oriented bound initialization (2DQuant, Liu et al., NeurIPS 2024).

For one quantizer, DOBI scores ``candidates`` (100) bound pairs by the quantization error
``||x - Q(x)||_2`` on the calibration data and keeps the best; ``Q`` is our grid
(:func:`toolchain.quant.grid.fake_quantize`, integer zero point), so the error is the error the
engines make. Candidate ``i = 0 .. n-1`` of a tensor with range ``[m, M]`` (``R = M - m``):

- ``"both"`` (bell-shaped tensors: weights, linear inputs, q, k, v): both ends move in by equal
  steps, ``lower_i = m + i*R/(2n)``, ``upper_i = M - i*R/(2n)``;
- ``"upper"`` (one-sided, long right tail: softmax probabilities, GELU outputs): ``lower_i = m``,
  ``upper_i = M - i*R/n``;
- symmetric grids (``z = 2^(b-1)``: trt-int4 weights, every 8-bit grid) have one free parameter,
  the step, so ``mode`` does not apply: the largest step ``s_0 = max(M/(2^b-1-z), -m/z)`` covers
  ``[m, M]``, ``s_i = s_0*(n-i)/n``, and the bounds returned are the grid's own clip values
  ``(-z*s_i, (2^b-1-z)*s_i)``.

Ties keep the first (widest) candidate. A constant tensor is widened to include 0 first, so
that it has a range to search.

``mode="auto"`` (:func:`choose_mode`) decides per tensor; the released 2DQuant code never turns
the one-sided search on, the paper describes it. The rule (:data:`TAIL_RATIO`, :data:`SKEW_MIN`):

1. weights -> ``"both"`` (bell-shaped in every model we quantize);
2. ``"upper"`` when the negative tail is short, ``-m <= TAIL_RATIO * M`` (``M > 0``; true for
   ``m >= 0``), and the tensor is right-skewed, skewness ``>= SKEW_MIN``;
3. for the one-sided roles (``attn_probs``, ``mlp_hidden``) the role vouches for the shape and
   only the tail test of 2 applies; otherwise -> ``"both"``.

Softmax (``m >= 0``, skewness 3..10) and GELU outputs (``m = -0.17``, skewness 1.6..4) pass;
Gaussians (``-m ~ M``) and shifted Gaussians (skewness ~0) do not.

:func:`search_bounds` is the exact search on a tensor (weights, tests); activations are streamed
into a :class:`~calib.observers.StreamingHistogram` and scored by :func:`search_histogram`;
:func:`calibrate_dobi` runs both over a whole model in one forward pass.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from toolchain.quant import grid

from .observers import (
    DEFAULT_BINS,
    StreamingHistogram,
    WeightObserver,
    apply_bounds,
    observe,
)

log = logging.getLogger(__name__)

MODES = ("auto", "both", "upper")
DEFAULT_CANDIDATES = 100
#: "upper" needs the negative tail to be at most this fraction of the maximum
TAIL_RATIO = 0.2
#: "upper" needs at least this skewness unless the quantizer's role is one-sided
SKEW_MIN = 0.5
#: roles whose tensors are one-sided by construction (softmax output, GELU output)
ONE_SIDED_ROLES = ("attn_probs", "mlp_hidden")
#: bound on candidates x elements materialized at once by the exact search
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Candidates:
    """Candidate bounds ``lower``/``upper`` ``(n, *S)`` for tensors (or channels) of shape ``S``.

    ``step_lower``/``step_upper`` ``(*S)`` are the spacings between consecutive candidates (the
    "one candidate step" tolerances of the tests).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    step_lower: torch.Tensor
    step_upper: torch.Tensor


@dataclass(frozen=True)
class SearchResult:
    """What DOBI chose for one quantizer: bounds (``bounds_shape``), mode(s) and candidate index."""

    lower: torch.Tensor
    upper: torch.Tensor
    mode: str  # "both", "upper", "symmetric" or "mixed" (per-channel, channels differ)
    index: torch.Tensor  # chosen candidate per tensor / channel, int64


def choose_mode(low: float, high: float, skewness: float, role: Optional[str] = None,
                kind: Optional[str] = None) -> str:
    """``"both"`` or ``"upper"`` for a tensor with range ``[low, high]`` (see the module docstring)."""
    if kind == "weight" or role == "weight":
        return "both"
    short_tail = high > 0 and -low <= TAIL_RATIO * high
    if not short_tail:
        return "both"
    if role in ONE_SIDED_ROLES or skewness >= SKEW_MIN:
        return "upper"
    return "both"


def candidate_bounds(low: torch.Tensor, high: torch.Tensor, bits: int, one_sided: torch.Tensor,
                     symmetric: bool = False, n: int = DEFAULT_CANDIDATES) -> Candidates:
    """The ``n`` DOBI candidates for ranges ``[low, high]`` (float64 tensors of one shape ``S``).

    ``one_sided`` (bool, shape ``S``) selects the "upper" search per entry; ignored when
    ``symmetric``. Returns float64 :class:`Candidates` of shape ``(n, *S)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"candidates must be a positive integer, got {n!r}")
    grid.check_bits(bits)
    low, high = _widen_constant(low.to(torch.float64), high.to(torch.float64))
    i = torch.arange(n, dtype=torch.float64, device=low.device).view(-1, *([1] * low.dim()))
    if symmetric or bits == grid.MAX_BITS:
        z = float(1 << (bits - 1))
        top = grid.levels(bits) - z
        s0 = torch.maximum(high / top, -low / z).clamp_min(torch.finfo(torch.float32).tiny)
        steps = s0 * (n - i) / n
        return Candidates(-z * steps, top * steps, z * s0 / n, top * s0 / n)
    span = high - low
    one_sided = torch.as_tensor(one_sided, dtype=torch.bool, device=low.device).expand_as(low)
    step_lower = torch.where(one_sided, torch.zeros_like(span), span / (2 * n))
    step_upper = torch.where(one_sided, span / n, span / (2 * n))
    return Candidates(low + i * step_lower, high - i * step_upper, step_lower, step_upper)


def _widen_constant(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A constant tensor has no range to shrink: widen ``[c, c]`` to include 0 (exact for ``c``)."""
    flat = high <= low
    if not bool(flat.any()):
        return low, high
    new_low = torch.where(flat, torch.minimum(low, torch.zeros_like(low)), low)
    new_high = torch.where(flat, torch.maximum(high, torch.zeros_like(high)), high)
    new_high = torch.where(new_high <= new_low, new_low + grid.BOUND_EPS, new_high)
    return new_low, new_high


def search_bounds(x: torch.Tensor, bits: int, mode: str = "auto", symmetric: bool = False,
                  candidates: int = DEFAULT_CANDIDATES, axis: Optional[int] = None,
                  role: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact DOBI search of the bounds of ``x``: every candidate is a full fake-quant pass.

    ``axis=None`` searches one pair for the whole tensor (0-d results); ``axis=k`` searches every
    slice along dimension ``k`` at once (per-channel weights: ``axis=0``) and returns bounds of
    ``x``'s shape with every other dimension 1 (``(C_out, 1)`` for a Linear weight). ``role`` is the
    quantizer role, a hint for ``mode="auto"``.

    >>> x = torch.softmax(4 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    >>> lower, upper = search_bounds(x, bits=4)  # one-sided: "upper" search, lower stays at the minimum
    >>> bool(lower == x.min()), bool(upper < x.max())
    (True, True)
    """
    return search_bounds_full(x, bits, mode, symmetric, candidates, axis, role)[:2]


def search_bounds_full(x: torch.Tensor, bits: int, mode: str = "auto", symmetric: bool = False,
                       candidates: int = DEFAULT_CANDIDATES, axis: Optional[int] = None,
                       role: Optional[str] = None, kind: Optional[str] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """:func:`search_bounds` that also returns the mode used and the chosen candidate indices."""
    _check_mode(mode)
    grid.check_bits(bits)
    if x.numel() == 0:
        raise ValueError("search_bounds: empty tensor")
    if not torch.isfinite(x).all():
        raise ValueError("search_bounds: the tensor holds non-finite values")
    with torch.no_grad():
        x = x.detach()
        if not x.is_floating_point():
            x = x.float()
        if axis is None:
            rows = x.reshape(1, -1)
            out_shape: tuple[int, ...] = ()
        else:
            axis = axis % x.dim()
            rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
            out_shape = tuple(x.shape[d] if d == axis else 1 for d in range(x.dim()))
        low, high = rows.aminmax(dim=1)
        low, high = low.double(), high.double()
        one_sided, mode_name = _one_sided(rows, low, high, mode, symmetric or bits == grid.MAX_BITS,
                                          role, kind)
        cand = candidate_bounds(low, high, bits, one_sided, symmetric, candidates)
        errors = _exact_errors(rows, cand, bits, symmetric)
        index = errors.argmin(dim=0)  # first minimum on ties, as a plain loop with "<"
        lower, upper = _pick(cand, index, rows.dtype)
    return lower.reshape(out_shape), upper.reshape(out_shape), mode_name, index


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"DOBI mode must be one of {MODES}, got {mode!r}")


def _one_sided(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, mode: str, symmetric: bool,
               role: Optional[str], kind: Optional[str]) -> tuple[torch.Tensor, str]:
    """Per-row "upper" flags and a name for the mode(s) used."""
    if symmetric:
        return torch.zeros_like(low, dtype=torch.bool), "symmetric"
    if mode != "auto":
        return torch.full_like(low, mode == "upper", dtype=torch.bool), mode
    skew = _skewness(rows)
    flags = torch.tensor([choose_mode(float(lo), float(hi), float(sk), role, kind) == "upper"
                          for lo, hi, sk in zip(low.tolist(), high.tolist(), skew.tolist())], device=low.device)
    return flags, _mode_name(flags)


def _mode_name(flags: torch.Tensor) -> str:
    if bool(flags.all()):
        return "upper"
    return "mixed" if bool(flags.any()) else "both"


def _skewness(rows: torch.Tensor) -> torch.Tensor:
    """Sample skewness of each row (0 for a constant row), float64."""
    centered = rows.double() - rows.double().mean(dim=1, keepdim=True)
    var = centered.square().mean(dim=1)
    third = centered.pow(3).mean(dim=1)
    return torch.where(var > 0, third / var.clamp_min(1e-300).pow(1.5), torch.zeros_like(var))


def _exact_errors(rows: torch.Tensor, cand: Candidates, bits: int, symmetric: bool) -> torch.Tensor:
    """Squared quantization error ``(n, C)`` of every candidate on every row of ``rows`` ``(C, K)``.

    Candidates are evaluated in chunks so that at most ``_CHUNK_ELEMENTS`` values are held.
    """
    n = cand.lower.shape[0]
    per_chunk = max(1, _CHUNK_ELEMENTS // rows.numel())
    lower = cand.lower.to(rows.dtype).unsqueeze(-1)  # (n, C, 1)
    upper = cand.upper.to(rows.dtype).unsqueeze(-1)
    errors = []
    for start in range(0, n, per_chunk):
        q = grid.fake_quantize(rows, lower[start:start + per_chunk], upper[start:start + per_chunk],
                               bits, symmetric)
        errors.append((q - rows).double().square().sum(dim=-1))
    return torch.cat(errors)


def _pick(cand: Candidates, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(index.numel(), device=index.device)
    return cand.lower[index, rows].to(dtype), cand.upper[index, rows].to(dtype)


def search_histogram(hist: StreamingHistogram, bits: int, mode: str = "auto", symmetric: bool = False,
                     candidates: int = DEFAULT_CANDIDATES, role: Optional[str] = None
                     ) -> SearchResult:
    """DOBI on streamed data: the same candidates as :func:`search_bounds`, scored from ``hist``.

    The candidates come from the exact streamed minimum and maximum. Each histogram bin holds the
    count and the sum of its values; a candidate's error is ``sum_bins count * (mean - Q(mean))^2``
    (up to the within-bin spread, which no candidate changes). It equals the exact error except in
    the few bins that straddle a rounding or clipping boundary of the candidate's grid.
    """
    _check_mode(mode)
    grid.check_bits(bits)
    if hist.count == 0:
        raise ValueError("search_histogram: the histogram saw no data")
    low = torch.tensor(hist.min, dtype=torch.float64)
    high = torch.tensor(hist.max, dtype=torch.float64)
    sym = symmetric or bits == grid.MAX_BITS
    if sym:
        flags, mode_name = torch.tensor(False), "symmetric"
    elif mode == "auto":
        upper = choose_mode(hist.min, hist.max, hist.skewness(), role) == "upper"
        flags, mode_name = torch.tensor(upper), "upper" if upper else "both"
    else:
        flags, mode_name = torch.tensor(mode == "upper"), mode
    cand = candidate_bounds(low, high, bits, flags, symmetric, candidates)
    means, counts = hist.bin_means()
    lower = cand.lower.float().unsqueeze(-1)  # (n, 1)
    upper = cand.upper.float().unsqueeze(-1)
    q = grid.fake_quantize(means.float().unsqueeze(0), lower, upper, bits, symmetric)  # (n, bins)
    errors = (counts * (means - q.double()).square()).sum(dim=-1)
    index = errors.argmin()
    return SearchResult(cand.lower[index].float(), cand.upper[index].float(), mode_name, index)


def calibrate_dobi(model: nn.Module, forward_loop: Callable[[nn.Module], None], *,
                   candidates: int = DEFAULT_CANDIDATES, mode: str = "auto", bins: int = DEFAULT_BINS,
                   ) -> dict[str, SearchResult]:
    """DOBI for every quantizer of ``model`` from one run of ``forward_loop(model)``; sets the bounds.

    Activations stream into one :class:`StreamingHistogram` per quantizer (memory: ``bins`` x 2
    float64 each, whatever the data size); weights are searched exactly on their own tensor, per
    output channel when the quantizer's bounds are per channel. ``mode`` overrides the automatic
    choice for activations (weights always use "both" unless symmetric). Returns what was chosen,
    by quantizer name.

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> from toolchain.quant import QuantConfig, quantize_model
    >>> from calib.observers import batch_forward_loop
    >>> model = quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    >>> lr_patches = torch.rand(8, 3, 16, 16)
    >>> results = calibrate_dobi(model, batch_forward_loop(lr_patches, batch_size=8, progress=False))
    >>> len(results), results["layers.0.residual_group.blocks.0.attn.qkv.weight"].mode
    (12, 'both')
    >>> model(lr_patches).shape                     # bounds set: the model runs quantized
    torch.Size([8, 3, 32, 32])
    """
    _check_mode(mode)
    stats = observe(model, forward_loop, lambda q: WeightObserver() if q.kind == "weight"
                    else StreamingHistogram(bins))
    results: dict[str, SearchResult] = {}
    for name, (quantizer, observer) in stats.items():
        if isinstance(observer, WeightObserver):
            axis = 0 if quantizer.bounds_shape else None
            lower, upper, used, index = search_bounds_full(
                observer.tensor, quantizer.bits, "both", quantizer.symmetric, candidates, axis,
                quantizer.role, quantizer.kind)
            results[name] = SearchResult(lower.reshape(quantizer.bounds_shape),
                                         upper.reshape(quantizer.bounds_shape), used, index)
        else:
            results[name] = search_histogram(observer, quantizer.bits, mode, quantizer.symmetric,
                                             candidates, quantizer.role)
        log.debug("DOBI %s (%s, %s): candidate %s -> [%s, %s]", name, quantizer.role, results[name].mode,
                  results[name].index.tolist(), _short(results[name].lower), _short(results[name].upper))
    apply_bounds(model, {name: (r.lower, r.upper) for name, r in results.items()})
    modes = [r.mode for name, r in results.items() if stats[name][0].kind == "activation"]
    log.info("DOBI set %d quantizers (activations: %d both, %d upper, %d symmetric)", len(results),
             modes.count("both"), modes.count("upper"), modes.count("symmetric"))
    return results


def _short(t: torch.Tensor) -> str:
    return f"{float(t):.4g}" if t.numel() == 1 else f"<{t.numel()} channels>"
