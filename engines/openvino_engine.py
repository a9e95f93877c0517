"""OpenVINO engines: convert a 2dq QDQ export to OpenVINO IR, and run it on tiles with the CPU plugin.

Building (:func:`build_openvino_engine`) converts the exported QDQ graph with ``openvino.convert_model``
and saves the IR (``.xml`` graph + ``.bin`` weights) with float weights kept in fp32
(``compress_to_fp16=False``: the default would round every float weight to fp16, which the reference
does not). The export's ``2dq.*`` metadata travels in the IR's ``rt_info`` (``framework`` section,
where the ONNX frontend puts ``metadata_props``); the build adds ``2dq.engine.*`` provenance. The
CPU plugin's low-precision transformations turn each QuantizeLinear/DequantizeLinear pair into int8
convolutions and fully connected layers when the graph is compiled; the build compiles it once to
report how many layers run in int8 (:attr:`OpenVinoBuild.int8_layers`).

Running (:class:`OpenVinoTileRunner`) follows the tile-runner contract of :mod:`toolchain.backends`.
Two settings keep the engine on the reference's arithmetic: ``INFERENCE_PRECISION_HINT=f32`` (the
CPU plugin otherwise runs float layers in bf16 on CPUs that have it; ``float_precision="bf16"`` asks for
that, an option that changes the model: the IR records it and every runner compiles with it) and a static batch of tiles
(the plugin's ShuffleChannelsFusion fails on the window reshapes of a dynamic batch: "Cannot get
length of dynamic dimension"); shorter batches are padded with zero tiles.
"""
from __future__ import annotations

import collections
import logging
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from export.metadata import ENGINE_PREFIX, KEY_PREFIX, ExportMetadata
from export.speed_passes import DEFAULT_PASSES
from toolchain.extras import import_extra
from toolchain.files import sha256_file

from .ort_engine import prepared_graph, run_in_fixed_batches

log = logging.getLogger(__name__)

IR_SUFFIX = ".xml"
DEVICE = "CPU"
#: float layers run in fp32 as the reference does (bf16 is the CPU plugin's default where the CPU has it)
PRECISION = "f32"
#: what the float layers may run in: ``f32`` (the reference's arithmetic) or ``bf16`` (an option that changes the
#: model: 8-bit mantissas between the int8 kernels; verified against the same criterion, which it may fail)
FLOAT_PRECISIONS = ("f32", "bf16")
#: the IR's ``rt_info`` entry holding the float precision its runners compile with
PRECISION_KEY = ENGINE_PREFIX + "float_precision"
#: tiles per call when the export's batch is dynamic (the compiled model's batch is static)
DEFAULT_BATCH = 4
#: the ``rt_info`` section the ONNX frontend stores ``metadata_props`` in
RT_SECTION = "framework"


def _ov() -> Any:
    return import_extra("openvino", "openvino", "the OpenVINO backend")


@dataclass
class OpenVinoBuild:
    """What :func:`build_openvino_engine` made: the IR files, its source and what the CPU plugin runs."""

    engine: str
    weights: str
    source: str
    source_sha256: str
    openvino_version: str
    seconds: float
    #: runtime layer types of the compiled model (``{"FullyConnected": 72, ...}``)
    layers: dict[str, int]
    #: runtime layers whose precision is int8/uint8 (the integer work the plugin found)
    int8_layers: dict[str, int]
    #: exact graph passes run before the conversion (:mod:`export.speed_passes`) and what each changed
    graph_passes: dict[str, int] = dataclasses.field(default_factory=dict)
    #: what the float layers run in (:data:`FLOAT_PRECISIONS`)
    float_precision: str = PRECISION

    def to_dict(self) -> dict:
        return asdict(self)


def ir_weights(xml_path: str | os.PathLike) -> Path:
    """The ``.bin`` file beside an IR ``.xml`` (OpenVINO finds it by the same stem)."""
    return Path(xml_path).with_suffix(".bin")


def build_openvino_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                          threads: Optional[int] = None, graph_passes: Sequence[str] = DEFAULT_PASSES,
                          float_precision: str = PRECISION) -> OpenVinoBuild:
    """Convert the QDQ graph ``onnx_path`` to OpenVINO IR at ``out_path`` (``.xml``; ``.bin`` beside it),
    after the exact CPU ``graph_passes`` (:func:`engines.ort_engine.prepared_graph`; DAT-light x4 W8A8 at one
    thread: 1.3x faster, bit-identical, ``benchmarks/cpu_speed.md``). ``float_precision`` (``f32``, or
    ``bf16``: an option that changes the model, ``benchmarks/cpu_speed.md``) is stored in the IR, so every
    runner of the engine compiles its float layers in it.

    Raises ``ValueError`` if ``onnx_path`` is not a 2dq export, ``out_path`` does not end in ``.xml`` or
    ``float_precision`` is not one of :data:`FLOAT_PRECISIONS`.
    Both files are written under temporary names and renamed when complete (weights first, so a
    complete ``.xml`` always has its weights).

    A tiny SwinIR x2 (random weights) calibrated, exported, built and run (:class:`OpenVinoTileRunner`):

    >>> import tempfile, calib
    >>> from export import export_onnx
    >>> from toolchain.models.examples import tiny_swinir
    >>> tiles = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(tiny_swinir(), forward_loop=lambda m: m(tiles))
    >>> folder = tempfile.TemporaryDirectory()
    >>> onnx_path = os.path.join(folder.name, "w4a4.onnx")
    >>> _ = export_onnx(qmodel, onnx_path, tile=16)
    >>> build = build_openvino_engine(onnx_path, os.path.join(folder.name, "w4a4.xml"))
    >>> build.int8_layers["FullyConnected"]  # qkv, proj, fc1, fc2: every linear in int8
    4
    >>> runner = OpenVinoTileRunner(build.engine, batch=2)
    >>> runner.tile, runner(tiles).shape
    (16, torch.Size([4, 3, 32, 32]))
    >>> folder.cleanup()
    """
    ov = _ov()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if out_path.suffix != IR_SUFFIX:
        raise ValueError(f"{out_path}: an OpenVINO engine is IR: name it <name>{IR_SUFFIX} (weights go to "
                         f"{ir_weights(out_path).name})")
    _check_precision(float_precision, out_path)
    export = ExportMetadata.read(onnx_path)  # refuse files that are not 2dq exports before converting
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="2dq-ov-") as scratch:
        graph, changes = prepared_graph(onnx_path, graph_passes, Path(scratch))
        model = ov.convert_model(str(graph))  # the converter may read the file later: keep it until saved
        source_sha256 = sha256_file(onnx_path)
        for name, value in {"source_sha256": source_sha256, "openvino_version": ov.get_version(),
                            "float_precision": float_precision}.items():
            model.set_rt_info(str(value), [RT_SECTION, ENGINE_PREFIX + name])
        compiled = _compile(ov, _static(model, export, DEFAULT_BATCH), threads, precision=float_precision)
        layers, int8 = runtime_layers(compiled)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        stage = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp{IR_SUFFIX}")
        try:
            ov.save_model(model, str(stage), compress_to_fp16=False)
            os.replace(ir_weights(stage), ir_weights(out_path))
            os.replace(stage, out_path)
        finally:
            for leftover in (stage, ir_weights(stage)):
                leftover.unlink(missing_ok=True)
    build = OpenVinoBuild(str(out_path), str(ir_weights(out_path)), str(onnx_path), source_sha256, ov.get_version(),
                          round(time.perf_counter() - start, 3), layers, int8, changes, float_precision)
    log.info("OpenVINO engine %s: int8 layers %s", out_path, int8)
    return build


def runtime_layers(compiled: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Layer types of a compiled model's runtime graph, and those of them running in int8/uint8."""
    layers: collections.Counter = collections.Counter()
    int8: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Const", "Parameter", "Result"):
            continue
        layers[kind] += 1
        if info["runtimePrecision"].astype(str) in ("i8", "u8"):
            int8[kind] += 1
    ordered = lambda counts: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))  # noqa: E731
    return ordered(layers), ordered(int8)


def _props(model: Any) -> dict[str, str]:
    """The ``2dq.*`` entries of an OpenVINO model's ``rt_info`` as ``{key: text}``."""
    if not model.has_rt_info([RT_SECTION]):
        return {}
    names = [str(name) for name in model.get_rt_info()[RT_SECTION]]
    return {name: model.get_rt_info([RT_SECTION, name]).astype(str) for name in names if name.startswith(KEY_PREFIX)}


def _static(model: Any, export: ExportMetadata, batch: int) -> Any:
    """``model`` with its input fixed to ``(batch, 3, tile, tile)`` (the export's batch if it has one)."""
    model.reshape({model.input(0).get_any_name(): [export.batch or batch, 3, export.tile, export.tile]})
    return model


def _check_precision(precision: str, where: Path) -> None:
    if precision not in FLOAT_PRECISIONS:
        raise ValueError(f"{where}: float precision {precision!r}: expected one of {', '.join(FLOAT_PRECISIONS)}")


def _compile(ov: Any, model: Any, threads: Optional[int], profile: bool = False, precision: str = PRECISION) -> Any:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                              "PERF_COUNT": profile}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, DEVICE, config)


class OpenVinoTileRunner:
    """An OpenVINO IR (or any 2dq QDQ export, converted on load) as a tile runner: ``(N, 3, T, T)`` ->
    ``(N, 3, sT, sT)``.

    ``tile``, ``scale`` and ``multiple`` come from the ``2dq.*`` metadata. The model is compiled for
    ``batch`` tiles per call (the export's own static batch when it has one); ``threads`` sets the
    CPU plugin's inference threads (None: its choice, all cores); ``profile`` turns on the plugin's
    per-node timing (``request.profiling_info``; :mod:`engines.cpu_profile`).

    Example: at the end of :func:`build_openvino_engine`'s.
    """

    def __init__(self, engine_path: str | os.PathLike, threads: Optional[int] = None,
                 batch: int = DEFAULT_BATCH, profile: bool = False) -> None:
        ov = _ov()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OpenVINO engine not found: {self.path}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        try:
            model = ov.Core().read_model(str(self.path))
        except RuntimeError as err:
            raise ValueError(f"{self.path}: OpenVINO cannot read it: {err}") from err
        #: the raw ``2dq.*`` entries (the export's and the engine's ``2dq.engine.*``)
        self.metadata = _props(model)
        #: the export's record, validated (``ValueError`` naming the key for a file that is no 2dq export)
        self.export = ExportMetadata.from_props(self.metadata, self.path)
        self.tile, self.scale, self.multiple = self.export.tile, self.export.scale, self.export.multiple
        names = [port.get_any_name() for port in model.inputs]
        if names != ["input"]:
            raise ValueError(f"{self.path}: expected one input named 'input', got {names}")
        self.batch = self.export.batch or batch
        #: what the float layers run in, as built (IRs from before the option: f32)
        self.float_precision = self.metadata.get(PRECISION_KEY, PRECISION)
        _check_precision(self.float_precision, self.path)
        self.compiled = _compile(ov, _static(model, self.export, self.batch), threads, profile, self.float_precision)
        self.request = self.compiled.create_infer_request()

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, self.tile, self.tile):
            raise ValueError(f"{self.path}: expected tiles (N, 3, {self.tile}, {self.tile}), got {tuple(tiles.shape)}")
        batch = np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())
        output = self.compiled.output(0)
        # a copy of each result: the infer request reuses its output buffer on the next call
        run = lambda chunk: np.array(self.request.infer({0: chunk})[output])  # noqa: E731
        return torch.from_numpy(run_in_fixed_batches(batch, self.batch, run))
