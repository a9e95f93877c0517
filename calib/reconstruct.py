"""Block reconstruction (BRECQ, Li et al., ICLR 2021): the bounds of one block at a time, against the float model.

End-to-end DQC (:mod:`calib.dqc`) trains every bound at once through the whole network: each step is a
full forward and backward. Block reconstruction trains the quantizers of one block (the model's repeated
stages, :mod:`calib.feature_taps`: DAT-light's 18 blocks, SwinIR's residual groups) so that the block's
output on the *quantized* model's input to it matches the *float* model's output of that block::

    loss = MSE(block_q(x_q), block_fp(x_fp)) / MSE_at_start  (+ the learned-rounding regularizer)

block after block, each seeing the inputs its already-reconstructed predecessors produce. One step
costs one block's forward and backward, so many more steps fit a CPU budget than DQC's. What trains:

- the bounds of the block's activation quantizers (and of its weight quantizers, unless their rounding
  is learned);
- with ``rounding`` (:mod:`calib.learned_rounding`, AdaRound), each weight's rounding direction on its
  grid, made hard at the end of the block and written into the weights (the artifact stores them, as
  GPTQ's); the grid stays DOBI's unless ``rounding_grids`` trains its bounds with the rounding;
- with ``affine`` (:mod:`calib.float_affine`), the block's biases and normalization affines, which the
  deployed graph keeps in float (the artifact stores them too).

Fold parameters (:mod:`calib.transforms`) stay as calibrated; shifts are re-made exact after each block.
A block whose loss on the calibration data ends higher than it started is restored to its start.
The float targets come from one float pass over all blocks; the quantized inputs of a block are the
previous block's outputs when the model chains them (checked on the first batch), otherwise one
quantized pass that stops at the block.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.quant import float_mode, quantizers
from toolchain.quant.grid import order_bounds_

from .dqc import lr_factor
from .feature_taps import feature_modules
from .float_affine import affine_parameters
from .trainable import backward
from .reconstruct_state import Progress, load_progress, reconstruct_hash, restore_progress, save_progress
from .learned_rounding import (attach_rounding, bake_rounding, beta_at, restore_weights, weight_layers,
                               weight_snapshot)

log = logging.getLogger(__name__)

__all__ = ["ReconstructConfig", "UnitResult", "reconstruct_blocks"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Hyper-parameters of block reconstruction.

    - ``iters``: optimizer steps per block, each on one batch of ``batch`` calibration patches.
    - ``lr``: Adam's learning rate (cosine decay to 0 over the steps) on the bounds, relative to each quantizer's range (``upper - lower``, its
      mean over channels); ``rounding_lr``: on the rounding logits.
    - ``rounding``: learn the weights' rounding (AdaRound) instead of training their bounds.
    - ``rounding_grids``: with ``rounding``, train the weights' bounds too, at ``grid_lr`` (relative, as ``lr``).
    - ``rounding_weight``: weight of the regularizer that decides every rounding (relative to the
      normalized reconstruction loss, which starts at 1).
    - ``units``: fnmatch pattern of the blocks (module paths); "" = the repeated stages.
    - ``seed``: order of the batches (and of the dropped elements).
    - ``drop``: while training, each element of a block's (quantized) input is replaced by the float
      model's with this probability (QDrop, Wei et al., ICLR 2022: a flatter, less over-fitted solution);
      0 = always the quantized input (BRECQ).
    - ``affine``: also train the block's float biases and one-dimensional weights (normalization affines),
      at Adam's learning rate ``affine_lr`` (absolute: they are O(0.1-1) in every model).
    """

    iters: int = 100
    batch: int = 4
    lr: float = 3e-2
    rounding: bool = False
    rounding_lr: float = 3e-2
    rounding_weight: float = 0.01
    rounding_grids: bool = False
    grid_lr: float = 1e-3
    units: str = ""
    seed: int = 0
    drop: float = 0.0
    affine: bool = False
    affine_lr: float = 3e-2

    def __post_init__(self) -> None:
        for name in ("iters", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReconstructConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "rounding_lr", "affine_lr", "grid_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"ReconstructConfig.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.drop, (int, float)) and 0.0 <= self.drop < 1.0):
            raise ValueError(f"ReconstructConfig.drop must be in [0, 1), got {self.drop!r}")
        if not (self.rounding_weight >= 0 and math.isfinite(self.rounding_weight)):
            raise ValueError(f"ReconstructConfig.rounding_weight must be >= 0, got {self.rounding_weight!r}")
        if self.rounding_grids and not self.rounding:
            raise ValueError("ReconstructConfig.rounding_grids trains the learned roundings' grids: it needs rounding")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnitResult:
    """One block: its reconstruction MSE on the calibration data at the start and the end (``kept`` False: restored)."""

    name: str
    quantizers: int
    start_mse: float
    end_mse: float
    kept: bool
    seconds: float


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block's input is captured."""


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block returned {type(output).__name__}; block reconstruction needs a tensor output")
    return output


def _to(value: Any, device: torch.device | str) -> Any:
    """``value`` (tensors, or tuples / lists / dicts of them) detached on ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


Call = tuple[tuple, dict]


@torch.no_grad()
def _float_targets(model: nn.Module, units: list[tuple[str, nn.Module]], chunks: list[torch.Tensor],
                   device: torch.device, keep_inputs: bool) -> tuple[list[list[torch.Tensor]], list[list[Optional[torch.Tensor]]],
                                                  list[Call], list[torch.Tensor]]:
    """Float outputs and (``keep_inputs``: only QDrop reads them) first tensor inputs of every block per chunk; and,
    from the first chunk of the *quantized* model, each block's call and output (to tell whether a block's input is
    its predecessor's output)."""
    targets: list[list[torch.Tensor]] = [[] for _ in units]
    inputs: list[list[Optional[torch.Tensor]]] = [[] for _ in units]

    def record_float(i: int):
        def hook(_module, args, output) -> None:
            targets[i].append(_to(_first_tensor(output), "cpu"))
            kept = keep_inputs and args and isinstance(args[0], torch.Tensor)
            inputs[i].append(_to(args[0], "cpu") if kept else None)
        return hook

    hooks = [module.register_forward_hook(record_float(i)) for i, (_, module) in enumerate(units)]
    try:
        with float_mode(model):
            for chunk in chunks:
                model(chunk.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    if any(len(t) != len(chunks) for t in targets):
        raise ValueError("block reconstruction: a block ran more or less than once per forward pass; "
                         "give a block pattern whose modules run once each (--reconstruct-units)")
    calls: list[Call] = []
    outputs: list[torch.Tensor] = []
    def record(_module, args, kwargs, output) -> None:
        calls.append((args, kwargs))
        outputs.append(_first_tensor(output))

    hooks = [module.register_forward_hook(record, with_kwargs=True) for _, module in units]
    try:
        model(chunks[0].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return targets, inputs, calls, outputs


def _chained(calls: list[Call], outputs: list[torch.Tensor]) -> list[bool]:
    """``chained[k]``: block ``k``'s first argument is block ``k-1``'s output and its other arguments are
    not tensors (so they are the same for every chunk of the same size)."""
    chained = [False]
    for k in range(1, len(calls)):
        args, kwargs = calls[k]
        rest = list(args[1:]) + list(kwargs.values())
        chained.append(bool(args) and isinstance(args[0], torch.Tensor) and args[0].shape == outputs[k - 1].shape
                       and torch.equal(args[0], outputs[k - 1])
                       and not any(isinstance(v, torch.Tensor) for v in rest))
    return chained


@torch.no_grad()
def _quantized_inputs(model: nn.Module, unit: nn.Module, chunks: list[torch.Tensor], device: torch.device) -> list[Call]:
    """The block's call (args, kwargs) per chunk in the quantized model, from passes that stop at the block."""
    calls: list[Call] = []

    def capture(_module, args, kwargs):
        calls.append((_to(args, "cpu"), _to(kwargs, "cpu")))
        raise _Stop

    hook = unit.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for chunk in chunks:
            try:
                model(chunk.to(device))
            except _Stop:
                pass
    finally:
        hook.remove()
    if len(calls) != len(chunks):
        raise ValueError("block reconstruction: a block was not reached by the forward pass")
    return calls


def _unit_mse(unit: nn.Module, calls: list[Call], targets: list[torch.Tensor], device: torch.device) -> float:
    with torch.no_grad():
        total = sum(F.mse_loss(_first_tensor(unit(*_to(a, device), **_to(kw, device))), t.to(device)).item() * len(t)
                    for (a, kw), t in zip(calls, targets))
    return total / sum(len(t) for t in targets)


def _next_calls(unit: nn.Module, calls: list[Call], template: Call, device: torch.device) -> list[Call]:
    """The next (chained) block's calls: this block's outputs with the rest of the template's arguments."""
    args, kwargs = template
    out = []
    with torch.no_grad():
        for a, kw in calls:
            y = _first_tensor(unit(*_to(a, device), **_to(kw, device)))
            out.append(((_to(y, "cpu"), *_to(tuple(args[1:]), "cpu")), _to(kwargs, "cpu")))
    return out


def reconstruct_blocks(model: nn.Module, patches: torch.Tensor, config: ReconstructConfig = ReconstructConfig(), *,
                       device: str | torch.device = "cpu", progress: bool = True,
                       checkpoint: Optional[str | os.PathLike] = None, resume: bool = False,
                       ) -> tuple[list[UnitResult], dict[str, torch.Tensor]]:
    """Reconstruct ``model``'s blocks in order (in place) on the LR ``patches`` ``(N, 3, h, w)``.

    ``model`` is quantized with calibrated bounds (DOBI, MinMax, percentile; transforms attached and
    finished). Returns each block's result and, with ``config.rounding`` or ``config.affine``, the new float
    weights (biases, affines) by parameter name (for :func:`calib.artifact.save_artifact`'s ``weights``);
    otherwise an empty dict.
    Every other parameter is frozen for the run (flags restored after).

    ``checkpoint``: a file written after every block (:mod:`calib.reconstruct_state`); an existing one is an
    error unless ``resume``, which continues it after its last finished block (the same result as a run
    that was never stopped) and refuses another run's.
    """
    from tqdm import tqdm

    from .transforms import finish_transforms

    device = torch.device(device)
    found = quantizers(model)
    missing = [name for name, q in found.items() if not q.initialized]
    if not found or missing:
        raise ValueError("block reconstruction starts from calibrated bounds: "
                         + (f"{len(missing)} quantizers have none (e.g. {missing[0]})" if missing else
                            f"{type(model).__name__} has no quantizers"))
    units = [(path, m) for path, m in feature_modules(model, config.units, holds=quantizers) if quantizers(m)]
    if not units:
        raise ValueError(f"block reconstruction: no block of {type(model).__name__} holds a quantizer")
    model.to(device).eval()
    chunks = list(patches.split(config.batch))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    results: list[UnitResult] = []
    refined: dict[str, torch.Tensor] = {}
    digest, done = "", 0
    if resume and checkpoint is None:
        raise ValueError("resume needs the checkpoint file of the run to continue")
    if checkpoint is not None:
        digest = reconstruct_hash(model, patches, config.to_dict(), [path for path, _ in units])
        if os.path.exists(checkpoint):
            if not resume:
                raise ValueError(f"{checkpoint} exists (a block-reconstruction checkpoint): continue it with --resume, "
                                 "or delete it to start again")
            saved, saved_state = load_progress(checkpoint, digest)  # restored after the float targets are made
            results, refined, done = [UnitResult(**r) for r in saved.results], dict(saved.refined), saved.done
            log.info("block reconstruction: resuming from %s after %d of %d blocks", checkpoint, done, len(units))
        elif resume:
            raise FileNotFoundError(f"--resume: no block-reconstruction checkpoint at {checkpoint}")
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        # from the checkpoint's weights, not the rounded ones a resumed run restores just below
        targets, float_inputs, first_calls, first_outputs = _float_targets(model, units, chunks, device,
                                                                           keep_inputs=config.drop > 0)
        if done:
            restore_progress(model, saved_state, refined)
        chained = _chained(first_calls, first_outputs)
        log.info("block reconstruction: %d blocks, %d steps each on batches of %d of %d patches%s%s", len(units),
                 config.iters, config.batch, len(patches), ", learned weight rounding" if config.rounding else "",
                 ", float biases and affines" if config.affine else "")
        calls: Optional[list[Call]] = None
        bar = tqdm(units, desc="reconstruct", unit="block", disable=not progress)
        for k, (path, unit) in enumerate(bar):
            if k < done:
                continue
            if calls is None or not chained[k]:
                calls = _quantized_inputs(model, unit, chunks, device)
            results.append(_reconstruct_unit(path, unit, calls, targets[k], float_inputs[k], config, device, refined))
            finish_transforms(model)
            if checkpoint is not None:
                save_progress(checkpoint, model, Progress(digest, k + 1, [asdict(r) for r in results], refined))
            bar.set_postfix(mse=f"{results[-1].end_mse:.3g}", refresh=False)
            if k + 1 < len(units) and chained[k + 1]:
                calls = _next_calls(unit, calls, first_calls[k + 1], device)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    log.info("block reconstruction: %d of %d blocks improved; MSE sum %.4g -> %.4g", sum(r.kept for r in results),
             len(results), sum(r.start_mse for r in results), sum(r.end_mse for r in results))
    return results, refined


def _reconstruct_unit(path: str, unit: nn.Module, calls: list[Call], targets: list[torch.Tensor],
                      float_inputs: list[Optional[torch.Tensor]],
                      config: ReconstructConfig, device: torch.device, refined: dict[str, torch.Tensor]) -> UnitResult:
    started = time.perf_counter()
    found = quantizers(unit)
    layers = weight_layers(unit, path) if config.rounding else {}
    rounded = {id(layer.weight_quantizer) for layer in layers.values()}
    saved = {name: (q.lower.detach().clone(), q.upper.detach().clone()) for name, q in found.items()}
    before = weight_snapshot(layers)
    affine = affine_parameters(unit, path) if config.affine else {}
    affine_start = {name: p.detach().clone() for name, p in affine.items()}
    start = _unit_mse(unit, calls, targets, device)
    roundings = attach_rounding(layers, fixed_base=config.rounding_grids)
    # each quantizer's bounds move at a rate relative to its range (weights span ~0.1, activations ~10)
    groups = [{"params": [q.lower, q.upper], "lr": (config.grid_lr if id(q) in rounded else config.lr)
               * float((q.upper - q.lower).mean())}
              for q in found.values() if id(q) not in rounded or config.rounding_grids]
    if roundings:
        groups.append({"params": [r.v for r in roundings.values()], "lr": config.rounding_lr})
    if affine:
        groups.append({"params": list(affine.values()), "lr": config.affine_lr})
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("cosine", config.iters))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    scale = max(start, 1e-12)
    try:
        for step in range(config.iters):
            if not order:
                order = torch.randperm(len(calls), generator=generator).tolist()
            index = order.pop()
            args, kwargs = calls[index]
            if config.drop and float_inputs[index] is not None and float_inputs[index].shape == args[0].shape:
                # QDrop: each element of the block's input is the float model's with probability ``drop``
                keep = torch.rand(args[0].shape, generator=generator) >= config.drop
                args = (torch.where(keep, args[0], float_inputs[index]), *args[1:])
            out = _first_tensor(unit(*_to(args, device), **_to(kwargs, device)))
            loss = F.mse_loss(out, targets[index].to(device)) / scale
            beta = beta_at(step, config.iters) if roundings else 0.0
            if beta:
                loss = loss + config.rounding_weight * sum(r.regularizer(beta) for r in roundings.values())
            optimizer.zero_grad(set_to_none=True)
            backward(loss, unit)
            optimizer.step()
            scheduler.step()
            for quantizer in found.values():
                order_bounds_(quantizer.lower, quantizer.upper)
    finally:
        for group in groups:
            for parameter in group["params"]:
                parameter.requires_grad_(False)
    weights = bake_rounding(layers) if roundings else {}
    end = _unit_mse(unit, calls, targets, device)
    kept = end < start
    if kept:
        refined.update(weights)
        refined.update({name: p.detach().clone() for name, p in affine.items()})
    else:
        with torch.no_grad():
            for name, q in found.items():
                q.lower.copy_(saved[name][0])
                q.upper.copy_(saved[name][1])
            for name, p in affine.items():
                p.copy_(affine_start[name])
        restore_weights(layers, before)
        end = start
    log.debug("reconstruct %s: MSE %.4g -> %.4g (%s)", path, start, end, "kept" if kept else "restored")
    return UnitResult(path, len(found), start, end, kept, time.perf_counter() - started)
