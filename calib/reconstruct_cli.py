"""``2dq-calibrate --reconstruct``: the command-line options of block reconstruction (:mod:`calib.reconstruct`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.cli.common import UsageError

from .reconstruct import ReconstructConfig, reconstruct_blocks

DEFAULTS = ReconstructConfig()
CHECKPOINT_SUFFIX = ".reconstruct-checkpoint.safetensors"


def add_reconstruct_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--reconstruct", action="store_true",
                       help="train the bounds of one block at a time so that its output on the quantized model's "
                       "input matches the float model's (the model's repeated blocks; with --learned-rounding "
                       "also the weights' rounding)")
    group.add_argument("--reconstruct-iters", type=int, default=DEFAULTS.iters,
                       help="optimizer steps per block (default: %(default)s)")
    group.add_argument("--reconstruct-batch", type=int, default=DEFAULTS.batch,
                       help="calibration patches per step (default: %(default)s)")
    group.add_argument("--reconstruct-lr", type=float, default=DEFAULTS.lr,
                       help="Adam learning rate of the bounds, relative to each quantizer's range (default: %(default)s)")
    group.add_argument("--reconstruct-units", default=DEFAULTS.units, metavar="PATTERN",
                       help="fnmatch pattern of the blocks' module paths (default: the model's repeated stages, "
                       "as DQC's feature taps)")
    group.add_argument("--reconstruct-drop", type=float, default=DEFAULTS.drop, metavar="P",
                       help="QDrop: while training, each element of a block's input is the float model's with "
                       "probability P instead of the quantized model's (default: %(default)s)")
    group.add_argument("--reconstruct-affine", action="store_true",
                       help="also train each block's biases and normalization affines, which the deployed graph keeps "
                       "in float (stored in the artifact)")
    group.add_argument("--affine-lr", type=float, default=DEFAULTS.affine_lr,
                       help="Adam learning rate of --reconstruct-affine's biases and affines (default: %(default)s)")
    group.add_argument("--learned-rounding", action="store_true",
                       help="with --reconstruct or --method 2dquant (DQC): learn each weight's rounding (AdaRound) "
                       "on its grid (fixed, unless --rounding-grids) instead of training the weight bounds; the "
                       "weights are stored in the artifact (not with --gptq)")
    group.add_argument("--rounding-lr", type=float, default=DEFAULTS.rounding_lr,
                       help="Adam learning rate of the rounding logits (default: %(default)s)")
    group.add_argument("--rounding-weight", type=float, default=DEFAULTS.rounding_weight,
                       help="weight of the regularizer that makes every rounding 0 or 1 (default: %(default)s)")
    group.add_argument("--rounding-grids", action="store_true",
                       help="with --reconstruct --learned-rounding: train the weights' grids (their bounds) together "
                       "with the rounding instead of keeping the calibrated ones")
    group.add_argument("--grid-lr", type=float, default=DEFAULTS.grid_lr,
                       help="Adam learning rate of --rounding-grids' weight bounds, relative to each one's range "
                       "(default: %(default)s)")


def reconstruct_config_from_args(args: argparse.Namespace) -> ReconstructConfig:
    try:
        return ReconstructConfig(iters=args.reconstruct_iters, batch=args.reconstruct_batch, lr=args.reconstruct_lr,
                                 rounding=args.learned_rounding, rounding_lr=args.rounding_lr,
                                 rounding_weight=args.rounding_weight, rounding_grids=args.rounding_grids,
                                 grid_lr=args.grid_lr, units=args.reconstruct_units, seed=args.seed,
                                 drop=args.reconstruct_drop, affine=args.reconstruct_affine, affine_lr=args.affine_lr)
    except ValueError as err:
        option = str(err).split(".", 1)[1].split(" ", 1)[0] if "ReconstructConfig." in str(err) else ""
        flag = {"iters": "--reconstruct-iters", "batch": "--reconstruct-batch", "lr": "--reconstruct-lr",
                "rounding_lr": "--rounding-lr", "rounding_weight": "--rounding-weight", "drop": "--reconstruct-drop",
                "affine_lr": "--affine-lr", "grid_lr": "--grid-lr"}.get(option, "--reconstruct")
        raise UsageError(f"{flag}: {err}") from None


def check_reconstruct_args(args: argparse.Namespace) -> None:
    """Usage errors of the options, before anything runs."""
    if args.rounding_grids and not (args.reconstruct and args.learned_rounding):
        raise UsageError("--rounding-grids trains the grids of the weights' learned rounding block by block: it needs "
                         "--reconstruct and --learned-rounding")
    reconstruct_config_from_args(args)
    if args.learned_rounding and not (args.reconstruct or args.method == "2dquant"):
        raise UsageError("--learned-rounding learns the weights' rounding block by block (--reconstruct) or end to "
                         "end with the bounds (--method 2dquant): it needs one of them")
    if args.reconstruct_affine and not args.reconstruct:
        raise UsageError("--reconstruct-affine trains the biases and affines block by block: it needs --reconstruct")
    if args.reconstruct and args.method == "2dquant":
        raise UsageError("--reconstruct is an alternative to DQC's end-to-end distillation (--method 2dquant): use it "
                         "with dobi, minmax or percentile")
    if args.learned_rounding and args.gptq:
        raise UsageError("--learned-rounding and --gptq both choose the weight codes: pick one")


def checkpoint_path(artifact: str | Path) -> Path:
    """The checkpoint beside an artifact: ``run/w4a4.safetensors`` -> ``run/w4a4.reconstruct-checkpoint.safetensors``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name.removesuffix(artifact.suffix) + CHECKPOINT_SUFFIX)


def run_reconstruct(model: nn.Module, lr: torch.Tensor, args: argparse.Namespace, *,
                    progress: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Block reconstruction of ``model`` on the calibration patches: the sidecar's facts and the new weights.

    Checkpointed after every block beside ``--out`` (:func:`checkpoint_path`; ``--resume`` continues it); the
    caller removes the checkpoint once the artifact is written."""
    config = reconstruct_config_from_args(args)
    try:
        results, refined = reconstruct_blocks(model, lr, config, device=args.device, progress=progress,
                                              checkpoint=checkpoint_path(args.out), resume=args.resume)
    except ValueError as err:
        raise UsageError(f"--reconstruct: {err}") from None
    facts = {"config": config.to_dict(), "blocks": len(results), "improved": sum(r.kept for r in results),
             "start_mse": sum(r.start_mse for r in results), "end_mse": sum(r.end_mse for r in results),
             "seconds": round(sum(r.seconds for r in results), 1),
             "per_block": [{"name": r.name, "start_mse": r.start_mse, "end_mse": r.end_mse, "kept": r.kept}
                           for r in results]}
    return facts, refined
