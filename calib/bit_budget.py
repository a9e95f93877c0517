"""Mixed precision under a bit budget: choose each quantizer's width so that the average stays within it.

The average is defined per kind and the budget applies to each:

- **weight bits**: the mean width over every quantized weight element, ``sum_q b_q * n_q / sum_q n_q``
  with ``n_q`` the parameter count of quantizer ``q``'s weight tensor (what the weights occupy);
- **activation bits**: the mean width over every quantized activation element that one forward of one
  calibration patch produces, ``n_q`` = elements seen by quantizer ``q`` per patch (for DAT/SwinIR the
  attention probabilities dominate: a window of ``N`` tokens gives ``N^2`` of them per head).

A budget of 4.0 therefore means: weight average <= 4.0 *and* activation average <= 4.0, so a uniform
W4A4 model is always a candidate.

How the widths are chosen (every quantizer is its own group; weights and activations are two separate
knapsacks because the budget applies to each):

1. **statistics**: one float pass over the calibration patches (as DOBI's): a histogram per activation
   quantizer, the tensor per weight quantizer, the element counts;
2. **local error**: for every quantizer and allowed width ``b``, DOBI's bounds at ``b`` and their mean
   squared quantization error ``d_q(b)`` on that data (exact for weights, from the histogram for
   activations; cheap, no forward);
3. **output error** (real forwards): with quantizer ``q`` alone quantized at its base width on its DOBI
   bounds, the rest float, the mean squared difference of the clamped output from the float output on
   the first ``patches`` calibration patches: ``E_q(base)``. One forward per quantizer;
4. **model**: ``E_q(b) = E_q(base) * d_q(b) / d_q(base)``: the output responds to a quantizer's noise
   in proportion to the noise power (the first-order propagation that per-layer mixed-precision methods
   assume), and the errors of different quantizers add (``benchmarks/bit_budget.md`` checks both);
5. **allocation** (:mod:`calib.bit_allocation`): minimize ``sum_q E_q(b_q)`` subject to the budget, a multiple-choice knapsack solved
   exactly by dynamic programming over the budget in 2^14 units (:func:`solve`; a greedy on the error
   drop per bit-element fails it when costs differ by orders of magnitude, as the attention
   probabilities' and the other activations' do); if a uniform width within the budget has a smaller
   predicted error, that is kept instead. Deterministic.

The chosen widths become :attr:`QuantConfig.bits_overrides` with exact names
(:meth:`Allocation.apply`), so the calibrated model, its artifact, export and engines need nothing new.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from toolchain.quant import QuantConfig, Quantizer, grid, quantizers

from .bit_allocation import solve
from .dobi import DEFAULT_CANDIDATES, search_bounds_full, search_histogram
from .observers import DEFAULT_BINS, StreamingHistogram, WeightObserver, batch_forward_loop, observe

log = logging.getLogger(__name__)

#: widths the allocation may choose by default (7 bits buys little over 6 and 8; 8 is INT8's symmetric grid)
DEFAULT_WIDTHS = (2, 3, 4, 5, 6, 8)
#: what ``--bit-budget-on`` may name: the model the sensitivities are measured on
MEASURED_ON = ("plain", "transformed")
#: calibration patches the output errors are measured on (one forward per quantizer each)
DEFAULT_PATCHES = 4
KINDS = ("weight", "activation")


@dataclass(frozen=True)
class BitBudget:
    """Average bits allowed for weights and for activations, and the widths a quantizer may take.

    >>> BitBudget.parse("4")
    BitBudget(weight=4.0, activation=4.0, widths=(2, 3, 4, 5, 6, 8))
    >>> BitBudget.parse("3.5,6", widths="3,4,8").widths
    (3, 4, 8)
    """

    weight: float
    activation: float
    widths: tuple[int, ...] = DEFAULT_WIDTHS

    def __post_init__(self) -> None:
        widths = tuple(sorted(set(self.widths)))
        for bits in widths:
            grid.check_bits(bits)
        if not widths:
            raise ValueError("BitBudget: no allowed widths")
        object.__setattr__(self, "widths", widths)
        for kind in KINDS:
            value = getattr(self, kind)
            if not isinstance(value, (int, float)) or not widths[0] <= value:
                raise ValueError(f"BitBudget: the {kind} average {value!r} is below the narrowest allowed width "
                                 f"{widths[0]} (allowed widths {list(widths)})")

    @classmethod
    def parse(cls, text: str, widths: Union[str, tuple[int, ...]] = DEFAULT_WIDTHS) -> BitBudget:
        """``"4"`` (weights and activations) or ``"4,6"`` (weights, activations); ``widths`` ``"2,3,4"``."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected BITS or W_BITS,A_BITS (e.g. 4 or 4,6), got {text!r}") from None
        if len(values) not in (1, 2) or not all(v == v and v != float("inf") for v in values):
            raise ValueError(f"expected BITS or W_BITS,A_BITS (e.g. 4 or 4,6), got {text!r}")
        if isinstance(widths, str):
            widths = parse_widths(widths)
        return cls(values[0], values[-1], tuple(widths))

    def of(self, kind: str) -> float:
        return self.weight if kind == "weight" else self.activation


def parse_widths(text: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> ``(2, 3, 4, 8)``, each a supported width."""
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers in [{grid.MIN_BITS}, {grid.MAX_BITS}], "
                         f"got {text!r}") from None
    if not widths:
        raise ValueError(f"expected at least one width, got {text!r}")
    for bits in widths:
        grid.check_bits(bits)
    return widths


@dataclass(frozen=True)
class Sensitivity:
    """What the allocation knows of one quantizer: its cost and its predicted output error per width.

    ``cost``: weight parameters, or activation elements per calibration patch. ``local``: DOBI's mean
    squared quantization error per width (tensor units^2). ``output``: the measured output MSE with
    this quantizer alone at ``base`` bits. :meth:`error` is the model of the module docstring.
    """

    name: str
    kind: str
    role: str
    cost: float
    base: int
    local: dict[int, float]
    output: float

    def error(self, bits: int) -> float:
        """Predicted output MSE with this quantizer alone at ``bits``."""
        reference = self.local[self.base]
        return self.output * self.local[bits] / reference if reference > 0 else 0.0


@dataclass(frozen=True)
class Allocation:
    """The chosen width of every quantizer, and what it gives on average and in predicted error."""

    budget: BitBudget
    widths: dict[str, int]
    sensitivities: dict[str, Sensitivity]
    patches: int
    uniform_kept: dict[str, bool] = field(default_factory=dict)

    def average_bits(self, kind: str) -> float:
        """Cost-weighted mean width of ``kind`` (the budget's definition)."""
        items = [s for s in self.sensitivities.values() if s.kind == kind]
        total = sum(s.cost for s in items)
        return sum(self.widths[s.name] * s.cost for s in items) / total if total else 0.0

    def predicted_error(self, widths: Optional[dict[str, int]] = None) -> float:
        """Sum of the predicted output MSEs (additive model) for ``widths`` (default: the chosen ones)."""
        widths = self.widths if widths is None else widths
        return sum(s.error(widths[name]) for name, s in self.sensitivities.items())

    def bits_overrides(self, config: QuantConfig) -> tuple[str, ...]:
        """``PATTERN=BITS`` entries (exact, escaped names) for every width that differs from ``config``'s."""
        entries = []
        for name, bits in self.widths.items():
            if bits != config.bits_for(name, self.sensitivities[name].kind):
                entries.append(f"{_exact_pattern(name)}={bits}")
        return tuple(entries)

    def apply(self, config: QuantConfig) -> QuantConfig:
        """``config`` with the chosen widths as its ``bits_overrides`` (it must have none of its own)."""
        if config.bits_overrides:
            raise ValueError("bit budget: the config already has bits_overrides; the allocation chooses every width")
        return replace(config, bits_overrides=self.bits_overrides(config))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for the artifact's sidecar: budget, averages, widths per quantizer."""
        base = {name: s.base for name, s in self.sensitivities.items()}
        return {
            "budget": {"weight": self.budget.weight, "activation": self.budget.activation},
            "allowed_widths": list(self.budget.widths),
            "average_bits": {kind: round(self.average_bits(kind), 4) for kind in KINDS},
            "average_definition": {"weight": "mean bits per quantized weight parameter",
                                   "activation": "mean bits per quantized activation element of one forward "
                                                 "of one calibration patch"},
            "sensitivity_patches": self.patches,
            "uniform_kept": self.uniform_kept,
            "predicted_output_mse": {"allocation": self.predicted_error(), "base": self.predicted_error(base)},
            "widths": dict(self.widths),
            "histogram": {kind: _histogram(self.widths, self.sensitivities, kind) for kind in KINDS},
        }


def allocate_bits(model: nn.Module, lr: torch.Tensor, budget: BitBudget, *, patches: int = DEFAULT_PATCHES,
                  batch: int = 8, candidates: int = DEFAULT_CANDIDATES, bins: int = DEFAULT_BINS,
                  device: Union[str, torch.device] = "cpu", progress: bool = True) -> Allocation:
    """Choose the width of every quantizer of ``model`` under ``budget`` (see the module docstring).

    ``model``: quantized (:func:`toolchain.quant.quantize_model`), bounds not needed; each quantizer's
    current width is its base width. ``lr``: calibration LR patches ``(N, 3, p, p)``; statistics use all
    of them, output errors the first ``patches``. The model is left as it was (bounds, flags, widths).

    >>> from toolchain.models.examples import tiny_swinir
    >>> from toolchain.quant import QuantConfig, quantize_model
    >>> model = quantize_model(tiny_swinir(), QuantConfig(w_bits=4, a_bits=4))
    >>> allocation = allocate_bits(model, torch.rand(4, 3, 16, 16), BitBudget.parse("4"), progress=False)
    >>> allocation.average_bits("weight") <= 4.0 and allocation.average_bits("activation") <= 4.0
    True
    """
    if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
        raise ValueError(f"bit budget: patches must be a positive integer, got {patches!r}")
    sensitivities = measure_sensitivities(model, lr, budget.widths, patches=patches, batch=batch,
                                          candidates=candidates, bins=bins, device=device, progress=progress)
    widths: dict[str, int] = {}
    kept: dict[str, bool] = {}
    for kind in KINDS:
        items = [s for s in sensitivities.values() if s.kind == kind]
        if items:
            chosen, kept[kind] = solve(items, budget.of(kind), budget.widths)
            widths.update(chosen)
    allocation = Allocation(budget, {name: widths[name] for name in sensitivities}, sensitivities,
                            min(patches, lr.shape[0]), kept)
    log.info("bit budget W%.2f A%.2f: average W %.3f A %.3f bits, predicted output MSE %.3g (base widths %.3g)",
             budget.weight, budget.activation, allocation.average_bits("weight"),
             allocation.average_bits("activation"), allocation.predicted_error(),
             allocation.to_dict()["predicted_output_mse"]["base"])
    return allocation


def measure_sensitivities(model: nn.Module, lr: torch.Tensor, widths: tuple[int, ...], *,
                          patches: int = DEFAULT_PATCHES, batch: int = 8, candidates: int = DEFAULT_CANDIDATES,
                          bins: int = DEFAULT_BINS, device: Union[str, torch.device] = "cpu",
                          progress: bool = True) -> dict[str, Sensitivity]:
    """Cost, local error per width (``widths`` and each base width) and output error of every quantizer."""
    found = quantizers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no quantizers: call quantize_model() first")
    stats = observe(model, batch_forward_loop(lr, batch, device, progress, "bit budget statistics"),
                    lambda q: _CountingObserver(q, bins))
    # cost: weight parameters, or activation elements per calibration patch
    costs = {name: float(observer.inner.tensor.numel()) if q.kind == "weight" else observer.elements / lr.shape[0]
             for name, (q, observer) in stats.items()}
    probe = lr[:patches]
    outputs: dict[str, float] = {}
    local: dict[str, dict[int, float]] = {}
    with _restored(found):
        with torch.no_grad():
            for q in found.values():
                q.enabled = False
            reference = _run(model, probe, batch, device)
            for name, (q, observer) in tqdm(stats.items(), desc="bit budget sensitivities", unit="quantizer",
                                            disable=not progress):
                local[name], base_bounds = _local_errors(q, observer.inner, sorted({*widths, q.bits}), candidates)
                q.set_bounds(*base_bounds)
                q.enabled = True
                outputs[name] = float((_run(model, probe, batch, device) - reference).double().square().mean())
                q.enabled = False
    return {name: Sensitivity(name, q.kind, q.role, costs[name], q.bits, local[name], outputs[name])
            for name, (q, _) in stats.items()}


def add_bit_budget_arguments(group: argparse._ArgumentGroup) -> None:
    """``--bit-budget``, ``--bit-budget-widths``, ``--bit-budget-patches`` (``2dq-calibrate``)."""
    group.add_argument("--bit-budget", metavar="BITS[,A_BITS]",
                       help="mixed precision chosen automatically: every quantizer gets its own width so that the "
                       "average weight bits (per weight parameter) and the average activation bits (per activation "
                       "element of one patch's forward) each stay within BITS (or W_BITS,A_BITS), least output error "
                       "first; measured on the calibration patches before the method runs; --bits sets the widths "
                       "the sensitivities are measured at")
    group.add_argument("--bit-budget-widths", default=",".join(map(str, DEFAULT_WIDTHS)), metavar="LIST",
                       help="--bit-budget: the widths a quantizer may take (default: %(default)s)")
    group.add_argument("--bit-budget-patches", type=int, default=DEFAULT_PATCHES,
                       help="--bit-budget: calibration patches the output errors are measured on, one forward per "
                       "quantizer (default: %(default)s)")
    group.add_argument("--bit-budget-on", choices=MEASURED_ON, default="plain",
                       help="--bit-budget: measure the sensitivities on the plain quantized model, or on the model "
                       "with the transforms this run asks for (--smooth, --rotate, --shifts, ...) attached, the "
                       "tensors the quantizers will see (default: %(default)s)")


def bit_budget_from_args(args: argparse.Namespace) -> Optional[BitBudget]:
    """The :class:`BitBudget` the options describe, or None; ``ValueError`` names the option at fault."""
    if args.bit_budget is None:
        return None
    if args.bit_budget_patches < 1:
        raise ValueError(f"--bit-budget-patches must be positive, got {args.bit_budget_patches}")
    if args.bits_override:
        raise ValueError("--bit-budget chooses every quantizer's width; it does not go with --bits-override")
    try:
        widths = parse_widths(args.bit_budget_widths)
    except ValueError as err:
        raise ValueError(f"--bit-budget-widths: {err}") from None
    try:
        return BitBudget.parse(args.bit_budget, widths)
    except ValueError as err:
        raise ValueError(f"--bit-budget: {err}") from None


class _CountingObserver:
    """DOBI's observer of one quantizer (the weight tensor, or a histogram) that also counts what it sees."""

    def __init__(self, quantizer: Quantizer, bins: int) -> None:
        self.inner = WeightObserver() if quantizer.kind == "weight" else StreamingHistogram(bins)
        self.elements = 0

    def __call__(self, quantizer: Quantizer, x: torch.Tensor) -> None:
        self.elements += x.numel()
        self.inner(quantizer, x)


def _local_errors(q: Quantizer, observer: Any, widths: list[int], candidates: int
                  ) -> tuple[dict[int, float], tuple[torch.Tensor, torch.Tensor]]:
    """DOBI's mean squared error per width, and DOBI's bounds at ``q``'s own width."""
    errors: dict[int, float] = {}
    base: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    own_symmetric = q.symmetric and q.bits != grid.MAX_BITS  # the target's rule, not the 8-bit one
    for bits in widths:
        symmetric = own_symmetric or bits == grid.MAX_BITS
        if isinstance(observer, WeightObserver):
            x = observer.tensor
            lower, upper, _, _ = search_bounds_full(x, bits, "both", symmetric, candidates,
                                                    0 if q.bounds_shape else None, q.role, q.kind)
            q_x = grid.fake_quantize(x, lower, upper, bits, symmetric)
            errors[bits] = float((q_x - x).double().square().mean())
        else:
            result = search_histogram(observer, bits, "auto", symmetric, candidates, q.role)
            lower, upper = result.lower, result.upper
            means, counts = observer.bin_means()
            q_means = grid.fake_quantize(means.float(), lower, upper, bits, symmetric).double()
            errors[bits] = float((counts * (means - q_means).square()).sum() / counts.sum())
        if bits == q.bits:
            base = (lower.reshape(q.bounds_shape), upper.reshape(q.bounds_shape))
    assert base is not None  # q.bits is among the widths
    return errors, base


def _run(model: nn.Module, lr: torch.Tensor, batch: int, device: Union[str, torch.device]) -> torch.Tensor:
    return torch.cat([model(chunk.to(device)).clamp(0, 1).cpu() for chunk in lr.split(batch)])


@contextlib.contextmanager
def _restored(found: dict[str, Quantizer]) -> Iterator[None]:
    """Restore every quantizer's flag, bounds and initialized state on exit."""
    saved = {name: (q.enabled, q.initialized, q.lower.detach().clone(), q.upper.detach().clone())
             for name, q in found.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, q in found.items():
                enabled, initialized, lower, upper = saved[name]
                q.lower.copy_(lower)
                q.upper.copy_(upper)
                q.enabled, q.initialized = enabled, initialized


def _exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` alone (``[``, ``*``, ``?`` escaped)."""
    if "=" in name:
        raise ValueError(f"bit budget: quantizer name {name!r} holds '=', which a bits override cannot name")
    pattern = "".join(f"[{c}]" if c in "[*?" else c for c in name)
    assert fnmatch.fnmatchcase(name, pattern)
    return pattern


def _histogram(widths: dict[str, int], sensitivities: dict[str, Sensitivity], kind: str) -> dict[str, int]:
    """How many quantizers of ``kind`` got each width."""
    found: dict[str, int] = {}
    for name, bits in sorted(widths.items(), key=lambda item: item[1]):
        if sensitivities[name].kind == kind:
            found[str(bits)] = found.get(str(bits), 0) + 1
    return found
