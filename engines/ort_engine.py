"""ONNX Runtime engines: build an optimized QDQ model for the CPU provider, and run it on tiles.

Building (:func:`build_ort_engine`) loads the exported QDQ graph with ONNX Runtime's graph
optimizations at level ``extended`` and saves what ORT made of it
(``SessionOptions.optimized_model_filepath``): the QDQ node units are fused into integer kernels
(``MatMulIntegerToFloat``, ``QLinearMatMul``, ``QLinearConv``, ``MatMulNBits`` for blocked int4
weights, ...), so the saved engine is the integer model that runs; the linear layers' bias adds are
then moved into the integer kernels (:mod:`engines.ort_fusions`). ``extended`` rather than ``all``
because level-3 layout transforms (NCHWc) are specific to the machine; the runner applies them at
load time. The engine keeps the export's ``2dq.*`` metadata and adds ``2dq.engine.*`` entries.

Running (:class:`OrtTileRunner`) is the tile-runner contract of :mod:`toolchain.backends`.
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Optional

import numpy as np
import onnx
import torch

from export.metadata import ENGINE_PREFIX, ExportMetadata
from export.speed_passes import DEFAULT_PASSES, run_speed_passes
from toolchain.files import atomic_path, sha256_file

from .ort_fusions import fuse_matmul_bias

log = logging.getLogger(__name__)

LEVELS = ("basic", "extended", "all")
BUILD_LEVEL = "extended"
RUN_LEVEL = "all"
ORT_SUFFIX = ".ort"
#: op types (any domain) that compute on integers: what the QDQ fusions turn node units into
#: ORT graph transformers left out: MatMulAddFusion rewrites a static-shape 3-D MatMul + Add into
#: Reshape -> Gemm -> Reshape and, around Q/DQ, creates a QuantizeLinear ORT itself then rejects
#: ("output_dtype INT8 does not match y_zero_point type UINT8"); the bias Add is fused into the
#: integer MatMul by :mod:`engines.ort_fusions` instead
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "QGemm", "MatMulInteger", "ConvInteger",
               "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
               "QLinearSigmoid", "QLinearConcat", "QLinearGlobalAveragePool", "QAttention", "QLinearLeakyRelu")
#: MatMulNBits accuracy level 1: fp32 activations (the graph's semantics)
MATMULNBITS_ACCURACY_LEVEL = "1"


def _ort():
    import onnxruntime

    return onnxruntime


def _level(name: str):
    ort = _ort()
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ValueError(f"ORT optimization level must be one of {LEVELS}, got {name!r}")
    return levels[name]


def session_options(level: str, threads: Optional[int] = None):
    """``SessionOptions`` at optimization ``level`` with ``threads`` intra-op threads (None: ORT's choice)."""
    options = _ort().SessionOptions()
    options.graph_optimization_level = _level(level)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's warnings are for developers of ORT
    # blocked int4 weights fuse into MatMulNBits; ORT's default there (accuracy level 4) quantizes the
    # float activations to int8 on the fly, which the weight-only graph does not say: compute in fp32
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", MATMULNBITS_ACCURACY_LEVEL)
    return options


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """``{"[domain:]op": n}`` over the graph's nodes, most frequent first."""
    counts = collections.Counter((f"{n.domain}:" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                                 for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def integer_kernels(counts: dict[str, int]) -> dict[str, int]:
    """The entries of :func:`op_counts` that are integer kernels (:data:`INTEGER_OPS`)."""
    return {op: n for op, n in counts.items() if op.rsplit(":", 1)[-1] in INTEGER_OPS}


@dataclass
class OrtBuild:
    """What :func:`build_ort_engine` made: op counts of the QDQ graph and of the engine, its fused
    integer kernels, the Q/DQ nodes left standalone, and the build time."""

    engine: str
    source: str
    source_sha256: str
    level: str
    ort_version: str
    seconds: float
    source_ops: dict[str, int]
    engine_ops: dict[str, int]
    integer_kernels: dict[str, int]
    standalone_qdq: dict[str, int] = field(default_factory=dict)
    fused_bias_adds: int = 0
    #: exact graph passes run before the build (:mod:`export.speed_passes`) and what each changed
    graph_passes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prepared_graph(onnx_path: Path, passes: Sequence[str], folder: Path) -> tuple[Path, dict[str, int]]:
    """``onnx_path`` with the exact CPU graph ``passes`` of :mod:`export.speed_passes` applied, saved in
    ``folder`` (the export itself is left as it is), and what each pass changed; ``onnx_path`` itself when
    ``passes`` is empty. With the default passes elements are moved, never computed differently: the engine
    stays bit-identical (``quantize_before_movement``, an option, keeps OpenVINO's so, not ORT's kernels).
    """
    if not passes:
        return onnx_path, {}
    import onnx_ir as ir

    model = ir.load(str(onnx_path))
    changes = run_speed_passes(model, passes)
    prepared = folder / "prepared.onnx"
    ir.save(model, str(prepared))
    return prepared, changes


def build_ort_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, level: str = BUILD_LEVEL,
                     threads: Optional[int] = None, graph_passes: Sequence[str] = DEFAULT_PASSES) -> OrtBuild:
    """Optimize the QDQ graph ``onnx_path`` for ORT's CPU provider and save it to ``out_path``.

    ``graph_passes`` (:mod:`export.speed_passes`) run on the graph first: by default the exact ones that
    pay on a CPU (one Transpose where a chain of transposes and reshapes moved the same elements).

    ``out_path`` ending in ``.ort`` is saved in ORT format, anything else as ONNX. Raises
    ``ValueError`` if ``onnx_path`` is not a 2dq export (no ``2dq.*`` metadata).

    A tiny SwinIR x2 (random weights) calibrated, exported, built and run (:class:`OrtTileRunner`):

    >>> import tempfile, calib
    >>> from export import export_onnx
    >>> from toolchain.models.examples import tiny_swinir
    >>> tiles = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(tiny_swinir(), forward_loop=lambda m: m(tiles))
    >>> folder = tempfile.TemporaryDirectory()
    >>> onnx_path = os.path.join(folder.name, "w4a4.onnx")
    >>> _ = export_onnx(qmodel, onnx_path, tile=16)
    >>> build = build_ort_engine(onnx_path, os.path.join(folder.name, "w4a4.ort.onnx"))
    >>> build.integer_kernels
    {'com.microsoft:MatMulIntegerToFloat': 6}
    >>> runner = OrtTileRunner(os.path.join(folder.name, "w4a4.ort.onnx"))
    >>> runner.tile, runner(tiles).shape
    (16, torch.Size([4, 3, 32, 32]))
    >>> folder.cleanup()
    """
    ort = _ort()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    ExportMetadata.read(onnx_path)  # refuse files that are not 2dq exports before spending time on them
    source = onnx.load(str(onnx_path))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="2dq-ort-") as scratch:
        graph, changes = prepared_graph(onnx_path, graph_passes, Path(scratch))
        optimized = Path(scratch) / "optimized.onnx"
        options = session_options(level, threads)
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))
        engine = onnx.load(str(optimized))
    fused = fuse_matmul_bias(engine)
    seconds = time.perf_counter() - start
    counts = op_counts(engine)
    build = OrtBuild(str(out_path), str(onnx_path), sha256_file(onnx_path), level, ort.__version__, round(seconds, 3),
                     op_counts(source), counts, integer_kernels(counts),
                     {op: n for op, n in counts.items() if op in ("QuantizeLinear", "DequantizeLinear")}, fused, changes)
    _set_metadata(engine, {"source_sha256": build.source_sha256, "ort_version": build.ort_version, "level": level})
    _save(engine, out_path)
    log.info("ORT engine %s: %d nodes, integer kernels %s", out_path, sum(counts.values()), build.integer_kernels)
    return build


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(ENGINE_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.add(key=ENGINE_PREFIX + key, value=str(value))


def _save(engine: onnx.ModelProto, out_path: Path) -> None:
    with atomic_path(out_path) as tmp:
        if out_path.suffix != ORT_SUFFIX:
            onnx.save_model(engine, str(tmp))
            return
        # ORT format: let ORT serialize the (already optimized) model; loading it changes nothing more
        ort = _ort()
        with tempfile.TemporaryDirectory(prefix="2dq-ort-") as scratch:
            staged = Path(scratch) / "engine.onnx"
            onnx.save_model(engine, str(staged))
            options = session_options(BUILD_LEVEL)
            options.add_session_config_entry("session.save_model_format", "ORT")
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(DISABLED_OPTIMIZERS))


class OrtTileRunner:
    """An ORT engine (or any 2dq QDQ export) as a tile runner: ``(N, 3, T, T)`` -> ``(N, 3, sT, sT)``.

    ``tile``, ``scale`` and ``multiple`` come from the model's ``2dq.*`` metadata. ``threads``
    sets ORT's intra-op threads (None: ORT's default, all cores); ``level`` the optimizations
    applied at load (default ``all``: adds the machine-specific layout transforms).

    Example: at the end of :func:`build_ort_engine`'s.
    """

    def __init__(self, engine_path: str | os.PathLike, threads: Optional[int] = None, level: str = RUN_LEVEL) -> None:
        ort = _ort()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ORT engine not found: {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(level, threads),
                                                providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as err:  # ORT raises its own exception types for unreadable models
            raise ValueError(f"{self.path}: ONNX Runtime cannot load it: {err}") from err
        #: the raw ``metadata_props`` (the export's and the engine's ``2dq.engine.*``)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        #: the export's record, validated (``ValueError`` naming the key for a file that is no 2dq export)
        self.export = ExportMetadata.from_props(self.metadata, self.path)
        self.tile, self.scale, self.multiple = self.export.tile, self.export.scale, self.export.multiple
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input"]:
            raise ValueError(f"{self.path}: expected one input named 'input', got {names}")
        first = self.session.get_inputs()[0].shape[0]
        #: tiles per call of a static-batch export (None: any number); shorter batches are padded
        self.static_batch: Optional[int] = first if isinstance(first, int) else None
        if self.static_batch != self.export.batch:
            raise ValueError(f"{self.path}: the input takes {self.static_batch or 'any number of'} tiles per call, "
                             f"but its metadata says batch {self.export.batch or 'dynamic'}")

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, self.tile, self.tile):
            raise ValueError(f"{self.path}: expected tiles (N, 3, {self.tile}, {self.tile}), got {tuple(tiles.shape)}")
        batch = np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())
        if self.static_batch is None:
            (output,) = self.session.run(["output"], {"input": batch})
            return torch.from_numpy(output)
        return torch.from_numpy(run_in_fixed_batches(batch, self.static_batch,
                                                     lambda chunk: self.session.run(["output"], {"input": chunk})[0]))


def run_in_fixed_batches(tiles: np.ndarray, batch: int, run) -> np.ndarray:
    """``run`` (a graph compiled for exactly ``batch`` tiles) over any number of ``tiles`` ``(N, 3, T, T)``:
    in chunks of ``batch``, the last padded with zero tiles whose outputs are dropped."""
    outputs = []
    for start in range(0, tiles.shape[0], batch):
        chunk = tiles[start:start + batch]
        count = chunk.shape[0]
        if count < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(run(chunk))[:count])
    return np.concatenate(outputs)
