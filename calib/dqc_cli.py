"""Command-line face of DQC: ``add_dqc_arguments(parser)`` and ``dqc_configs_from_args(args)``.

``2dq-calibrate --method 2dquant`` runs DOBI, then :func:`calib.dqc_run.run_dqc` on the same model
with the configs :func:`dqc_configs_from_args` builds from the flags (the only reader of DQC's flags;
the library takes the frozen :class:`~calib.dqc.DQCConfig`, :class:`~calib.dqc_run.DQCData` and
:class:`~calib.dqc_run.DQCRun`). DQC draws random LR patches from the training images, holds out
``--val-fraction`` of them for a fixed validation batch, and keeps the bounds of the best validation
step. Never point it at Set5, Set14 or B100.

CPU budget (default): the paper runs 4000 steps of batch 16 (64x64 LR) on a GPU. One step of
SwinIR-light x4 W4A4 at batch 4 of 48x48 costs about 10 CPU-seconds here (fake quantization and
its backward dominate; ``benchmarks/dqc_speed.md``), so the default is :data:`DEFAULT_ITERS` steps
of batch :data:`DEFAULT_BATCH` at :data:`DEFAULT_PATCH` x :data:`DEFAULT_PATCH` (``--dqc-patch-size``;
``--patch-size`` stays the DOBI calibration patch size), validated every 10 steps: about 7 CPU-minutes.
On NGswin x2 W4A4, 30 such steps took the validation PSNR against the float model from 24.6 to
28.1 dB. On a GPU, use ``--dqc-iters 4000 --dqc-batch 16 --dqc-patch-size 64`` for the paper's budget.

Several processes: ``torchrun --nproc-per-node N 2dq-calibrate ... --method 2dquant`` (gloo on CPU,
nccl on CUDA); ``--dqc-batch`` is the global batch, split evenly over the ranks; rank 0 alone writes
checkpoints (callers write artifacts only where :func:`calib.distributed.is_main_process`).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence, Union

from .dqc import SCHEDULES, DQCConfig
from .dqc_run import (CHECKPOINT_SUFFIX, DEFAULT_PATCH, DEFAULT_VAL_FRACTION, DEFAULT_VAL_PATCHES, DQCData, DQCRun,
                      default_checkpoint_path)

__all__ = ["CHECKPOINT_SUFFIX", "DEFAULT_BATCH", "DEFAULT_ITERS", "DEFAULT_PATCH", "DEFAULT_VAL_PATCHES",
           "add_dqc_arguments", "dqc_configs_from_args"]

DEFAULT_ITERS = 40
DEFAULT_BATCH = 4

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
    parser.add_argument("--dqc-batch", type=int, default=DEFAULT_BATCH,
                        help="DQC training batch of LR patches per optimizer step, global: split over processes "
                        "(default: %(default)s; paper: 16)")
    parser.add_argument("--dqc-patch-size", type=int, default=DEFAULT_PATCH,
                        help="DQC LR patch size (default: %(default)s, a CPU budget; paper: 64)")
    parser.add_argument("--dqc-lr", type=float, default=defaults.lr,
                        help="DQC's Adam learning rate of the bounds (default: %(default)s, as the paper)")
    parser.add_argument("--feature-weight", type=float, default=defaults.feature_weight,
                        help="weight lambda of the residual-group feature term (default: %(default)s, as the paper)")
    parser.add_argument("--feature-taps", default="", metavar="PATTERN",
                        help="module-path pattern (fnmatch) of the outputs the feature term compares (default: the "
                        "model's repeated top-level stages, e.g. SwinIR's residual groups)")
    parser.add_argument("--dqc-schedule", choices=SCHEDULES, default=defaults.schedule,
                        help="learning-rate schedule over the DQC steps (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
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
                        help="continue the DQC run of the checkpoint (with --reconstruct: the block "
                        "reconstruction's, after its last finished block) (same options; after a kill, this "
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


def _launched_world() -> int:
    """How many processes the run joins (as :func:`calib.distributed.init_from_env` will find them): the
    live process group's size, else ``torchrun``'s ``WORLD_SIZE``, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def _rounding_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--learned-rounding`` and its ``--rounding-lr`` / ``--rounding-weight`` (2dq-calibrate's block-reconstruction
    group defines them; a parser without them leaves DQC's defaults)."""
    if not getattr(args, "learned_rounding", False):
        return {}
    return {"rounding": True, "rounding_lr": args.rounding_lr, "rounding_weight": args.rounding_weight}


def dqc_configs_from_args(args: argparse.Namespace, world: Optional[int] = None, *,
                          images: Optional[Sequence[Union[str, os.PathLike]]] = None
                          ) -> tuple[DQCConfig, DQCData, DQCRun]:
    """The DQC configs the parsed options describe: the one place that reads DQC's flags.

    ``world``: processes the global ``--dqc-batch`` is split over (default: those of the ``torchrun``
    launch, 1 alone). ``images``: the training image files (default: those under ``args.calib_images``).
    The checkpoint is ``--dqc-checkpoint``, else the one beside ``--out`` (:func:`default_checkpoint_path`),
    else none. ``ValueError`` naming the option when one is invalid.

    >>> parser = argparse.ArgumentParser()
    >>> add_dqc_arguments(parser, common=True)
    >>> args = parser.parse_args(["--dqc-iters", "2", "--dqc-batch", "2", "--dqc-patch-size", "16"])
    >>> config, data, run = dqc_configs_from_args(args, images=["a.png", "b.png"])
    >>> config.iters, config.batch, data.patch_size, data.images[0], run.checkpoint
    (2, 2, 16, PosixPath('a.png'), None)
    >>> dqc_configs_from_args(parser.parse_args(["--dqc-batch", "6"]), world=4, images=["a.png"])
    Traceback (most recent call last):
    ValueError: --dqc-batch 6 must be a multiple of processes (4) x --dqc-accumulation (1)
    """
    world = _launched_world() if world is None else world
    for option in ("dqc_iters", "dqc_batch", "val_patches", "dqc_accumulation"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.dqc_batch % (world * args.dqc_accumulation):
        raise ValueError(f"--dqc-batch {args.dqc_batch} must be a multiple of processes ({world}) x "
                         f"--dqc-accumulation ({args.dqc_accumulation})")
    if args.dqc_patch_size < 1 or not 0.0 < args.val_fraction < 1.0 or args.val_every < 0 or args.checkpoint_every < 0:
        raise ValueError("DQC options: --dqc-patch-size must be positive, --val-fraction in (0, 1), "
                         "--val-every and --checkpoint-every >= 0")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    out = getattr(args, "out", None)
    checkpoint = args.dqc_checkpoint or (default_checkpoint_path(out) if out is not None else None)
    if args.resume and checkpoint is None:
        raise ValueError("--resume needs the checkpoint to continue: --dqc-checkpoint (or --out)")
    if images is None:
        from toolchain.data.patches import list_images

        images = list_images(args.calib_images)
        if not images:
            raise ValueError(f"--calib-images {args.calib_images}: no image files found")
    try:
        config = DQCConfig(iters=args.dqc_iters, batch=args.dqc_batch, lr=args.dqc_lr,
                           feature_weight=args.feature_weight, schedule=args.dqc_schedule, seed=args.seed,
                           checkpoint_every=args.checkpoint_every, val_every=args.val_every,
                           accumulation=args.dqc_accumulation, feature_taps=args.feature_taps,
                           **_rounding_options(args))
        data = DQCData(tuple(images), patch_size=args.dqc_patch_size, val_fraction=args.val_fraction,
                       val_patches=args.val_patches)
        run = DQCRun(device=args.device, threads=threads, checkpoint=checkpoint, resume=args.resume)
    except ValueError as err:
        raise ValueError(f"DQC options: {err}") from None
    return config, data, run
