"""``2dq-upscale``: upscale one image of any size with an engine (or a checkpoint), tile by tile.

Examples::

    2dq-upscale photo.png --engine w4a4.ort.onnx --out photo_x4.png
    2dq-upscale photo.png --engine w4a4.plan --out photo_x4.png --batch 8
    2dq-upscale photo.png --engine w4a4.ov.xml --threads 2
    2dq-upscale photo.png --weights x4.pth --calib w4a4.safetensors --tile 64 --out photo_fq.png

The backend follows the engine's suffix: ``.plan`` / ``.engine`` -> TensorRT, ``.onnx`` / ``.ort`` ->
ONNX Runtime, ``.xml`` -> OpenVINO; without ``--engine``, ``--weights`` runs PyTorch (the fake-quant model with
``--calib``). Engines run fixed-size tiles (their export's tile); the image is mirror-padded, cut
into overlapping tiles, and the outputs are blended (:mod:`toolchain.inference`).

The output keeps what the input has (:mod:`toolchain.data.image_modes`): the model runs on RGB, an
alpha plane is upscaled apart (bicubic) and re-attached, grayscale is written as one channel
(``--color`` for RGB), 16-bit samples stay 16-bit. An ``--out`` format that cannot store that is
refused before anything runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from toolchain import defaults
from toolchain.cli.common import EXIT_OK, UsageError, add_logging_arguments, run_cli
from toolchain.data.image_modes import Layout, probe_layout, read_planes, storage_problem, upscale_alpha, write_planes

from . import upscalers

log = logging.getLogger(__name__)


def engine_backend(path: str) -> str:
    """The backend of an engine file from its suffix (:func:`engines.upscalers.engine_backend`); a usage error
    naming ``--engine`` for an unknown suffix."""
    try:
        return upscalers.engine_backend(path)
    except ValueError as err:
        raise UsageError(f"--engine {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-upscale",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Super-resolve one image of any size with a 2dq engine (ONNX Runtime or TensorRT) or a "
        "checkpoint, through overlapping tiles.",
        epilog="The output keeps what the input has: alpha (upscaled bicubic beside the model's RGB), 16-bit "
        "samples (PNG; TIFF for plain grayscale) and grayscale (one channel, the mean of the model's RGB "
        "output). Palette images are converted to RGB, or RGBA when they have transparency. An --out "
        "format that cannot store the input's alpha or 16 bits (JPEG, BMP) is a usage error. "
        "Exit codes: 0 ok, 1 failure (unreadable files, engine errors), 2 usage error.",
    )
    parser.add_argument("image", metavar="IMAGE", help="LR image (PNG, BMP, JPEG, TIFF; gray or colour, alpha, "
                        "8 or 16 bits)")
    parser.add_argument("--out", metavar="OUT.png",
                        help="SR image to write, atomically (format from the suffix: .png .tif .bmp .jpg; "
                        "it must store the input's alpha and bit depth: .png stores all; default: "
                        "IMAGE's folder and name with _x<scale>.png)")
    parser.add_argument("--color", action="store_true",
                        help="write a grayscale input's output as RGB (default: grayscale stays one channel)")
    parser.add_argument("--engine", metavar="ENGINE", help="engine: .onnx/.ort (ONNX Runtime), .xml (OpenVINO IR) or "
                        ".plan/.engine (TensorRT) "
                        "(default without --weights: runs/dat_light_x4_w4a4.ort.onnx, what 2dq-build-engine builds "
                        "by default)")
    parser.add_argument("--weights", metavar="CKPT", help="run this checkpoint in PyTorch instead of an engine")
    parser.add_argument("--calib", metavar="ARTIFACT", help="with --weights: run the fake-quant model of this artifact")
    parser.add_argument("--tile", type=int, help="with --weights: tile size in LR pixels (default: the whole image at "
                        "once; an engine has its export's tile)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per model call (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device; TensorRT uses cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads of the computation: the CPU engines' (ort, openvino), "
                        "torch's intra-op threads with --weights (default: all cores)")
    add_logging_arguments(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.engine and args.weights:
        raise UsageError("give exactly one of --engine ENGINE or --weights CKPT")
    if not args.engine and not args.weights:
        args.engine = str(defaults.existing(defaults.MAIN_ENGINE,
                                            "--engine", "build it with 2dq-build-engine, or pass --weights"))
    if args.calib and not args.weights:
        raise UsageError("--calib goes with --weights")
    if args.engine and args.tile:
        raise UsageError("an engine has a fixed tile (its export's); --tile applies to --weights")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    backend = engine_backend(args.engine) if args.engine else "torch"
    if args.threads is not None and backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    layout = output_layout(probe_layout(args.image), color=args.color)  # header only: refuse before any work
    problem = storage_problem(args.out, layout) if args.out else None  # the default, .png, stores everything
    if problem:
        raise UsageError(f"--out {args.out}: {problem}")
    planes = read_planes(args.image)
    upscaler = upscalers.make_upscaler(backend, weights=args.weights, calib=args.calib, engine=args.engine,
                                       device=args.device, tile=args.tile, overlap=args.overlap, batch=args.batch,
                                       threads=args.threads)
    start = time.perf_counter()
    sr = upscaler.upscale(planes.rgb)
    alpha = None if planes.alpha is None else upscale_alpha(planes.alpha, upscaler.scale)
    seconds = time.perf_counter() - start
    if not args.out:
        image = Path(args.image)
        args.out = str(image.with_name(f"{image.stem}_x{upscaler.scale}.png"))
    write_planes(args.out, sr, alpha, layout)
    _log_kept(planes.layout, layout)
    height, width = planes.rgb.shape[:2]
    print(f"{args.image} {width}x{height} -> {args.out} {sr.shape[1]}x{sr.shape[0]} "
          f"(x{upscaler.scale}, {backend}, {seconds:.2f} s)")
    return EXIT_OK


def output_layout(layout: Layout, color: bool) -> Layout:
    """The output's layout: the input's, made RGB by ``--color``."""
    return dataclasses.replace(layout, gray=False) if color else layout


def _log_kept(source: Layout, written: Layout) -> None:
    if written.alpha:
        log.info("kept alpha (upscaled bicubic, apart from the model)")
    if written.bits == 16:
        log.info("16-bit output")
    if written.gray:
        log.info("kept grayscale (one channel: the mean of the model's RGB output)")
    elif source.gray:
        log.info("grayscale input written as RGB (--color)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
