"""The ``2dq-build-engine --backend trt`` flags, and the one place they become a :class:`TrtBuildOptions`.

The library (:func:`engines.trt.builder.build_engine`, :func:`engines.trt.builder.run_trt_build`)
takes the frozen :class:`~engines.trt.builder.TrtBuildOptions` only; :func:`trt_options_from_args`
is the only reader of these flags. Imports without TensorRT.
"""
from __future__ import annotations

import argparse

from toolchain.cli.common import UsageError

from .builder import MAX_OPT_LEVEL, PRECISIONS, TrtBuildOptions

#: TrtBuildOptions field -> (flag, argparse dest): the flags' dests are prefixed ``trt_`` so they do not
#: collide with the ORT and verification options of the same command
FLAGS = {
    "precision": ("--precision", "trt_precision"),
    "tile": ("--tile", "trt_tile"),
    "max_batch": ("--max-batch", "trt_max_batch"),
    "opt_batch": ("--opt-batch", "trt_opt_batch"),
    "timing_cache": ("--timing-cache", "trt_timing_cache"),
    "workspace_mb": ("--workspace-mb", "trt_workspace_mb"),
    "builder_optimization_level": ("--builder-opt-level", "trt_opt_level"),
}


def add_trt_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TensorRT build options to ``2dq-build-engine`` (dests: :data:`FLAGS`)."""
    defaults = TrtBuildOptions()
    group = parser.add_argument_group("TensorRT build (--backend trt)")
    group.add_argument(
        "--precision",
        dest="trt_precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="int8: the trt-int8 QDQ export; int4: the trt-int4 export (INT4 weights, fp16 "
        "activations); fp16: a float16 float graph (default: int8)",
    )
    group.add_argument(
        "--tile", dest="trt_tile", type=int, default=defaults.tile,
        help="input tile size T (default: the ONNX model's own tile)",
    )
    group.add_argument(
        "--max-batch",
        dest="trt_max_batch",
        type=int,
        default=defaults.max_batch,
        help="most tiles per engine call; larger batches are split (default: 8)",
    )
    group.add_argument(
        "--opt-batch",
        dest="trt_opt_batch",
        type=int,
        default=defaults.opt_batch,
        help="batch size TensorRT tunes kernels for (default: --max-batch)",
    )
    group.add_argument(
        "--timing-cache",
        dest="trt_timing_cache",
        default=defaults.timing_cache,
        help="timing cache file: loaded if it exists, saved after the build",
    )
    group.add_argument(
        "--workspace-mb",
        dest="trt_workspace_mb",
        type=int,
        default=defaults.workspace_mb,
        help="builder workspace memory pool in MiB (default: 4096)",
    )
    group.add_argument(
        "--builder-opt-level",
        dest="trt_opt_level",
        type=int,
        default=defaults.builder_optimization_level,
        help=f"builder optimization level 0..{MAX_OPT_LEVEL} (default: 3)",
    )


def trt_options_from_args(args: argparse.Namespace) -> TrtBuildOptions:
    """The :class:`TrtBuildOptions` of the parsed flags; a :class:`UsageError` naming the flag when one is invalid.

    >>> parser = argparse.ArgumentParser()
    >>> add_trt_arguments(parser)
    >>> trt_options_from_args(parser.parse_args(["--max-batch", "16", "--opt-batch", "4"])).batch_profile
    {'min_batch': 1, 'opt_batch': 4, 'max_batch': 16}
    >>> trt_options_from_args(parser.parse_args(["--max-batch", "0"]))
    Traceback (most recent call last):
    toolchain.cli.common.UsageError: --max-batch: max_batch must be >= 1, got 0
    """
    try:
        return TrtBuildOptions(**{field: getattr(args, dest) for field, (_, dest) in FLAGS.items()})
    except ValueError as err:
        message = str(err)
        flag = next((flag for field, (flag, _) in FLAGS.items() if message.startswith(field + " ")), None)
        raise UsageError(f"{flag}: {message}" if flag else message) from None
