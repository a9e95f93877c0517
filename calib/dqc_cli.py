"""Command-line face of DQC: ``add_dqc_arguments(parser)`` and ``run_dqc(args, model, ...)``.

``2dq-calibrate --method 2dquant`` runs DOBI, then :func:`run_dqc` on the same model. DQC draws
random LR patches (bicubic degradation of random HR crops, :class:`toolchain.data.patches.PatchDataset`)
from the training images, holds out ``--val-fraction`` of the images (``split_train_val``) for a fixed
validation batch, and keeps the bounds of the best validation step. Never point it at Set5, Set14
or B100.

CPU budget (default): the paper runs 4000 steps of batch 16 (64x64 LR) on a GPU. One step of
SwinIR-light x4 W4A4 at batch 4 of 48x48 costs about 10 CPU-seconds here (fake quantization and
its backward dominate; ``benchmarks/dqc_speed.md``), so the default is :data:`DEFAULT_ITERS` steps
of batch :data:`DEFAULT_BATCH` at :data:`DEFAULT_PATCH` x :data:`DEFAULT_PATCH` (``--dqc-patch-size``;
``--patch-size`` stays the DOBI calibration patch size), validated every 10 steps: about 7 CPU-minutes.
On NGswin x2 W4A4, 30 such steps took the validation PSNR against the float model from 24.6 to
28.1 dB. On a GPU, use ``--dqc-iters 4000 --batch 16 --dqc-patch-size 64`` for the paper's budget.

Several processes: ``torchrun --nproc-per-node N 2dq-calibrate ... --method 2dquant`` (gloo on CPU,
nccl on CUDA); ``--batch`` is the global batch, split evenly over the ranks; rank 0 alone writes
checkpoints (callers write artifacts only where :func:`calib.distributed.is_main_process`).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed
from .dqc import SCHEDULES, DQCConfig, distill
from toolchain.models import info_of

log = logging.getLogger(__name__)

DEFAULT_ITERS = 40
DEFAULT_BATCH = 4
DEFAULT_PATCH = 48
DEFAULT_VAL_PATCHES = 16
CHECKPOINT_SUFFIX = ".dqc-checkpoint.safetensors"

Parser = Union[argparse.ArgumentParser, argparse._ArgumentGroup]


def add_dqc_arguments(parser: Parser, *, common: bool = False) -> None:
    """Add DQC's options to ``parser`` (a parser or an argument group).

    ``common`` also adds ``--patch-size`` (calibration patches, not DQC's), ``--seed``, ``--device``
    and ``--threads``, which ``2dq-calibrate`` already defines and DQC shares; pass it for a parser
    of DQC alone.
    """
    defaults = DQCConfig()
    parser.add_argument("--dqc-iters", type=int, default=DEFAULT_ITERS,
                        help="DQC optimizer steps (default: %(default)s, a CPU budget; the paper: 4000 on a GPU)")
    parser.add_argument("--batch", "--dqc-batch", dest="dqc_batch", type=int, default=DEFAULT_BATCH,
                        help="DQC global batch of LR patches, split over processes (default: %(default)s; paper: 16)")
    parser.add_argument("--dqc-patch-size", type=int, default=DEFAULT_PATCH,
                        help="DQC LR patch size (default: %(default)s, a CPU budget; paper: 64)")
    parser.add_argument("--lr", dest="dqc_lr", type=float, default=defaults.lr,
                        help="Adam learning rate of the bounds (default: %(default)s, as the paper)")
    parser.add_argument("--feature-weight", type=float, default=defaults.feature_weight,
                        help="weight lambda of the residual-group feature term (default: %(default)s, as the paper)")
    parser.add_argument("--feature-taps", default="", metavar="PATTERN",
                        help="module-path pattern (fnmatch) of the outputs the feature term compares (default: the "
                        "model's repeated top-level stages, e.g. SwinIR's residual groups)")
    parser.add_argument("--dqc-schedule", choices=SCHEDULES, default=defaults.schedule,
                        help="learning-rate schedule over the DQC steps (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the training images held out for DQC validation (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=defaults.val_every,
                        help="steps between validations; the bounds of the best one are kept; 0: keep the "
                        "last bounds (default: %(default)s)")
    parser.add_argument("--val-patches", type=int, default=DEFAULT_VAL_PATCHES,
                        help="size of the fixed validation batch (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between DQC checkpoints, 0: only at the end (default: %(default)s)")
    parser.add_argument("--dqc-checkpoint", metavar="PATH", default=None,
                        help=f"DQC checkpoint file (default: the artifact path with {CHECKPOINT_SUFFIX})")
    # A finished run is not reused without --resume: the checkpoint's hash does not cover the code, so
    # the same command again computes afresh (calib.dqc_state.refuse_unless_finished).
    parser.add_argument("--resume", action="store_true",
                        help="continue the DQC run of the checkpoint (same options; after a kill, this "
                        "ends with the bounds an uninterrupted run gives; on a finished run, its bounds "
                        "without training again). Without it, an interrupted run's checkpoint is an error, "
                        "and a finished run of the same options is run again from the start, overwriting "
                        "the checkpoint and the artifact")
    parser.add_argument("--dqc-accumulation", type=int, default=1,
                        help="micro-batches per process per step, to bound memory (default: %(default)s)")
    if common:
        parser.add_argument("--threads", type=int, default=None,
                            help="torch CPU threads (default: PyTorch's choice; on a busy machine 1 is much faster)")
        parser.add_argument("--patch-size", type=int, default=64,
                            help="calibration (DOBI) LR patch size (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
        parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def dqc_config_from_args(args: argparse.Namespace, world: int = 1) -> DQCConfig:
    """The :class:`DQCConfig` of the parsed options (``ValueError`` naming the option if invalid)."""
    for option in ("dqc_iters", "dqc_batch", "val_patches", "dqc_accumulation"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.dqc_batch % (world * args.dqc_accumulation):
        raise ValueError(f"--batch {args.dqc_batch} must be a multiple of processes ({world}) x "
                         f"--dqc-accumulation ({args.dqc_accumulation})")
    try:
        return DQCConfig(iters=args.dqc_iters, batch=args.dqc_batch, lr=args.dqc_lr,
                         feature_weight=args.feature_weight, schedule=args.dqc_schedule, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, val_every=args.val_every,
                         accumulation=args.dqc_accumulation, feature_taps=args.feature_taps)
    except ValueError as err:
        raise ValueError(f"DQC options: {err}") from None


def checkpoint_path_from_args(args: argparse.Namespace) -> Optional[Path]:
    """``--dqc-checkpoint``, else the artifact path (``--out``) with :data:`CHECKPOINT_SUFFIX`."""
    if args.dqc_checkpoint:
        return Path(args.dqc_checkpoint)
    out = getattr(args, "out", None)
    if out is None:
        return None
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + CHECKPOINT_SUFFIX)


def validation_batch(val_files: list, patch: int, scale: int, seed: int, n: int) -> tuple[torch.Tensor, int]:
    """DQC's fixed held-out batch: ``n`` LR patches ``(n, 3, patch, patch)`` of ``val_files`` (the held-out
    part of ``split_train_val(images, val_fraction, seed)``), and how many of the files were usable."""
    from toolchain.data.patches import PatchDataset

    val = PatchDataset(val_files, patch, scale, seed=seed + 2, length=n)
    return torch.stack([val[i][0] for i in range(len(val))]), len(val.paths)


def run_dqc(args: argparse.Namespace, model: nn.Module, teacher: Optional[nn.Module] = None, *,
            images: Optional[Sequence[Union[str, os.PathLike]]] = None, progress: bool = True,
            checkpoint_path: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
    """Run DQC on ``model`` (quantized, bounds from DOBI) with the parsed options; returns JSON metadata.

    ``images``: the training image files (default: those under ``args.calib_images``). The returned
    dict (``{"config", "data", "result"}``) belongs in the artifact's ``method_options``; ``model``
    ends with the bounds of the best validation step. Joins a ``torchrun`` process group if the
    environment describes one, and leaves it at the end.

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> from toolchain.defaults import DEFAULT_CALIB_IMAGES
    >>> from calib import quantize
    >>> model = quantize(model, forward_loop=lambda m: m(torch.rand(8, 3, 16, 16)))   # DOBI bounds
    >>> parser = argparse.ArgumentParser()
    >>> add_dqc_arguments(parser, common=True)
    >>> args = parser.parse_args(["--dqc-iters", "2", "--batch", "2", "--dqc-patch-size", "16", "--val-every", "0"])
    >>> options = run_dqc(args, model, images=sorted(DEFAULT_CALIB_IMAGES.glob("*.png")), progress=False)
    >>> options["result"]["iterations"], options["data"]["train_images"], options["checkpoint"]
    (2, 25, None)
    """
    from toolchain.data.patches import PatchDataset, list_images, split_train_val

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if images is None:
        images = list_images(args.calib_images)
    patch = args.dqc_patch_size
    if patch < 1 or not 0.0 < args.val_fraction < 1.0 or args.val_every < 0 or args.checkpoint_every < 0:
        raise ValueError("DQC options: --dqc-patch-size must be positive, --val-fraction in (0, 1), "
                         "--val-every and --checkpoint-every >= 0")
    context = distributed.init_from_env(args.device)
    try:
        config = dqc_config_from_args(args, context.world)
        checkpoint = Path(checkpoint_path) if checkpoint_path is not None else checkpoint_path_from_args(args)
        train_files, val_files = split_train_val(list(images), args.val_fraction, args.seed)
        train = PatchDataset(train_files, patch, info_of(model).scale, seed=args.seed + 1, length=config.iters * config.batch)
        data = {"train_images": len(train.paths), "patch_size": patch, "scale": info_of(model).scale, "seed": args.seed,
                "files": sorted(Path(p).name for p in train_files + val_files)}
        val_batch = None
        if config.val_every:
            val_batch, val_images = validation_batch(val_files, patch, info_of(model).scale, args.seed, args.val_patches)
            data.update(val_images=val_images, val_fraction=args.val_fraction, val_patches=args.val_patches)
        log.info("DQC: %d steps of %d LR patches %dx%d from %d training images (%s), on %d process(es)",
                 config.iters, config.batch, patch, patch, len(train.paths),
                 f"validation on {len(val_batch)} patches of {data['val_images']} held-out images"
                 if val_batch is not None else "no validation: the last step's bounds are kept", context.world)
        result = distill(model, train, config, val_batch=val_batch, teacher=teacher, checkpoint_path=checkpoint,
                         resume=args.resume, context=context, description=data, progress=progress)
    finally:
        distributed.shutdown(context)
    data.pop("files")
    return {"config": config.to_dict(), "data": data, "result": result.to_dict(),
            "checkpoint": None if checkpoint is None else str(checkpoint), "processes": context.world}
