"""``2dq-export``: write the QDQ ONNX graph of a calibrated model, or lint an existing one.

Examples::

    2dq-export --onnx w4a4.onnx --weights x2.pth --calib run/w4a4.safetensors
    2dq-export --onnx w4.onnx --weights x2.pth --calib run/w4_int4.safetensors --target trt-int4 --int4-block 64
    2dq-export --onnx w4a4_fp16.onnx --weights x2.pth --calib run/w4a4.safetensors --float-dtype fp16 --tile 96
    2dq-export --lint-only w4a4.onnx
    2dq-export --onnx          # the defaults: runs/dat_light_x4_w4a4.safetensors -> runs/dat_light_x4_w4a4.onnx
    2dq-export --float --weights x2.pth --onnx x2_fp32.onnx   # the float model, the baseline of the same tiles

The graph takes ``input`` (N, 3, T, T) float32 and returns ``output`` (N, 3, sT, sT) float32 for a
fixed tile ``T`` and any batch ``N``; ``2dq-upscale`` and ``2dq-eval`` cut images into such tiles.
Every export is checked (``onnx.checker``, full) and linted against TensorRT's Q/DQ rules
(:mod:`export.lint`); violations fail the export unless ``--no-lint``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from toolchain import defaults
from toolchain.cli.common import (EXIT_FAILURE, EXIT_OK, UsageError, add_json_argument, add_logging_arguments,
                                  is_verbose, run_cli)
from toolchain.quant.config import TARGETS

from .export_view import INT4_BLOCKS
from .lint import lint_model
from .metadata import ExportMetadata
from .onnx_export import DEFAULT_OPSET, FLOAT_DTYPES, ExportOptions, export_float_onnx, export_onnx

# chatty third-party loggers: their INFO lines narrate every folded constant
_QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.export", "torch._export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-export",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Export the fake-quant model of a checkpoint and a calibration artifact as a QDQ ONNX graph "
        "(int8 / int4 weight initializers feeding DequantizeLinear, activations as Clip -> QuantizeLinear -> "
        "DequantizeLinear with the learned bounds), for a fixed tile size and a dynamic batch of tiles.",
        epilog="Exit codes: 0 ok, 1 failure (mismatched files, export error, lint violations), 2 usage error.",
    )
    parser.add_argument("--onnx", metavar="OUT.onnx", nargs="?", const="",
                        help="graph to write (default, also for a bare --onnx: the artifact's name with .onnx)")
    parser.add_argument("--weights", metavar="CKPT", help="float checkpoint (.pth or .safetensors; default: the shipped "
                        "DAT-light x4)")
    parser.add_argument("--calib", metavar="ARTIFACT", help="calibration artifact (.safetensors + .json sidecar; default: "
                        "runs/<checkpoint>_w4a4.safetensors, what 2dq-calibrate writes by default)")
    parser.add_argument("--float", action="store_true", dest="float_model",
                        help="export the float model of --weights (no artifact, no quantizer): the baseline of the same "
                        "tiles, exporter and CPU graph passes, which 2dq-build-engine --verify compares with the float "
                        "model (default --onnx: runs/<checkpoint>_<float dtype>.onnx)")
    parser.add_argument("--target", choices=TARGETS,
                        help="export target: trt-int8 (INT8 kernels), trt-int4 (weight-only INT4 blocks), ort (ONNX Runtime CPU) "
                        "(default: the artifact's target)")
    parser.add_argument("--tile", type=int, default=64,
                        help="input tile size in LR pixels, a multiple of the model's input multiple (default: %(default)s)")
    parser.add_argument("--float-dtype", choices=tuple(FLOAT_DTYPES),
                        help="dtype of the float layers (default: fp16 for trt-int4, else fp32)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help="ONNX opset (default: %(default)s; int8 fp32 graphs may use 18+, the oldest the torch.export-based "
                        "exporter writes; fp16 needs 19, trt-int4 21)")
    parser.add_argument("--int4-block", type=int, choices=INT4_BLOCKS, default=64,
                        help="trt-int4 block size along the reduction axis (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="tiles per model call, fixed into the graph: trace a static batch of N (default: a dynamic "
                        "batch where the model's code allows it, else 4; an engine of a static batch splits and pads "
                        "the other tools' --batch tiles to it)")
    parser.add_argument("--no-lint", action="store_true", help="write the graph even if it breaks TensorRT's rules")
    parser.add_argument("--lint-only", metavar="FILE.onnx", help="only lint an existing graph")
    add_json_argument(parser, "the export (or lint) report")
    add_logging_arguments(parser)
    return parser


def _lint_only(args: argparse.Namespace) -> int:
    if args.onnx is not None or args.weights or args.calib or args.float_model:
        raise UsageError("--lint-only takes a file and no --onnx/--weights/--calib/--float")
    violations = lint_model(args.lint_only, args.target)
    for violation in violations:
        print(violation)
    print(f"{args.lint_only}: {len(violations)} violation(s)")
    if args.json:
        args.json.write({"file": args.lint_only, "violations": [asdict(v) for v in violations]})
    return EXIT_FAILURE if violations else EXIT_OK


def _main(args: argparse.Namespace) -> int:
    if not is_verbose(args):
        for name in _QUIET_LOGGERS:   # never louder than asked (-q: errors only)
            logging.getLogger(name).setLevel(max(logging.WARNING, args.log_level))
        # "torchvision is not installed" and the like: the exporter's registry, not our business
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if args.lint_only:
        return _lint_only(args)
    args.weights = args.weights or str(defaults.DEFAULT_WEIGHTS)
    if args.float_model:
        if args.calib or args.target:
            raise UsageError("--float exports the float model: it takes no --calib or --target")
        args.onnx = args.onnx or str(defaults.float_onnx_path(args.weights, args.float_dtype or "fp32"))
    elif not args.calib:
        args.calib = str(defaults.existing(defaults.artifact_path(args.weights), "--calib",
                                           "calibrate first: 2dq-calibrate"))
    args.onnx = args.onnx or str(defaults.onnx_path(args.calib))
    try:
        options = ExportOptions(tile=args.tile, target=args.target, float_dtype=args.float_dtype, opset=args.opset,
                                batch=args.batch,
                                int4_block=args.int4_block, lint=not args.no_lint)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.float_model:
        result = export_float_onnx(args.weights, args.onnx, options)
    else:
        result = export_onnx(args.weights, args.calib, args.onnx, options)
    meta = ExportMetadata.from_props(result.metadata, result.path)
    kind = f"target {meta.target}" if meta.artifact_sha256 else "float model (no quantizer)"
    print(f"wrote {result.path}: {meta.arch} x{meta.scale}, tile {meta.tile}, {kind}, {meta.float_dtype}")
    print(f"nodes: {result.nodes_exported} from the exporter, {result.nodes} after simplification")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in result.op_counts.items()))
    for violation in result.violations:
        print(f"lint (ignored): {violation}")
    if args.json:
        args.json.write(result.to_dict())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
