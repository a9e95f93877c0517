"""``2dq-calibrate --method 2dquant --init ARTIFACT``: DQC that starts from an artifact instead of DOBI.

The model is the artifact's (:func:`calib.artifact.load_quantized_model`: its quantization, bit widths,
folds and refined weights, baked), and DQC trains its quantizer bounds end to end against the float model
on ``--calib-images``; the new artifact is the old one with the trained bounds
(:func:`calib.artifact.save_rebounded`). The use: distill the bounds of a block reconstruction
(``--reconstruct``, whose blocks never see the model's output) against the whole model's output, or give a
CPU calibration a GPU's DQC budget later. The artifact decides everything about the model, so the options
of the stages that do not run (quantization, bit budget, transforms, GPTQ, reconstruction, DOBI, the
calibration patches) are refused rather than silently ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from toolchain.cli.common import UsageError
from toolchain.models import info_of
from toolchain.quant import bounds_state

from .artifact import ArtifactError, load_artifact, load_quantized_model, save_rebounded, sidecar_path

log = logging.getLogger(__name__)

#: the options ``--init`` reads besides DQC's own (the ``--method 2dquant`` group)
USED = frozenset({"help", "init", "weights", "calib_images", "out", "method", "seed", "device", "threads", "json",
                  "no_progress", "log_level"})


def add_init_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", metavar="ARTIFACT", default=None,
                        help="with --method 2dquant: start DQC from this artifact's model and bounds instead of "
                        "DOBI (e.g. the artifact of a --reconstruct run); the new artifact is it with the "
                        "trained bounds")


def check_init_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors of ``--init``: the method, ``--out``, and every option of a stage that does not run."""
    if args.method != "2dquant":
        raise UsageError(f"--init {args.init}: refining an artifact is DQC's work: add --method 2dquant")
    if args.out is None:
        raise UsageError("--init: name the new artifact with --out (the --init artifact is never overwritten)")
    try:
        sidecar_path(args.out)
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None
    if Path(args.out).resolve() == Path(args.init).resolve():
        raise UsageError(f"--out {args.out} is the --init artifact: write the refined one beside it")
    dqc = {action.dest for group in parser._action_groups if group.title == "--method 2dquant"
           for action in group._group_actions}
    defaults = vars(parser.parse_args([]))
    unused = [key for key, value in vars(args).items()
              if key not in USED and key not in dqc and key in defaults and value != defaults[key]]
    if unused:
        flags = ", ".join("--" + key.replace("_", "-") for key in unused)
        raise UsageError(f"--init {args.init} takes the quantization, transforms, weights and bounds from the "
                         f"artifact: {flags} would not be used (drop {'it' if len(unused) == 1 else 'them'})")


def run_init(args: argparse.Namespace) -> dict[str, Any]:
    """Load, run DQC, write; returns the summary ``2dq-calibrate`` prints (``ArtifactError`` for a bad artifact)."""
    from toolchain.data.patches import list_images

    from .dqc_cli import dqc_configs_from_args
    from .dqc_run import run_dqc

    started = time.perf_counter()
    source = load_artifact(args.init)
    images = list_images(args.calib_images)
    if not images:
        raise ValueError(f"--calib-images {args.calib_images}: no image files found")
    try:
        config, data, run = dqc_configs_from_args(args, images=images)
    except ValueError as err:
        raise UsageError(str(err)) from None
    config = dataclasses.replace(config, train_folds=False)   # the artifact's folds and weights stay
    model = load_quantized_model(args.weights, args.init, device=args.device, bake=False)
    log.info("--init %s: DQC from the bounds of its %s calibration", args.init, source.meta["method"])
    dqc = run_dqc(model, config, data, run, progress=not args.no_progress)
    from .distributed import is_main_process

    summary = {"artifact": str(args.out), "sidecar": str(sidecar_path(args.out)), "method": "2dquant",
               "init": str(args.init), "seconds": None}
    if not is_main_process():
        return summary
    options = {**source.meta.get("method_options", {}), "init_method": source.meta["method"], "dqc": dqc}
    try:
        save_rebounded(args.out, source, bounds_state(model), method="2dquant", method_options=options)
    except ValueError as err:  # the loaded model's quantizers are the artifact's: this is a bug, not bad input
        raise ArtifactError(f"--init {args.init}: {err}") from err
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print(f"2dquant: DQC from {args.init} ({source.meta['method']}) on {info_of(model).arch} "
          f"x{info_of(model).scale} in {summary['seconds']:.1f} s")
    print(f"wrote {summary['artifact']} and {summary['sidecar']}")
    return summary
