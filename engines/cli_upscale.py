"""``2dq-upscale``: upscale one image of any size with an engine (or a checkpoint), tile by tile.

Examples::

    2dq-upscale photo.png --engine w4a4.ort.onnx --out photo_x4.png
    2dq-upscale photo.png --engine w4a4.plan --out photo_x4.png --batch 8
    2dq-upscale photo.png --weights x4.pth --calib w4a4.safetensors --tile 64 --out photo_fq.png

The backend follows the engine's suffix: ``.plan`` / ``.engine`` -> TensorRT, ``.onnx`` / ``.ort`` ->
ONNX Runtime; without ``--engine``, ``--weights`` runs PyTorch (the fake-quant model with
``--calib``). Engines run fixed-size tiles (their export's tile); the image is mirror-padded, cut
into overlapping tiles, and the outputs are blended (:mod:`toolchain.inference`).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from toolchain.backends import make_upscaler
from toolchain.cli.common import EXIT_OK, UsageError, add_logging_arguments, run_cli
from toolchain.data.io import read_image, write_image

ENGINE_BACKENDS = {".plan": "trt", ".engine": "trt", ".onnx": "ort", ".ort": "ort"}


def engine_backend(path: str) -> str:
    """``"trt"`` or ``"ort"`` from an engine file's suffix."""
    backend = ENGINE_BACKENDS.get(Path(path).suffix.lower())
    if backend is None:
        raise UsageError(f"--engine {path}: unknown engine suffix; expected one of {', '.join(ENGINE_BACKENDS)}")
    return backend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-upscale",
        description="Super-resolve one image of any size with a 2dq engine (ONNX Runtime or TensorRT) or a "
        "checkpoint, through overlapping tiles.",
        epilog="Exit codes: 0 ok, 1 failure (unreadable files, engine errors), 2 usage error.",
    )
    parser.add_argument("image", metavar="IMAGE", help="LR image (PNG, BMP, JPEG, TIFF)")
    parser.add_argument("--out", required=True, metavar="OUT.png", help="SR image to write (format from the suffix)")
    parser.add_argument("--engine", metavar="ENGINE", help="engine: .onnx/.ort (ONNX Runtime) or .plan/.engine (TensorRT)")
    parser.add_argument("--weights", metavar="CKPT", help="run this checkpoint in PyTorch instead of an engine")
    parser.add_argument("--calib", metavar="ARTIFACT", help="with --weights: run the fake-quant model of this artifact")
    parser.add_argument("--tile", type=int, help="with --weights: tile size (default: the whole image at once)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per backend call (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device; TensorRT uses cuda (default: %(default)s)")
    add_logging_arguments(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    if bool(args.engine) == bool(args.weights):
        raise UsageError("give exactly one of --engine ENGINE or --weights CKPT")
    if args.calib and not args.weights:
        raise UsageError("--calib goes with --weights")
    if args.engine and args.tile:
        raise UsageError("an engine has a fixed tile (its export's); --tile applies to --weights")
    backend = engine_backend(args.engine) if args.engine else "torch"
    lr = read_image(args.image)
    upscaler = make_upscaler(backend, weights=args.weights, calib=args.calib, engine=args.engine, device=args.device,
                             tile=args.tile, overlap=args.overlap, batch=args.batch)
    start = time.perf_counter()
    sr = upscaler.upscale(lr)
    seconds = time.perf_counter() - start
    write_image(args.out, sr)
    print(f"{args.image} {lr.shape[1]}x{lr.shape[0]} -> {args.out} {sr.shape[1]}x{sr.shape[0]} "
          f"(x{upscaler.scale}, {backend}, {seconds:.2f} s)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
