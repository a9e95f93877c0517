"""``2dq-calibrate``: calibrate the quantizer bounds of a float checkpoint and write an artifact.

Examples::

    2dq-calibrate --weights swinir_light_x4.pth --calib-images ../shared/datasets/train \\
        --bits 4 --out run/w4a4.safetensors
    2dq-calibrate --weights NGswin_x2.pth --calib-images ../shared/datasets/train --w-bits 4 --a-bits 8 \\
        --method percentile --percentile 99.9 --granularity per-channel --out run/w4a8_pct.safetensors

Methods live in :data:`METHODS`; each is a :class:`Method` (help text, optional extra options, a
``run(ctx) -> method_options`` function). A method that builds on another (2DQuant = DOBI, then
DQC) adds an entry whose ``run`` calls the first one and continues; nothing else changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from toolchain import defaults
from toolchain.cli.common import UsageError, add_json_argument, add_logging_arguments, run_cli
from toolchain.quant import QuantConfig, quantize_model
from toolchain.quant.config import GRANULARITIES, SELECTABLE, TARGETS

from .artifact import BOUNDS_SUFFIX, describe_images, save_artifact, sidecar_path
from .baselines import DEFAULT_PERCENTILE, calibrate_minmax, calibrate_percentile
from .bit_budget import add_bit_budget_arguments, allocate_bits, bit_budget_from_args
from .dobi import DEFAULT_CANDIDATES, MODES, calibrate_dobi
from .gptq import DEFAULT_DAMP
from .init_cli import add_init_argument, check_init_args, run_init
from .observers import DEFAULT_BINS, batch_forward_loop
from .reconstruct_cli import add_reconstruct_arguments, check_reconstruct_args, run_reconstruct
from .reconstruct_cli import checkpoint_path as reconstruct_checkpoint
from .transforms import add_transform_arguments, attach_transforms, finish_transforms, transforms_config_from_args
from toolchain.models import info_of

log = logging.getLogger("2dq-calibrate")


@dataclass
class CalibrationContext:
    """Everything a method may use: the quantized model (uninitialized bounds), the float weights,
    the calibration LR patches ``(N, 3, p, p)``, the image files, the parsed options."""

    model: nn.Module
    weights: Path
    lr: torch.Tensor
    images: list[Path]
    args: argparse.Namespace
    device: str
    progress: bool
    #: ``--gptq``: the refined float weights by parameter name and the facts for the sidecar, once run
    refined: Optional[dict[str, torch.Tensor]] = None
    gptq_facts: Optional[dict[str, Any]] = None

    def forward_loop(self, desc: str = "calibration") -> Callable[[nn.Module], None]:
        """One pass of the calibration patches through a model, ``--batch`` patches per call."""
        return batch_forward_loop(self.lr, self.args.batch, self.device, self.progress, desc)

    def refine_weights(self) -> None:
        """``--gptq`` (after the bounds are set): GPTQ weight codes on the final grids."""
        from .gptq import refine_weights

        if not self.args.gptq or self.refined is not None:
            return
        try:
            results, self.refined = refine_weights(self.model, self.forward_loop("GPTQ statistics"),
                                                   self.args.gptq_damp, self.args.gptq_order == "act", self.progress)
        except ValueError as err:
            raise UsageError(f"--gptq: {err}") from None
        rtn, gptq = sorted(r.rtn_error for r in results), sorted(r.gptq_error for r in results)
        self.gptq_facts = {
            "linears": len(results), "damp": self.args.gptq_damp, "order": self.args.gptq_order,
            "mean_relative_error": {"round_to_nearest": sum(rtn) / len(rtn), "gptq": sum(gptq) / len(gptq)},
            "median_relative_error": {"round_to_nearest": rtn[len(rtn) // 2], "gptq": gptq[len(gptq) // 2]}}


@dataclass(frozen=True)
class Method:
    """A calibration method of the CLI: ``run(ctx)`` sets every bound and returns its options."""

    help: str
    run: Callable[[CalibrationContext], dict[str, Any]]
    add_arguments: Optional[Callable[[argparse._ArgumentGroup], None]] = None


def _dobi_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                       help="DOBI: candidate bound pairs per quantizer (default: %(default)s, as the paper)")
    group.add_argument("--dobi-mode", choices=MODES, default="auto",
                       help="DOBI search for activations: auto (per tensor, from its data and role), both "
                       "(shrink both ends), upper (keep the minimum, lower the maximum) (default: %(default)s)")
    group.add_argument("--bins", type=int, default=DEFAULT_BINS,
                       help="histogram bins per activation quantizer, DOBI and percentile (default: %(default)s)")


def run_dobi(ctx: CalibrationContext) -> dict[str, Any]:
    results = calibrate_dobi(ctx.model, ctx.forward_loop("DOBI"), candidates=ctx.args.candidates,
                             mode=ctx.args.dobi_mode, bins=ctx.args.bins)
    modes: dict[str, int] = {}
    for result in results.values():
        modes[result.mode] = modes.get(result.mode, 0) + 1
    return {"candidates": ctx.args.candidates, "mode": ctx.args.dobi_mode, "bins": ctx.args.bins,
            "modes_chosen": modes}


def _percentile_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                       help="percentile: upper bound at this percentile, lower at 100 minus it "
                       "(default: %(default)s, i.e. 0.01%% clipped at each end)")


def run_percentile(ctx: CalibrationContext) -> dict[str, Any]:
    calibrate_percentile(ctx.model, ctx.forward_loop("percentile"), ctx.args.percentile, ctx.args.bins)
    return {"percentile": ctx.args.percentile, "bins": ctx.args.bins}


def run_minmax(ctx: CalibrationContext) -> dict[str, Any]:
    calibrate_minmax(ctx.model, ctx.forward_loop("MinMax"))
    return {}


def _2dquant_arguments(group: argparse._ArgumentGroup) -> None:
    from .dqc_cli import add_dqc_arguments

    add_dqc_arguments(group)  # the DOBI options come from the dobi method's group


def run_2dquant(ctx: CalibrationContext) -> dict[str, Any]:
    """2DQuant: DOBI bounds, then DQC distillation of every bound from the float teacher."""
    from .dqc_cli import dqc_configs_from_args
    from .dqc_run import run_dqc

    config, data, run = dqc_configs_from_args(ctx.args, images=ctx.images)  # before DOBI: bad options fail fast
    options = run_dobi(ctx)
    finish_transforms(ctx.model)  # DQC starts from exact shifted grids
    refined: dict[str, torch.Tensor] = {}   # --learned-rounding: the baked weights
    options["dqc"] = run_dqc(ctx.model, config, data, run, progress=ctx.progress, weights_out=refined)
    ctx.refined = refined or None
    return options


#: name -> method; add an entry here to offer a new method
METHODS: dict[str, Method] = {
    "2dquant": Method("DOBI, then DQC distillation of the bounds (the full 2DQuant)", run_2dquant,
                      _2dquant_arguments),
    "dobi": Method("DOBI bound search (2DQuant stage 1)", run_dobi, _dobi_arguments),
    "minmax": Method("lower = min, upper = max", run_minmax),
    "percentile": Method("percentile clipping of each tensor", run_percentile, _percentile_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-calibrate",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Attach fake quantizers to a float SR checkpoint, calibrate their bounds on LR patches "
        "drawn from training images (one forward pass), and write the bounds (.safetensors) with a JSON "
        "sidecar of metadata (same name, .json).",
        epilog="Use training images for calibration (e.g. ../shared/datasets/train), never the test sets. "
        "Exit codes: 0 ok, 1 failure (unreadable or mismatched files, bad data), 2 usage error.",
    )
    parser.add_argument("--weights", default=str(defaults.DEFAULT_WEIGHTS), metavar="CKPT",
                        help="float checkpoint (.pth or .safetensors; default: the shipped DAT-light x4)")
    parser.add_argument("--calib-images", default=str(defaults.DEFAULT_CALIB_IMAGES), metavar="DIR",
                        help="folder of HR training images (searched recursively) to draw patches from (default: "
                        "the 28 shipped training images)")
    parser.add_argument("--out", metavar="ARTIFACT",
                        help=f"bounds file to write, ending in {BOUNDS_SUFFIX}; the sidecar gets the same name "
                        "with .json (run/w4a4.safetensors -> run/w4a4.json) (default: "
                        "runs/<checkpoint>_w<W>a<A>[_<method>].safetensors, e.g. runs/dat_light_x4_w4a4.safetensors)")
    parser.add_argument("--method", choices=sorted(METHODS), default="dobi",
                        help="; ".join(f"{name}: {m.help}" for name, m in METHODS.items()) + " (default: %(default)s)")
    add_init_argument(parser)
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--bits", type=int, default=4, help="bits of weights and activations (default: %(default)s)")
    quant.add_argument("--w-bits", type=int, help="weight bits (default: --bits)")
    quant.add_argument("--a-bits", type=int, help="activation bits (default: --bits)")
    quant.add_argument("--granularity", choices=GRANULARITIES, default="per-tensor",
                       help="weight bounds per tensor (the paper) or per output channel (default: %(default)s)")
    quant.add_argument("--target", choices=TARGETS, default="trt-int8",
                       help="export target; trt-int4 needs 4-bit weights and makes them symmetric (default: %(default)s)")
    quant.add_argument("--quantize", default="linear,matmul",
                       help=f"comma-separated roles to quantize, from {','.join(SELECTABLE)} (default: %(default)s)")
    quant.add_argument("--include", default="", help="comma-separated fnmatch patterns of quantizer names to keep")
    quant.add_argument("--exclude", default="", help="comma-separated fnmatch patterns of quantizer names to drop")
    quant.add_argument("--bits-override", action="append", default=[], metavar="PATTERN=BITS",
                       help="mixed precision: quantizers whose names match PATTERN take BITS (weights and "
                       "activations; the last match wins), e.g. 'encoder_layer1.*=8'; repeatable")
    add_bit_budget_arguments(parser.add_argument_group("mixed precision under a bit budget (calib/bit_budget.py)"))
    add_transform_arguments(parser.add_argument_group(
        "transforms beyond 2DQuant (exact: the float model is unchanged; learned by DQC with the bounds)"))
    refine = parser.add_argument_group("weight refinement (after the bounds of dobi, minmax, percentile; the grids "
                                       "are unchanged)")
    refine.add_argument("--gptq", action="store_true",
                        help="GPTQ: choose the weight codes of every quantized linear so that rounding errors "
                        "compensate on the calibration inputs instead of rounding each weight to nearest")
    refine.add_argument("--gptq-damp", type=float, default=DEFAULT_DAMP,
                        help="GPTQ: fraction of the mean input second moment added to its diagonal "
                        "(default: %(default)s)")
    refine.add_argument("--gptq-order", choices=("act", "natural"), default="act",
                        help="GPTQ: quantize columns by decreasing input energy (act) or in place order "
                        "(default: %(default)s)")
    add_reconstruct_arguments(parser.add_argument_group(
        "block reconstruction (BRECQ-style, after the bounds of dobi, minmax, percentile; calib/reconstruct.py)"))
    data = parser.add_argument_group("calibration data")
    data.add_argument("--patches", type=int, default=32, help="LR patches (default: %(default)s, as the paper)")
    data.add_argument("--patch-size", type=int, default=64, help="LR patch size in pixels (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0, help="patch sampling seed (default: %(default)s)")
    data.add_argument("--batch", type=int, default=8,
                      help="calibration patches per model call: bounds memory; the bounds do not depend on it "
                      "(default: %(default)s; DQC's training batch is --dqc-batch)")
    for name, method in METHODS.items():
        if method.add_arguments is not None:
            method.add_arguments(parser.add_argument_group(f"--method {name}"))
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads of the computation (torch's intra-op threads; "
                        "default: torch's choice; 1 helps on a machine shared with other jobs)")
    add_json_argument(parser, "a summary (artifact, sidecar, method options, seconds)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_logging_arguments(parser)
    return parser


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The :class:`QuantConfig` the options describe (a usage error if they are inconsistent)."""
    try:
        return QuantConfig(
            w_bits=args.w_bits if args.w_bits is not None else args.bits,
            a_bits=args.a_bits if args.a_bits is not None else args.bits,
            weight_granularity=args.granularity, quantize=_split(args.quantize),
            include=_split(args.include), exclude=_split(args.exclude), target=args.target,
            bits_overrides=tuple(args.bits_override),
        )
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _check_args(args: argparse.Namespace, config: QuantConfig) -> None:
    if args.out is None:
        args.out = str(defaults.artifact_path(args.weights, config.w_bits, config.a_bits, args.method))
        if args.bit_budget is not None:  # never the uniform run's default file
            args.out = args.out.replace(BOUNDS_SUFFIX, f"_budget{args.bit_budget.replace(',', '-')}{BOUNDS_SUFFIX}")
    try:
        sidecar_path(args.out)
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None
    for option in ("patches", "patch_size", "batch", "candidates", "bins"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")
    if args.bins < 16:
        raise UsageError(f"--bins must be at least 16, got {args.bins}")
    if not 50.0 < args.percentile <= 100.0:
        raise UsageError(f"--percentile must be in (50, 100], got {args.percentile}")
    if not args.gptq_damp > 0.0:
        raise UsageError(f"--gptq-damp must be positive, got {args.gptq_damp}")
    check_reconstruct_args(args)
    if args.gptq and args.method == "2dquant":
        raise UsageError("--gptq does not go with --method 2dquant: GPTQ codes under DQC's moving grids measured "
                         "+0.05 dB at W4A4 and -2.8 dB at W3A3 on NGswin x2 (after DQC: -0.10 dB at W4A4; "
                         "benchmarks/beyond_2dquant.md); use it with dobi, minmax or percentile")


def _main(args: argparse.Namespace) -> int:
    from toolchain import load_model
    from toolchain.data.patches import list_images, sample_patches

    if args.init is not None:  # DQC from an artifact: no bounds search, the artifact's model
        check_init_args(args, build_parser())
        summary = run_init(args)
        if args.json and summary["seconds"] is not None:
            args.json.write(summary)
        return 0
    config = quant_config_from_args(args)
    _check_args(args, config)
    try:
        budget = bit_budget_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if budget is not None and config.target == "trt-int4":
        raise UsageError("--bit-budget: not with --target trt-int4 (its weights are all 4-bit)")
    if budget is not None and budget.weight == budget.activation == budget.widths[0]:
        # no quantizer can go narrower to pay for a wider one: the allocation is the uniform model, so skip its pass
        narrowest = budget.widths[0]
        log.warning("--bit-budget %s: %d bits is the narrowest allowed width, so every quantizer takes it; "
                    "calibrating the uniform W%dA%d model (no sensitivity pass)", args.bit_budget, narrowest,
                    narrowest, narrowest)
        config = dataclasses.replace(config, w_bits=narrowest, a_bits=narrowest)
        budget = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(args.weights, device=args.device)
    try:
        quantize_model(model, config)
    except ValueError as err:
        raise UsageError(f"{err}") from None
    images = list_images(args.calib_images)
    if not images:
        raise ValueError(f"--calib-images {args.calib_images}: no image files found")
    lr, _ = sample_patches(images, args.patches, args.patch_size, info_of(model).scale, args.seed)
    log.info("%d LR patches %dx%d from %d images in %s (seed %d)", lr.shape[0], args.patch_size,
             args.patch_size, len(images), args.calib_images, args.seed)
    allocation = None
    if budget is not None:  # choose the widths on this model, then calibrate a model built with them
        if args.bit_budget_on == "transformed":  # the transforms do not depend on the widths: attached again below
            transforms_config = transforms_config_from_args(args)
            if not transforms_config.enabled:
                raise UsageError("--bit-budget-on transformed: this run attaches no transform (--smooth, --rotate, "
                                 "--shifts, --input-shifts); leave it at plain")
            attach_transforms(model, lr, batch_forward_loop(lr, args.batch, args.device, not args.no_progress,
                                                            "smoothing statistics"), transforms_config)
        allocation = allocate_bits(model, lr, budget, patches=args.bit_budget_patches, batch=args.batch,
                                   candidates=args.candidates, bins=args.bins, device=args.device,
                                   progress=not args.no_progress)
        config = allocation.apply(config)
        model = quantize_model(load_model(args.weights, device=args.device), config)
    ctx = CalibrationContext(model, Path(args.weights), lr, images, args, args.device, not args.no_progress)
    transforms = attach_transforms(model, lr, ctx.forward_loop("smoothing statistics"),
                                   transforms_config_from_args(args))
    options = METHODS[args.method].run(ctx)
    finish_transforms(model)
    if transforms:
        options["transforms"] = transforms
    if args.reconstruct:
        options["reconstruct"], refined = run_reconstruct(model, lr, args, progress=ctx.progress)
        ctx.refined = refined or None
    ctx.refine_weights()
    if ctx.gptq_facts is not None:
        options["gptq"] = ctx.gptq_facts
    if allocation is not None:
        options["bit_budget"] = {**allocation.to_dict(), "measured_on": args.bit_budget_on}
    calibration = {"data": str(Path(args.calib_images).resolve()), **describe_images(args.calib_images, images),
                   "patches": args.patches, "patch_size": args.patch_size, "scale": info_of(model).scale,
                   "seed": args.seed, "augment": True, "batch_size": args.batch}
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun only rank 0 writes
        return 0
    save_artifact(args.out, model, checkpoint=args.weights, quant_config=config, method=args.method,
                  method_options=options, calibration=calibration, weights=ctx.refined)
    if args.reconstruct:  # its work is in the artifact now
        reconstruct_checkpoint(args.out).unlink(missing_ok=True)
    summary = {"artifact": str(args.out), "sidecar": str(sidecar_path(args.out)), "method": args.method,
               "method_options": options, "quant_config": config.to_dict(),
               "seconds": round(time.perf_counter() - started, 3)}
    widths = ", ".join([f"W{config.w_bits}A{config.a_bits}", *config.bits_overrides] if allocation is None else
                       [f"bit budget {args.bit_budget}: average W{allocation.average_bits('weight'):.3f}"
                        f"A{allocation.average_bits('activation'):.3f}"])
    print(f"{args.method}: calibrated {info_of(model).arch} x{info_of(model).scale} ({widths}, {config.weight_granularity}, "
          f"{config.target}) in {summary['seconds']:.1f} s")
    print(f"wrote {summary['artifact']} and {summary['sidecar']}")
    if args.json:
        args.json.write(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
