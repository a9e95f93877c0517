"""GPTQ weight refinement: integer weight codes that compensate each other's rounding error.

Round-to-nearest puts every weight on the nearest grid point of its quantizer, one at a time. GPTQ
(Frantar et al., ICLR 2023; Optimal Brain Quantization) quantizes the columns of a linear's weight
``W (C_out, C_in)`` one after another and spreads each column's rounding error over the columns not
yet quantized, weighted by the inverse of the input second moment ``H = E[u u^T]``, so that the
layer output ``W u`` is kept rather than the weights themselves. The grid stays the one the bounds
define (DOBI / DQC, per tensor or per channel): only which grid point each weight takes changes, so
the deployed graph and the quantizer arithmetic are untouched.

Here it runs once the bounds are final (``2dq-calibrate --gptq`` with DOBI, MinMax or percentile).
Not with DQC: measured on NGswin x2 with every transform (``benchmarks/beyond_2dquant.md``), GPTQ
before DQC gave +0.05 dB at W4A4 and -2.8 dB at W3A3, GPTQ after DQC -0.10 dB at W4A4, while after
DOBI alone it gives +0.7 / +1.1 dB. Likely causes (not isolated): DQC moves the weight grids under
the compensated weights and re-rounds them; DQC's learned offsets and factors adapt to the codes
they were trained with.

- ``u`` is what the weight multiplies in the quantized model: the quantized input
  (:meth:`QuantLinear.quantized_input`) plus the linear's input offset where it has one
  (:mod:`calib.transforms.input_shift`; its bias fold ``b + W_q c`` follows the new codes by itself), so ``H`` is
  measured on the quantized model (one pass over the calibration patches; every linear's statistics
  come from the same pass, with its upstream layers rounded to nearest);
- the folds stay parametrized: the refined weight is written back through them (each fold's inverse
  on its ``original``), so the folded weight the quantizer sees rounds to the codes GPTQ chose;
- the float weights change (the model in float mode is no longer the checkpoint's), so the
  artifact stores the refined float weights (:mod:`calib.artifact`), written into the checkpoint's
  model before anything else.

Options: ``damp`` (fraction of the mean diagonal of ``H`` added to it, GPTQ's 1%), ``act_order``
(columns in order of decreasing ``H_ii``, the "act-order" heuristic). Each linear's relative output
error ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` before (round to nearest) and after is reported.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from toolchain.quant import QuantLinear, grid

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01


@dataclass(frozen=True)
class LayerResult:
    """Relative output error of one linear's quantized weight, round to nearest and GPTQ."""

    name: str
    rtn_error: float
    gptq_error: float


def refinable_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The linears whose weight quantizer is on and calibrated, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)
            and m.weight_quantizer is not None and m.weight_quantizer.enabled and m.weight_quantizer.initialized}


@torch.no_grad()
def input_second_moments(linears: dict[str, QuantLinear], forward_loop: Callable[[nn.Module], None],
                         model: nn.Module) -> dict[str, torch.Tensor]:
    """``H = E[u u^T]`` (float64, ``(C_in, C_in)``) of every linear's effective input, in one pass."""
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
            for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name: str, module: QuantLinear):
        def record(_module: nn.Module, args: tuple) -> None:
            u = effective_input(module, args[0]).reshape(-1, module.in_features).double()
            sums[name].addmm_(u.T, u)
            counts[name] += u.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in linears.items()]
    try:
        forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, n in counts.items() if n == 0]
    if unseen:
        raise ValueError(f"GPTQ: {len(unseen)} linears saw no input in the calibration pass (e.g. {unseen[0]})")
    return {name: sums[name] / counts[name] for name in linears}


def effective_input(linear: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The input ``u`` with ``W u + b0`` the layer's output: quantized input plus the input offset."""
    u = linear.quantized_input(x)
    return u if linear.input_offset is None else u + linear.input_offset


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor],
               damp: float = DEFAULT_DAMP, act_order: bool = True) -> torch.Tensor:
    """GPTQ of ``weight (C_out, C_in)`` under ``H (C_in, C_in)``; ``quantize`` maps a ``(C_out, 1)``
    column to its grid values. Returns the quantized weight (grid values, ``weight``'s dtype)."""
    if not damp > 0:
        raise ValueError(f"GPTQ damp must be positive, got {damp}")
    work = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    columns = work.shape[1]
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0  # an input that is always zero: any code is exact, rounding to nearest is kept
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(columns, device=h.device)
    work, h = work[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype, device=h.device)
    # the upper Cholesky factor of H^-1 holds, row by row, how column i's error moves the later columns
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)
    out = torch.empty_like(work)
    for i in range(columns):
        column = work[:, i:i + 1]
        q = quantize(column.to(weight.dtype)).to(torch.float64)
        out[:, i:i + 1] = q
        error = (column - q) / upper[i, i]
        work[:, i + 1:] -= error * upper[i:i + 1, i + 1:]
    restored = torch.empty_like(out)
    restored[:, order] = out
    return restored.to(weight.dtype)


def relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``: the share of the output's energy the rounding costs."""
    w, d = weight.double(), (weight - quantized).double()
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-300))


@torch.no_grad()
def refine_weights(model: nn.Module, forward_loop: Callable[[nn.Module], None], damp: float = DEFAULT_DAMP,
                   act_order: bool = True, progress: bool = True) -> tuple[list[LayerResult], dict[str, torch.Tensor]]:
    """GPTQ on every calibrated weight quantizer's linear of ``model`` (folds parametrized or none), in place.

    Returns the per-linear errors and the refined float weights by parameter name (``<linear>.weight``,
    the tensor under the folds: what the checkpoint's model must hold). Convolutions are left as
    they are. A baked model with input offsets is refused: its bias fold is a plain tensor that would
    not follow the new codes.
    """
    linears = refinable_linears(model)
    if not linears:
        raise ValueError("GPTQ: the model has no linear with a calibrated weight quantizer")
    baked = [name for name, m in linears.items() if m.input_offset is not None and not _parametrized(m, "bias")]
    if baked:
        raise ValueError(f"GPTQ runs before bake_transforms: {baked[0]} has a baked input offset")
    hessians = input_second_moments(linears, forward_loop, model)
    results, refined = [], {}
    for name, linear in tqdm(linears.items(), desc="GPTQ", unit="linear", disable=not progress):
        quantizer = linear.weight_quantizer
        weight, hessian = linear.weight.detach(), hessians[name]

        def on_grid(column: torch.Tensor) -> torch.Tensor:
            return grid.fake_quantize(column, quantizer.lower, quantizer.upper, quantizer.bits, quantizer.symmetric)

        codes = gptq_codes(weight, hessian, on_grid, damp, act_order)
        results.append(LayerResult(name, relative_error(weight, quantizer(weight), hessian),
                                   relative_error(weight, codes, hessian)))
        refined[f"{name}.weight"] = write_weight(linear, codes)
    before = sum(r.rtn_error for r in results) / len(results)
    after = sum(r.gptq_error for r in results) / len(results)
    log.info("GPTQ: %d linears, mean relative output error %.3g (round to nearest) -> %.3g", len(results),
             before, after)
    return results, refined


def _parametrized(module: nn.Module, name: str) -> bool:
    return name in getattr(module, "parametrizations", {})


def write_weight(linear: QuantLinear, codes: torch.Tensor) -> torch.Tensor:
    """Make ``linear.weight`` (after its folds) ``codes``; returns the tensor stored under the folds."""
    if not _parametrized(linear, "weight"):
        linear.weight.copy_(codes)
        return linear.weight.detach()
    chain = linear.parametrizations.weight
    value = codes
    for fold in reversed(list(chain)):
        value = _unfold(fold, value)
    chain.original.copy_(value)
    return chain.original.detach()


def _unfold(fold: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The inverse of one weight fold of :mod:`calib.transforms.smoothing` (exact up to float rounding)."""
    from .transforms import DivideRows, ScaleColumns

    if hasattr(fold, "unfold"):  # rotations (calib.transforms.rotation, rotation_fold) know their inverse
        return fold.unfold(t)
    if isinstance(fold, ScaleColumns):
        return t / torch.exp(fold.log_scale)
    if isinstance(fold, DivideRows):
        start, stop = fold.group.start, fold.group.stop
        scale = torch.exp(fold.log_scale).view(-1, *([1] * (t.dim() - 1)))
        return torch.cat([t[:start], t[start:stop] * scale, t[stop:]])
    raise ValueError(f"GPTQ cannot write a weight through a {type(fold).__name__} fold")
