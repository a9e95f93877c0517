"""Build an explicitly quantized TensorRT plan from the exported QDQ ONNX graph.

``build_engine(onnx, plan, TrtBuildOptions(...))`` parses the ONNX model, builds a plan with one
optimization profile over the batch of tiles (min 1 / opt / max, fixed ``(3, T, T)`` tile), writes it
atomically with its ``<plan>.json`` sidecar (:mod:`engines.trt.sidecar`) and keeps a timing cache.
The frozen :class:`TrtBuildOptions` is the whole build config; the command-line flags become one in
:mod:`engines.trt.cli_args`.

Typing mode, decided by the pure function :func:`build_mode` from ``tensorrt.__version__``:

- TensorRT >= 10.12: a *strongly typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) and
  no precision builder flags. Q/DQ nodes fix where INT8/INT4 run; float layers run in the graph's own
  dtype, so an fp16 float body needs the fp16 export. Weak typing was deprecated in 10.12.
- TensorRT 11: strongly typed always (the flag is deprecated and ignored; ``BuilderFlag.INT8``/``FP16``
  are removed), so the network is created without flags.
- TensorRT 10.0 - 10.11: the flag path: ``BuilderFlag.INT8`` for Q/DQ graphs, plus ``FP16`` when the
  float graph is fp16 (and for the trt-int4 export, whose activations are fp16).

``int4`` builds the ``trt-int4`` export: INT4 block-quantized weights feeding ``DequantizeLinear``,
fp16 activations (TensorRT's INT4 is weight-only).

Nothing here imports ``tensorrt`` at module level: ``import engines.trt.builder`` works anywhere and
:func:`build_engine` raises :class:`TensorRTUnavailable` when the package is missing.

Written against the TensorRT Python API 10.x (10.0-10.16) and 11.x documentation; NOT run against a real
TensorRT here (none is installable in this environment). Doc pages used:

- Python API, Builder / NetworkDefinitionCreationFlag (10.x: EXPLICIT_BATCH deprecated, STRONGLY_TYPED;
  11.0: STRONGLY_TYPED deprecated, always on):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html,
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html
- Python API index (IBuilderConfig: set_memory_pool_limit, create_timing_cache, set_timing_cache,
  get_timing_cache, add_optimization_profile; Builder.build_serialized_network):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html
- ITimingCache.serialize / combine:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
- Onnx Parser (parse_from_file, num_errors, get_error; ParserError code/desc/node):
  https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-861/api/python_api/parsers/Onnx/pyOnnx.html
  and IParserError (nodeName/nodeOperator, 10.x):
  https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvonnxparser_1_1_i_parser_error.html
- Explicit Quantization ("use explicit quantization with strong typing; precision build flags are not
  required"): https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
- Working with Quantized Types (INT4 is weight-only):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html
- TensorRT 10.12.0 release notes (weak typing APIs deprecated):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/release-notes-10/10.12.0.html
- Removed Python APIs in 11.x (BuilderFlag.FP16/INT8/INT4 ... removed):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolchain.files import atomic_path, sha256_file

from .sidecar import OnnxInfo, current_gpu, make_sidecar, read_onnx_info, resolve_tile, write_sidecar

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install '2dq[trt]'"
PRECISIONS = ("int8", "int4", "fp16")
#: first TensorRT release whose weak-typing APIs are deprecated: from here on build strongly typed
STRONG_TYPING_FROM = (10, 12)
MIN_TENSORRT = (10, 0)
MAX_OPT_LEVEL = 5


class TensorRTUnavailable(ImportError):
    """The ``tensorrt`` Python package cannot be imported."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build a plan from it."""


def import_tensorrt() -> Any:
    """``import tensorrt``, or a :class:`TensorRTUnavailable` that says how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"the TensorRT Python package is not installed ({exc}). Install it with `{INSTALL_HINT}` "
            "on a machine with an NVIDIA GPU and driver (it brings tensorrt and pycuda)."
        ) from exc
    return tensorrt


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"10.12.0.36"`` -> ``(10, 12, 0)``; suffixes such as ``.post1`` or ``b2`` are ignored."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not match:
        raise ValueError(f"cannot parse TensorRT version {version!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


@dataclass(frozen=True)
class BuildMode:
    """How to ask TensorRT for the precisions of an explicitly quantized graph.

    ``network_flag``: name of the ``NetworkDefinitionCreationFlag`` to set (or ``None``);
    ``builder_flags``: names of ``BuilderFlag`` members to set (empty when strongly typed).
    """

    strongly_typed: bool
    network_flag: str | None
    builder_flags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "strongly_typed": self.strongly_typed,
            "network_flag": self.network_flag,
            "builder_flags": list(self.builder_flags),
        }


def build_mode(trt_version: str, precision: str, float_dtype: str) -> BuildMode:
    """Strongly typed network or builder flags, for TensorRT ``trt_version`` (pure; see module doc).

    ``float_dtype`` is the dtype of the graph's float layers (``"float32"`` or ``"float16"``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if float_dtype not in ("float32", "float16"):
        raise ValueError(f"float_dtype must be float32 or float16, got {float_dtype!r}")
    version = parse_trt_version(trt_version)
    if version[:2] < MIN_TENSORRT:
        raise EngineBuildError(f"TensorRT {trt_version} is too old: 2dq needs TensorRT >= 10.0")
    if version[:2] >= STRONG_TYPING_FROM:
        if precision == "fp16" and float_dtype != "float16":
            raise EngineBuildError(
                "precision fp16 on a strongly typed TensorRT runs float layers in the graph's dtype, and "
                "this ONNX graph is float32: export the fp16 float graph (the fp16 option of 2dq-export)"
            )
        flag = "STRONGLY_TYPED" if version[0] < 11 else None  # 11: always strongly typed, flag ignored
        return BuildMode(True, flag, ())
    flags = {"int8": ("INT8",), "int4": ("INT8", "FP16"), "fp16": ("FP16",)}[precision]
    if precision == "int8" and float_dtype == "float16":
        flags = ("INT8", "FP16")
    return BuildMode(False, None, flags)


def check_precision(info: OnnxInfo, precision: str) -> None:
    """Refuse a precision the ONNX graph was not exported for (reasons name the file and the fix)."""
    if info.target is not None:
        expected = {"int8": ("trt-int8", "ort"), "int4": ("trt-int4",), "fp16": ()}[precision]
        if expected and info.target not in expected:
            raise EngineBuildError(f"{info.path} was exported for target {info.target!r}, not for TensorRT {precision}")
    if precision in ("int8", "int4") and info.qdq_nodes == 0:
        raise EngineBuildError(f"{info.path} has no Q/DQ nodes; export it with `2dq-export --target trt-{precision}`")
    if precision == "int4" and info.int4_initializers == 0:
        raise EngineBuildError(f"{info.path} has no INT4 weights; the int4 build needs the trt-int4 export")
    if precision == "int8" and info.int4_initializers:
        raise EngineBuildError(f"{info.path} holds INT4 weights (trt-int4 export); build it with precision int4")


@dataclass(frozen=True)
class TrtBuildOptions:
    """Knobs of one plan build (frozen; every field is checked on construction, errors name the field).

    ``tile``: input tile size ``T`` (default: the ONNX model's own); ``max_batch``/``opt_batch``: the
    optimization profile over the number of tiles per call (min is 1, opt defaults to max);
    ``timing_cache``: file loaded when present and saved back after the build; ``workspace_mb``: the
    builder workspace pool; ``builder_optimization_level``: 0..5 (TensorRT's default is 3).
    """

    precision: str = "int8"
    tile: int | None = None
    max_batch: int = 8
    opt_batch: int | None = None
    timing_cache: str | None = None
    workspace_mb: int = 4096
    builder_optimization_level: int = 3

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tile is not None and self.tile <= 0:
            raise ValueError(f"tile must be positive, got {self.tile}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"opt_batch must be in [1, max_batch={self.max_batch}], got {self.opt_batch}")
        if self.workspace_mb <= 0:
            raise ValueError(f"workspace_mb must be positive, got {self.workspace_mb}")
        if not 0 <= self.builder_optimization_level <= MAX_OPT_LEVEL:
            raise ValueError(
                f"builder_optimization_level must be in [0, {MAX_OPT_LEVEL}], got {self.builder_optimization_level}"
            )

    @property
    def batch_profile(self) -> dict[str, int]:
        return {"min_batch": 1, "opt_batch": self.opt_batch or self.max_batch, "max_batch": self.max_batch}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParserErrorInfo:
    """One ONNX parser error, with the failing node resolved to its name and op type."""

    node_index: int
    node_name: str
    op_type: str
    code: str
    description: str


def format_parser_errors(onnx_path: str, errors: list[ParserErrorInfo]) -> str:
    lines = [f"TensorRT could not parse {onnx_path}:"]
    for err in errors:
        where = f"node {err.node_index} {err.node_name!r} ({err.op_type})" if err.node_index >= 0 else "graph"
        lines.append(f"  {where}: {err.code}: {err.description}")
    return "\n".join(lines)


def trt_severity_level(severity_name: str) -> int:
    """TensorRT log severity name -> ``logging`` level (TensorRT INFO is chatty: it goes to DEBUG)."""
    return {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}.get(
        severity_name, logging.DEBUG
    )


def make_trt_logger(trt: Any, name: str = __name__) -> Any:
    """A ``trt.ILogger`` forwarding to ``logging``; it keeps its last errors in ``.errors``."""
    target = logging.getLogger(name)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=20)

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT; must not raise
            level = trt_severity_level(getattr(severity, "name", str(severity)))
            if level >= logging.ERROR:
                self.errors.append(msg)
            target.log(level, "[TensorRT] %s", msg)

    return _Logger()


def _parser_errors(parser: Any, info: OnnxInfo) -> list[ParserErrorInfo]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index = int(err.node())
        name, op = info.nodes[index] if 0 <= index < len(info.nodes) else ("", "")
        # node_name()/node_operator() exist in the 10.x bindings; fall back to the ONNX graph itself
        name = (err.node_name() if hasattr(err, "node_name") else "") or name
        op = (err.node_operator() if hasattr(err, "node_operator") else "") or op
        errors.append(ParserErrorInfo(index, name, op, str(err.code()), err.desc()))
    return errors


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if data:
        log.info("loading timing cache %s (%d bytes)", path, len(data))
    try:
        cache = config.create_timing_cache(data)
    except Exception as exc:  # a corrupt or foreign cache must not stop the build; it is rewritten after
        log.warning("cannot read timing cache %s (%s); starting an empty one", path, exc)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


@dataclass(frozen=True)
class BuildResult:
    plan: Path
    sidecar: Path
    mode: BuildMode
    seconds: float


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, options: TrtBuildOptions) -> BuildResult:
    """Build ``plan_path`` (and ``<plan>.json``) from the QDQ ONNX model at ``onnx_path``.

    Input ``input`` (N, 3, T, T) -> output ``output`` (N, 3, sT, sT); the plan accepts 1..max_batch
    tiles. Raises :class:`TensorRTUnavailable` without TensorRT, :class:`EngineBuildError` when parsing
    (with the failing node's name, op and description) or building fails.

    Example (needs TensorRT and a CUDA GPU, so the doctests do not run it)::

        build_engine("swinir_x2_w4a4.onnx", "swinir_x2_w4a4.plan", TrtBuildOptions(max_batch=8))
    """
    if not isinstance(options, TrtBuildOptions):  # e.g. parsed flags: engines.trt.cli_args.trt_options_from_args
        raise TypeError(f"build_engine: options must be a TrtBuildOptions, got {type(options).__name__}")
    trt = import_tensorrt()
    info = read_onnx_info(onnx_path)
    check_precision(info, options.precision)
    mode = build_mode(trt.__version__, options.precision, info.float_dtype)
    tile, scale = resolve_tile(info, options.tile)
    profile = options.batch_profile
    log.info(
        "building %s plan from %s with TensorRT %s (%s)",
        options.precision,
        onnx_path,
        trt.__version__,
        "strongly typed" if mode.strongly_typed else "flags " + "+".join(mode.builder_flags),
    )

    logger = make_trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(getattr(trt.NetworkDefinitionCreationFlag, mode.network_flag)) if mode.network_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse) lets the parser find weights stored beside the model file
    parsed = parser.parse_from_file(str(onnx_path))
    if not parsed or parser.num_errors:
        raise EngineBuildError(format_parser_errors(str(onnx_path), _parser_errors(parser, info)))
    seen = [network.get_input(i).name for i in range(network.num_inputs)]
    if seen != [info.input_name]:
        raise EngineBuildError(f"{onnx_path}: TensorRT sees inputs {seen}, expected [{info.input_name!r}]")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.builder_optimization_level
    # DETAILED keeps layer precisions/formats in the plan for trtexec --exportLayerInfo (2dq-profile)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    opt_profile = builder.create_optimization_profile()
    shape = lambda n: (n, 3, tile, tile)  # noqa: E731
    opt_profile.set_shape(
        info.input_name, shape(profile["min_batch"]), shape(profile["opt_batch"]), shape(profile["max_batch"])
    )
    config.add_optimization_profile(opt_profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    _load_timing_cache(config, cache_path)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        detail = "\n  ".join(logger.errors) or "see the TensorRT log above"
        raise EngineBuildError(f"TensorRT could not build a plan from {onnx_path}:\n  {detail}")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    io_dtypes = {"input": info.input_dtype, "output": info.output_dtype}
    record = make_sidecar(
        info,
        plan_sha256=sha256_file(plan_path),
        tensorrt_version=trt.__version__,
        gpu=current_gpu(),
        precision=options.precision,
        build_mode=mode.to_dict(),
        build_options=options.to_dict(),
        tile=tile,
        scale=scale,
        profile=profile,
        io_dtypes=io_dtypes,
    )
    sidecar = write_sidecar(plan_path, record)
    log.info("wrote %s (%.1f s) and %s", plan_path, seconds, sidecar)
    return BuildResult(Path(plan_path), sidecar, mode, seconds)


def run_trt_build(options: TrtBuildOptions, onnx_path: str | os.PathLike, plan_path: str | os.PathLike) -> BuildResult:
    """What ``2dq-build-engine --backend trt`` runs: :func:`build_engine` with the options its flags describe
    (:func:`engines.trt.cli_args.trt_options_from_args`)."""
    return build_engine(onnx_path, plan_path, options)
