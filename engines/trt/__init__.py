"""TensorRT engines for 2dq: build explicitly quantized plans from the QDQ ONNX export, run them on
tiles, profile them with trtexec and cross-check them against ONNX Runtime.

- :mod:`.builder`: :func:`build_engine` / :class:`TrtBuildOptions` (strongly typed on TensorRT
  >= 10.12 and 11, builder flags on older 10.x).
- :mod:`.cli_args`: the ``2dq-build-engine --backend trt`` flags and :func:`trt_options_from_args`.
- :mod:`.sidecar`: the ``<plan>.json`` metadata and the checks that refuse a foreign plan.
- :mod:`.runner`: :class:`TrtTileRunner`, the tile runner behind ``--backend trt``.
- :mod:`.trtexec`: trtexec command lines and parsing of its output (used by ``2dq-profile``).
- :mod:`.verify`: Polygraphy TensorRT-vs-ONNX-Runtime comparison.

Every module imports without ``tensorrt``/``pycuda``; they are imported when a plan is built or run.
Written against the TensorRT 10.x/11.x documentation; see each module for the pages used.
"""

from .builder import (
    BuildMode,
    EngineBuildError,
    TensorRTUnavailable,
    TrtBuildOptions,
    build_engine,
    build_mode,
    run_trt_build,
)
from .cli_args import add_trt_arguments, trt_options_from_args
from .sidecar import PlanMismatchError, check_plan, read_sidecar

__all__ = [
    "BuildMode",
    "EngineBuildError",
    "PlanMismatchError",
    "TensorRTUnavailable",
    "TrtBuildOptions",
    "add_trt_arguments",
    "build_engine",
    "build_mode",
    "check_plan",
    "read_sidecar",
    "run_trt_build",
    "trt_options_from_args",
]
