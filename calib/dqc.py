"""DQC, distillation quantization calibration: the second stage of 2DQuant.

Starting from DOBI's bounds, only the bounds of every quantizer are trained, so that the quantized
student mimics the float teacher (the same weights with quantizers disabled, or a separate float
model)::

    loss = L1(student(x), teacher(x)) + feature_weight * sum_g D(F_g^student, F_g^teacher)

over the outputs ``F_g`` of the model's repeated stages (:mod:`calib.feature_taps`: the four RSTBs of SwinIR-light), with
``D`` the MSE of per-sample L2-normalized features, per channel (:func:`feature_distance`).
Adam (lr 1e-2, betas (0.9, 0.99)); after every step ``grid.order_bounds_`` keeps each quantizer's
bounds ordered. See :func:`distill` for the loop (checkpoints, resume, validation, ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from toolchain.quant import bound_parameters, quantizers

from .transforms import transform_parameters
from toolchain.quant.grid import order_bounds_

from . import distributed
from .feature_taps import feature_modules
from .learned_rounding import (LearnedRounding, attach_rounding, bake_rounding, beta_at, detach_rounding,
                               hard_rounding, weight_dependent, weight_layers)
from .trainable import TRANSFORM_PREFIX, backward, load_trainable_state, trainable_state  # noqa: F401  (public here too)
from .dqc_loss import FeatureTap, Teacher, Validation, distillation_loss, feature_distance
from .dqc_state import (TrainingState, global_indices, load_checkpoint, refuse_unless_finished, run_hash,
                        save_checkpoint, tensor_digest, weights_fingerprint)

log = logging.getLogger(__name__)

__all__ = ["DQCConfig", "DQCDivergedError", "DQCResult", "FeatureTap", "distill", "distillation_loss",
           "feature_distance", "lr_factor"]

SCHEDULES = ("cosine", "constant")


class DQCDivergedError(RuntimeError):
    """A DQC step produced a non-finite loss or gradient; no bound was changed by that step."""


@dataclass(frozen=True)
class DQCConfig:
    """Hyperparameters of one DQC run (paper values where the paper gives them).

    - ``iters``: optimizer steps. The paper runs 4000 steps of batch 16 (64x64 LR) on a GPU; the
      CPU default of :mod:`calib.dqc_cli` is much smaller (documented there).
    - ``batch``: global batch (split evenly over ranks, then into ``accumulation`` micro-batches).
    - ``lr``, ``betas``: Adam on the bounds (1e-2, (0.9, 0.99) as in the paper).
    - ``feature_weight``: lambda of the feature term (5 as in the paper).
    - ``schedule``: ``"cosine"`` (LR decays to 0 over ``iters``) or ``"constant"`` (the paper's
      effective schedule: its only milestone, 10000, lies past its 4000 steps).
    - ``seed``: data order (:func:`calib.dqc_state.global_indices`).
    - ``checkpoint_every`` / ``val_every``: steps between checkpoints / validations (0: never;
      a checkpoint is always written at the end when a path is given).
    - ``accumulation``: micro-batches per rank per step (memory; the gradient is their mean).
    - ``feature_taps``: module-path pattern of the feature term ("" = the repeated stages).
    - ``rounding``: also learn every weight's rounding (AdaRound, :mod:`calib.learned_rounding`) on its
      fixed grid: the weight quantizers' bounds and the fold parameters the weights are computed from stay
      as they are, the activation bounds (and the other folds) train as before; ``rounding_lr`` is Adam's
      learning rate of the logits, ``rounding_weight`` the weight of the regularizer that decides every
      rounding (annealed as in block reconstruction). The weights end on their grids, baked
      (:attr:`DQCResult.refined`).
    - ``train_folds``: the folds (smoothing, shifts) train with the bounds; ``False`` keeps them (``--init``).
    """

    iters: int = 40
    batch: int = 4
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    feature_weight: float = 5.0
    schedule: str = "cosine"
    seed: int = 0
    checkpoint_every: int = 10
    val_every: int = 10
    accumulation: int = 1
    #: fnmatch pattern on module paths whose outputs the feature term compares; "" = the rule of
    #: :mod:`calib.feature_taps` (the model's repeated top-level stages)
    feature_taps: str = ""
    rounding: bool = False
    rounding_lr: float = 3e-2
    rounding_weight: float = 0.01
    train_folds: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("iters", "batch", "accumulation"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DQCConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "val_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"DQCConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "rounding_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"DQCConfig.{name} must be a positive number, got {value!r}")
        if not (self.rounding_weight >= 0 and math.isfinite(self.rounding_weight)):
            raise ValueError(f"DQCConfig.rounding_weight must be >= 0, got {self.rounding_weight!r}")
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise ValueError(f"DQCConfig.feature_weight must be >= 0, got {self.feature_weight!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"DQCConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DQCConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DQCResult:
    """What a DQC run did; ``to_dict()`` is JSON for the artifact's metadata."""

    iterations: int
    best_iteration: Optional[int]
    best_val_loss: Optional[float]
    train_losses: list[list[float]]
    validations: list[dict[str, float]]
    resumed_from: Optional[int]
    seconds: float
    #: with ``DQCConfig.rounding``: the baked weights by parameter name (what the artifact stores, as GPTQ's)
    refined: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        first = self.train_losses[0] if self.train_losses else None
        last = self.train_losses[-1] if self.train_losses else None
        return {"iterations": self.iterations, "best_iteration": self.best_iteration,
                "best_val_loss": self.best_val_loss, "first_train_losses": first, "last_train_losses": last,
                "validations": self.validations, "resumed_from": self.resumed_from, "seconds": self.seconds,
                "refined_weights": len(self.refined)}


def lr_factor(schedule: str, iters: int):
    """Multiplier of the base LR after ``k`` completed steps (``torch.optim.lr_scheduler.LambdaLR``)."""
    if schedule == "constant":
        return lambda k: 1.0
    return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, iters) / iters))


def _stack(dataset: Sequence, indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(n, 3, h, w)`` LR batch of ``dataset[i]`` (a tensor, an ``(lr, hr)`` pair or a dict with ``"lr"``)."""
    items = []
    for index in indices:
        item = dataset[index]
        if isinstance(item, dict):
            item = item["lr"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        items.append(torch.as_tensor(item, dtype=torch.float32))
    return torch.stack(items).to(device)


def distill(
    model: nn.Module,
    train_data: Sequence,
    config: DQCConfig,
    *,
    val_batch: Optional[torch.Tensor] = None,
    teacher: Optional[nn.Module] = None,
    checkpoint_path: Optional[str | os.PathLike] = None,
    resume: bool = False,
    context: Optional[distributed.DistContext] = None,
    description: Optional[dict[str, Any]] = None,
    progress: bool = True,
) -> DQCResult:
    """Train the bounds of ``model``'s quantizers (initialized, e.g. by DOBI) by distillation; in place.

    Args:
        model: quantized model; every quantizer must have bounds. Its feature taps are
            :func:`calib.feature_taps.feature_modules` (``config.feature_taps`` a pattern, or the rule).
        train_data: ``train_data[i]`` is an LR patch ``(3, h, w)`` in [0, 1] (or ``(lr, hr)`` / a dict
            with ``"lr"``); iteration ``t`` uses items ``global_indices(seed, t, batch, len(train_data))``.
        config: :class:`DQCConfig`.
        val_batch: ``(n, 3, h, w)`` fixed validation patches (held-out images). Evaluated at step 0 and
            every ``val_every`` steps; the model ends with the bounds of the lowest validation loss
            (DOBI's own bounds if no step beats them). Without it the final bounds are kept.
        teacher: float model with the same module paths; default: ``model`` itself
            with its quantizers disabled (no second copy of the weights).
        checkpoint_path: where checkpoints go (rank 0 writes; atomic). Without ``resume`` an existing
            file is an error (naming the steps done) unless it holds this same run, finished: then the
            run starts afresh and overwrites it. ``resume`` without a file is an error.
        context: ranks (:func:`calib.distributed.init_from_env`); default one process on CPU.
        description: JSON-able facts about the data (paths, patch size, split) that enter the run
            hash a checkpoint must match.

    Raises:
        DQCDivergedError: a non-finite loss or gradient (the step is not taken; checkpoints on disk
            stay as they were).

    Only bounds change (and, with ``config.rounding``, the weights' codes, baked at the end): every other
    parameter is frozen for the run (flags restored after) and the model is evaluated in ``eval()`` mode.
    """
    context = context or distributed.DistContext()
    device = context.device
    found = quantizers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no quantizers: quantize_model() and DOBI come before DQC")
    uninitialized = [name for name, q in found.items() if not q.initialized]
    if uninitialized:
        raise ValueError(f"DQC starts from calibrated bounds, but {len(uninitialized)} quantizers have none "
                         f"(e.g. {uninitialized[0]}); run DOBI first")
    if config.batch % (context.world * config.accumulation):
        raise ValueError(f"batch {config.batch} does not split into {context.world} processes x "
                         f"{config.accumulation} micro-batches")
    if resume and checkpoint_path is None:
        raise ValueError("resume needs a checkpoint path")
    model.to(device).eval()
    if teacher is not None:
        teacher.to(device).eval()
    bounds = bound_parameters(model) + (transform_parameters(model) if config.train_folds else [])
    frozen = [p for m in (model, teacher) if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in frozen]
    layers = weight_layers(model) if config.rounding else {}
    if config.rounding and not layers:
        log.warning("DQC: learned rounding asked for, but no weight is quantized: only the bounds train")
    fixed: set[int] = set()
    if layers:  # AdaRound learns codes on fixed grids: the weights' bounds and folds stay
        fixed = {id(p) for layer in layers.values() for p in (layer.weight_quantizer.lower, layer.weight_quantizer.upper)}
        fixed.update(id(p) for p in weight_dependent(layers, transform_parameters(model)))
    start = time.perf_counter()
    baked = False
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        distributed.broadcast_(bounds, context)   # every rank starts from rank 0's bounds and folds
        bounds = [p for p in bounds if id(p) not in fixed]
        for bound in bounds:
            bound.requires_grad_(True)
        logits = [r.v for r in attach_rounding(layers).values()]  # identical on every rank: from the weights
        reference = Teacher(model, teacher)
        with contextlib.ExitStack() as stack:
            taps = feature_modules(model, config.feature_taps)
            tap = stack.enter_context(FeatureTap([m for _, m in taps]))
            teacher_tap = tap if teacher is None else stack.enter_context(
                FeatureTap(reference.groups([p for p, _ in taps])))
            val = None
            if val_batch is not None and config.val_every:
                val = Validation(val_batch.to(device), config.batch // context.world, reference, teacher_tap)
            digest = run_hash({
                "dqc": {k: v for k, v in config.to_dict().items()
                        if k not in ("checkpoint_every", "accumulation") and not (k == "feature_taps" and not v)},
                "weights": weights_fingerprint(model),
                "quantizers": [[n, q.kind, q.bits, q.symmetric, list(q.bounds_shape)] for n, q in found.items()],
                "initial_bounds": tensor_digest(trainable_state(model)),
                "teacher": "float-mode" if teacher is None else weights_fingerprint(teacher),
                "val_batch": None if val is None else tensor_digest({"val": val_batch}),
                "train_items": len(train_data), "data": description or {},
            })
            state = _start_state(model, config, bounds, logits, digest, checkpoint_path, resume, context)
            resumed_from = state.iteration if state.bounds else None
            _train(model, train_data, config, reference, tap, teacher_tap, val, state, bounds + logits,
                   checkpoint_path, context, progress)
        if state.train_losses:
            (first_l1, first_feature), (last_l1, last_feature) = state.train_losses[0], state.train_losses[-1]
            log.info("DQC: %d steps; training L1 %.4g -> %.4g, feature term (x%g) %.4g -> %.4g", state.iteration,
                     first_l1, last_l1, config.feature_weight, config.feature_weight * first_feature,
                     config.feature_weight * last_feature)
        if state.best_bounds is not None:
            load_trainable_state(model, state.best_bounds)
            log.info("DQC: keeping the bounds of step %d (validation loss %.6g)", state.best_iteration,
                     state.best_val_loss)
        refined = bake_rounding(layers) if layers else {}
        baked = True
        distributed.barrier(context)
    finally:
        if layers and not baked:
            detach_rounding(layers)
        for parameter, flag in zip(frozen, flags):
            parameter.requires_grad_(flag)
    return DQCResult(state.iteration, state.best_iteration, state.best_val_loss, state.train_losses,
                     state.validations, resumed_from, time.perf_counter() - start, refined)


def _start_state(model, config, bounds, logits, digest, checkpoint_path, resume, context) -> TrainingState:
    """Fresh state, or the checkpoint's (restoring bounds, rounding logits, Adam and the scheduler into ``model``)."""
    groups = [{"params": bounds}] + ([{"params": logits, "lr": config.rounding_lr}] if logits else [])
    optimizer = torch.optim.Adam(groups, lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.iters))
    state = TrainingState(0, digest, {}, {}, {}, world=context.world)
    exists = checkpoint_path is not None and os.path.exists(checkpoint_path)
    if exists and not resume:
        exists = refuse_unless_finished(checkpoint_path, digest, config.iters)
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no DQC checkpoint at {checkpoint_path} (a run killed before its "
                                f"first checkpoint must be started again without --resume)")
    if exists:
        state = load_checkpoint(checkpoint_path, digest)
        load_trainable_state(model, state.bounds)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if state.world != context.world:
            log.warning("resuming a %d-process DQC run on %d processes: same data, sums in another order",
                        state.world, context.world)
        state.world = context.world
        log.info("DQC: resumed from %s at step %d of %d", checkpoint_path, state.iteration, config.iters)
    state.optimizer, state.scheduler = optimizer, scheduler  # live objects while training
    return state


def _train(model, train_data, config, reference, tap, teacher_tap, val, state, bounds, checkpoint_path,
           context, progress) -> None:
    from tqdm import tqdm

    optimizer, scheduler = state.optimizer, state.scheduler
    found = list(quantizers(model).values())
    roundings = [q.rounding for q in found if isinstance(q.rounding, LearnedRounding)]
    shards = context.world * config.accumulation
    if val is not None and state.iteration == 0:
        _validate(model, val, tap, config, state, 0)
    bar = tqdm(total=config.iters, initial=state.iteration, desc="DQC", unit="it", dynamic_ncols=True,
               disable=not (progress and context.is_main))
    try:
        for iteration in range(state.iteration + 1, config.iters + 1):
            local = distributed.shard(global_indices(config.seed, iteration, config.batch, len(train_data)), context)
            size = len(local) // config.accumulation
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(3, dtype=torch.float64)  # l1, feature, non-finite count
            for micro in range(config.accumulation):
                x = _stack(train_data, local[micro * size:(micro + 1) * size], context.device)
                target = reference(x)
                target_features = teacher_tap.take()
                total, l1, feature = distillation_loss(model(x), target, tap.take(), target_features,
                                                       config.feature_weight)
                beta = beta_at(iteration - 1, config.iters) if roundings else 0.0
                if beta:  # the same term on every micro-batch and rank: their mean is one copy of it
                    total = total + config.rounding_weight * torch.stack(
                        [r.regularizer(beta) for r in roundings]).mean()
                finite = bool(torch.isfinite(total))
                if finite:
                    backward(total, model)  # gradients of micro-batches add up in .grad
                sums += torch.tensor([l1.item(), feature.item(), 0.0 if finite else 1.0], dtype=torch.float64)
            sums = distributed.sum_tensor(sums, context)
            l1_mean, feature_mean = (sums[0] / shards).item(), (sums[1] / shards).item()
            for bound in bounds:
                if bound.grad is None:
                    bound.grad = torch.zeros_like(bound)
            distributed.sum_gradients_(bounds, context)
            finite_grads = bool(torch.stack([torch.isfinite(b.grad).all() for b in bounds]).all())  # one sync
            if sums[2] > 0 or not finite_grads:
                raise DQCDivergedError(
                    f"DQC diverged at step {iteration}: L1 {l1_mean:.6g}, feature {feature_mean:.6g} "
                    f"(or their gradients) not finite; no bound was updated. "
                    + (f"The last checkpoint ({checkpoint_path}, step {_last_checkpoint(state, config)}) is intact; "
                       if checkpoint_path is not None else "")
                    + "check the data for NaN/Inf, or lower the learning rate (--dqc-lr, DQCConfig.lr)")
            for bound in bounds:
                bound.grad.div_(shards)
            optimizer.step()
            for quantizer in found:
                order_bounds_(quantizer.lower, quantizer.upper)
            scheduler.step()
            state.iteration = iteration
            state.train_losses.append([l1_mean, feature_mean])
            if val is not None and (iteration % config.val_every == 0 or iteration == config.iters):
                _validate(model, val, tap, config, state, iteration)
            due = iteration == config.iters or (config.checkpoint_every and iteration % config.checkpoint_every == 0)
            if checkpoint_path is not None and context.is_main and due:
                _save(checkpoint_path, state, bounds, model)
            bar.set_postfix(l1=f"{l1_mean:.4g}", feat=f"{config.feature_weight * feature_mean:.4g}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()


def _validate(model, val, tap, config, state, iteration) -> None:
    with hard_rounding(model):  # learned roundings are judged as they will be baked
        result = {"iteration": iteration, **val.evaluate(model, tap, config.feature_weight)}
    if not math.isfinite(result["val_loss"]):
        raise DQCDivergedError(f"DQC validation loss at step {iteration} is not finite ({result['val_loss']}); "
                               f"the bounds of step {iteration} produce NaN/Inf")
    state.validations.append(result)
    if state.best_val_loss is None or result["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.best_iteration = result["val_loss"], iteration
        state.best_bounds = {k: v.to("cpu") for k, v in trainable_state(model).items()}
    log.info("DQC step %d: validation loss %.6g (L1 %.6g, feature %.6g), PSNR vs teacher %.2f dB", iteration,
             result["val_loss"], result["val_l1"], result["val_feature"], result["val_psnr"])


def _last_checkpoint(state: TrainingState, config: DQCConfig) -> int:
    every = config.checkpoint_every
    return (state.iteration // every) * every if every else 0


def _save(path, state: TrainingState, bounds, model) -> None:
    snapshot = dataclasses.replace(state, bounds=trainable_state(model), optimizer=state.optimizer.state_dict(),
                                   scheduler=state.scheduler.state_dict())
    save_checkpoint(path, snapshot)
