"""``2dq-eval``: PSNR/SSIM (Y channel) of a model, a fake-quant model or an engine on benchmark sets.

Examples::

    2dq-eval --model bicubic --data ../shared/datasets --sets Set5,B100 --scales 2,3,4
    2dq-eval --weights models/swinir_light_x4.safetensors --data ../shared/datasets --json fp.json
    2dq-eval --weights CKPT --calib run/w4a4.safetensors --data ../shared/datasets
    2dq-eval --engine w4a4.ort.onnx --data ../shared/datasets --sets Set5
    2dq-eval --backend openvino --threads 1

A command-line module: it may import from every layer (the engines live in :mod:`engines`).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engines.upscalers import BACKENDS, ENGINE_BACKENDS, engine_backend, make_upscaler

from ..evaluate import SetResult, evaluate_set, markdown_table
from .. import defaults
from .common import UsageError, add_json_argument, add_logging_arguments, parse_int_list, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-eval",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Evaluate super-resolution quality (PSNR/SSIM on the Y channel, crop border = scale, "
        "the BasicSR / 2DQuant convention) of a checkpoint, its fake-quant model, an engine, or bicubic.",
        epilog="Exit codes: 0 ok, 1 failure (unreadable or mismatched files), 2 usage error.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="CKPT", help="model checkpoint (.pth or .safetensors)")
    source.add_argument("--model", choices=["bicubic"], help="a reference method instead of a checkpoint")
    parser.add_argument("--calib", metavar="ARTIFACT", help="calibration artifact: evaluate the fake-quant model")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "bicubic"],
                        help="torch (PyTorch, float or fake-quant), ort (ONNX Runtime engine), openvino (OpenVINO IR), "
                        "trt (TensorRT plan) (default: from --engine's suffix, else torch)")
    parser.add_argument("--engine", metavar="ENGINE", help="engine file: .onnx/.ort (ONNX Runtime), .xml (OpenVINO), "
                        ".plan/.engine (TensorRT) (default with --backend ort/openvino: the default chain's engine)")
    parser.add_argument("--threads", type=int, help="CPU threads of the computation: the CPU engines' (ort, openvino), "
                        "torch's intra-op threads for the torch backend (default: all cores)")
    parser.add_argument("--data", metavar="ROOT", help="folder holding <Set>/HR and <Set>/LR_bicubic/X<s> (default: the "
                        "shipped Set5)")
    parser.add_argument("--sets", help="comma-separated test sets (default: Set5,Set14,B100 with --data, Set5 without)")
    parser.add_argument("--scales", help="comma-separated scales (default: the model's scale; 2,3,4 for bicubic)")
    parser.add_argument("--device", default="cpu", help="torch device for the torch backend (default: %(default)s)")
    parser.add_argument("--tile", type=int, help="tile size in LR pixels of the torch backend (default: the whole image; "
                        "an engine has its export's tile)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per model call (default: %(default)s)")
    parser.add_argument("--save-images", metavar="DIR", help="write the SR images as DIR/<set>/x<s>/<name>.png")
    add_json_argument(parser, 'the results ({"results": [...]})')
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_logging_arguments(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.backend is None:
        try:
            args.backend = engine_backend(args.engine) if args.engine else "torch"
        except ValueError as err:
            raise UsageError(f"--engine {err}") from None
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.threads is not None and args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if args.backend == "torch" and not (args.weights or args.model):
        args.weights = str(defaults.DEFAULT_WEIGHTS)
    if args.backend in ENGINE_BACKENDS and not args.engine:
        if args.backend == "trt":
            raise UsageError("--backend trt needs --engine PLAN")
        args.engine = str(defaults.existing(defaults.engine_path(defaults.MAIN_ONNX, args.backend), "--engine",
                                            f"build it with 2dq-build-engine --backend {args.backend}"))
    if args.sets is None:
        args.sets = defaults.sets_for(args.data)
    if args.data is None:
        args.data = str(defaults.DEFAULT_DATA)
    if args.backend != "torch" and (args.weights or args.model or args.calib):
        raise UsageError(f"--backend {args.backend} evaluates --engine; do not combine it with --weights/--model/--calib")
    if args.model and args.calib:
        raise UsageError("--calib applies to --weights, not to --model bicubic")
    sets = [name for name in args.sets.split(",") if name.strip()]
    scales = parse_int_list(args.scales, "--scales") if args.scales else None

    results: list[SetResult] = []
    if args.model == "bicubic":
        for scale in scales or [2, 3, 4]:
            upscaler = make_upscaler("bicubic", scale=scale)
            results += [evaluate_set(upscaler, args.data, s, scale, args.save_images, not args.no_progress) for s in sets]
    else:
        upscaler = make_upscaler(
            args.backend, weights=args.weights, calib=args.calib, engine=args.engine, device=args.device,
            tile=args.tile, overlap=args.overlap, batch=args.batch, threads=args.threads,
        )
        if scales and scales != [upscaler.scale]:
            raise UsageError(f"the model upscales x{upscaler.scale}; --scales {args.scales} asks for other scales")
        scale = upscaler.scale
        results += [evaluate_set(upscaler, args.data, s, scale, args.save_images, not args.no_progress) for s in sets]

    print(markdown_table(results))
    if args.json:
        args.json.write({"results": [r.to_dict() for r in results]})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
