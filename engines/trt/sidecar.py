"""What a TensorRT plan was built from and for: the ONNX facts read before a build, and ``<plan>.json``.

A serialized TensorRT plan only runs on the TensorRT version and the GPU model it was built with, and
it carries no trace of the ONNX file, calibration artifact or checkpoint behind it. The sidecar
``<plan>.json`` written beside every plan records all of that, so that a plan that does not belong to
this machine, this TensorRT or a given ONNX file is refused with a clear :class:`PlanMismatchError`
instead of failing deep inside deserialization or silently producing another model's output.

Everything here is plain Python (``onnx``, ``json``, ``torch.cuda`` for the GPU name) and runs
without TensorRT; :func:`check_plan` is a pure function over two dicts.

ONNX facts (:func:`read_onnx_info`): one input ``(N, 3, T, T)`` and one output ``(N, 3, sT, sT)``; a
2dq export's metadata is read through the schema (:class:`export.metadata.ExportMetadata`: tile,
scale, input multiple, batch, target, float dtype, hashes) and must agree with the graph's dims and
float dtype; a graph with no 2dq metadata at all (a foreign SR network) gets its tile and scale from
fixed ONNX dims. The sidecar records the export's float dtype (``float_dtype``), which sets the
verification floor of ``2dq-build-engine --verify``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.metadata import ExportMetadata, key
from toolchain.files import atomic_path, sha256_file, sha256_mismatch

SIDECAR_FORMAT = "2dq-trt-plan"
SIDECAR_VERSION = 1
REBUILD_HINT = "rebuild it on this machine with `2dq-build-engine --backend trt`"


class PlanMismatchError(RuntimeError):
    """A plan's sidecar does not match this GPU, this TensorRT, the plan bytes or the given ONNX."""


@dataclass(frozen=True)
class OnnxInfo:
    """Facts about an exported SR model that the TensorRT build and the sidecar need.

    ``tile`` / ``scale`` are ``None`` when neither metadata nor fixed dims give them. ``nodes`` lists
    ``(name, op_type)`` of the top-level graph nodes so parser errors can name the failing node.
    ``float_dtype`` is what the graph computes in (``"float32"`` / ``"float16"``, TensorRT's view);
    ``export`` the export's metadata (None: a graph with no 2dq metadata), which ``multiple``,
    ``target`` and the hashes repeat.
    """

    path: str
    sha256: str
    input_name: str
    output_name: str
    input_dtype: str
    output_dtype: str
    float_dtype: str
    tile: int | None
    scale: int | None
    multiple: int
    target: str | None
    artifact_sha256: str | None
    checkpoint_sha256: str | None
    qdq_nodes: int
    int4_initializers: int
    nodes: tuple[tuple[str, str], ...]
    export: ExportMetadata | None = None


def _dim(value: Any) -> int | None:
    return int(value.dim_value) if value.HasField("dim_value") and value.dim_value > 0 else None


def read_onnx_info(onnx_path: str | os.PathLike) -> OnnxInfo:
    """Read tile, scale, I/O names and dtypes, hashes and Q/DQ content of an exported ONNX model.

    Raises ``ValueError`` naming the file when the model is not a single-input, single-output
    ``(N, 3, T, T) -> (N, 3, sT, sT)`` SR network or when metadata and dims disagree.
    """
    import onnx
    from onnx import TensorProto

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"{path}: expected one input and one output, got inputs {[i.name for i in inputs]} "
            f"and outputs {[o.name for o in graph.output]}"
        )
    inp, out = inputs[0].type.tensor_type, graph.output[0].type.tensor_type
    if len(inp.shape.dim) != 4 or len(out.shape.dim) != 4:
        raise ValueError(f"{path}: input and output must be 4-D (N, 3, H, W)")
    in_dims = [_dim(d) for d in inp.shape.dim]
    out_dims = [_dim(d) for d in out.shape.dim]
    for name, dims in (("input", in_dims), ("output", out_dims)):
        if dims[1] not in (None, 3):
            raise ValueError(f"{path}: {name} has {dims[1]} channels, expected 3 (RGB)")

    # None: no 2dq metadata at all (a foreign SR graph); a partial or malformed record is refused
    export = ExportMetadata.find({p.key: p.value for p in model.metadata_props}, path)
    tile = export.tile if export is not None else None
    dim_tile = in_dims[2] if in_dims[2] is not None and in_dims[2] == in_dims[3] else None
    if in_dims[2] is not None and in_dims[3] is not None and in_dims[2] != in_dims[3]:
        raise ValueError(f"{path}: input tile must be square, got {in_dims[2]}x{in_dims[3]}")
    if tile is not None and dim_tile is not None and tile != dim_tile:
        raise ValueError(f"{path}: metadata {key('tile')}={tile} but the input dims say {dim_tile}")
    tile = tile if tile is not None else dim_tile

    scale = export.scale if export is not None else None
    dim_scale = None
    if dim_tile is not None and out_dims[2] is not None:
        if out_dims[2] % dim_tile:
            raise ValueError(f"{path}: output size {out_dims[2]} is not a multiple of the tile {dim_tile}")
        dim_scale = out_dims[2] // dim_tile
    if scale is not None and dim_scale is not None and scale != dim_scale:
        raise ValueError(f"{path}: metadata {key('scale')}={scale} but the I/O dims say {dim_scale}")
    scale = scale if scale is not None else dim_scale

    dtype_name = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
    for name, tensor in (("input", inp), ("output", out)):
        if tensor.elem_type not in dtype_name:
            raise ValueError(
                f"{path}: {name} dtype {TensorProto.DataType.Name(tensor.elem_type)} is not float32/float16"
            )
    fp16_cast = any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
        for n in graph.node
    )
    fp16_init = any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer)
    # A graph computes in fp16 when its input is fp16 or it casts to / stores fp16 inside (the
    # trt-int4 export keeps fp32 I/O around an fp16 body); the weak-typing build path needs to know.
    float16 = inp.elem_type == TensorProto.FLOAT16 or fp16_cast or fp16_init
    if export is not None:
        if (export.float_dtype == "fp16") != float16:
            raise ValueError(f"{path}: metadata {key('float_dtype')}={export.float_dtype} but the graph computes in "
                             f"{'float16' if float16 else 'float32'}")
        if in_dims[0] != export.batch:
            raise ValueError(f"{path}: metadata {key('batch')}={export.batch or 'dynamic'} but the input's batch "
                             f"dim is {in_dims[0] or 'dynamic'}")
    return OnnxInfo(
        path=str(path),
        sha256=sha256_file(path),
        input_name=inputs[0].name,
        output_name=graph.output[0].name,
        input_dtype=dtype_name[inp.elem_type],
        output_dtype=dtype_name[out.elem_type],
        float_dtype="float16" if float16 else "float32",
        tile=tile,
        scale=scale,
        multiple=export.multiple if export is not None else 1,
        target=export.target if export is not None else None,
        artifact_sha256=export.artifact_sha256 if export is not None else None,
        checkpoint_sha256=export.checkpoint_sha256 if export is not None else None,
        qdq_nodes=sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node),
        int4_initializers=sum(init.data_type == TensorProto.INT4 for init in graph.initializer),
        nodes=tuple((n.name, n.op_type) for n in graph.node),
        export=export,
    )


def resolve_tile(info: OnnxInfo, requested: int | None) -> tuple[int, int]:
    """The ``(tile, scale)`` to build for: the ONNX's own tile, or ``requested`` for a free-size input."""
    if info.scale is None:
        raise ValueError(f"{info.path}: the scale is unknown (no 2dq metadata, no fixed dims)")
    if requested is not None and info.tile is not None and requested != info.tile:
        raise ValueError(f"{info.path} is exported for tile {info.tile}, but tile {requested} was requested")
    tile = requested if requested is not None else info.tile
    if tile is None:
        raise ValueError(f"{info.path} has no fixed tile size (2dq metadata or input dims); pass --tile")
    if tile % info.multiple:
        raise ValueError(f"tile {tile} is not a multiple of the model's input multiple {info.multiple}")
    return tile, info.scale


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": self.compute_capability}


def current_gpu(device: str | int | None = None) -> GpuInfo:
    """Name and compute capability (``"9.0"``) of a CUDA device, read through ``torch.cuda``."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs an NVIDIA GPU, but torch.cuda.is_available() is False")
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}")


def sidecar_path(plan_path: str | os.PathLike) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan_path)
    return plan.with_name(plan.name + ".json")


def make_sidecar(
    info: OnnxInfo,
    *,
    plan_sha256: str,
    tensorrt_version: str,
    gpu: GpuInfo,
    precision: str,
    build_mode: Mapping[str, Any],
    build_options: Mapping[str, Any],
    tile: int,
    scale: int,
    profile: Mapping[str, int],
    io_dtypes: Mapping[str, str],
) -> dict[str, Any]:
    """The JSON-ready record written beside a plan (see the module docstring)."""
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "plan_sha256": plan_sha256,
        "onnx": {"path": info.path, "sha256": info.sha256, "target": info.target},
        "artifact_sha256": info.artifact_sha256,
        "checkpoint_sha256": info.checkpoint_sha256,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu.to_dict(),
        "precision": precision,
        "build_mode": dict(build_mode),
        "build_options": dict(build_options),
        "tile": tile,
        "scale": scale,
        "multiple": info.multiple,
        # the export's float layers (fp32 / fp16; None for a foreign graph): the verification floor follows it
        "float_dtype": info.export.float_dtype if info.export is not None else None,
        "input": {"name": info.input_name, "shape": ["N", 3, tile, tile], "dtype": io_dtypes["input"]},
        "output": {
            "name": info.output_name,
            "shape": ["N", 3, scale * tile, scale * tile],
            "dtype": io_dtypes["output"],
        },
        "profile": dict(profile),
    }


_REQUIRED = (
    "format",
    "version",
    "plan_sha256",
    "onnx",
    "tensorrt_version",
    "gpu",
    "precision",
    "tile",
    "scale",
    "input",
    "output",
    "profile",
)


def write_sidecar(plan_path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    path = sidecar_path(plan_path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(plan_path: str | os.PathLike) -> dict[str, Any]:
    """Load ``<plan>.json``; a missing, unreadable or foreign file is a clear error naming it."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        raise FileNotFoundError(f"plan metadata {path} not found; every plan needs it, {REBUILD_HINT}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan metadata {path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ValueError(f'{path} is not a 2dq plan sidecar (expected "format": "{SIDECAR_FORMAT}")')
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise ValueError(f"plan metadata {path} lacks {', '.join(missing)}")
    if record["version"] != SIDECAR_VERSION:
        raise ValueError(f"plan metadata {path} has version {record['version']}, expected {SIDECAR_VERSION}")
    return record


def check_plan(
    record: Mapping[str, Any],
    *,
    gpu: GpuInfo,
    tensorrt_version: str,
    onnx_sha256: str | None = None,
    plan_sha256: str | None = None,
) -> list[str]:
    """Every reason why the plan described by ``record`` must not run here (empty list: it may).

    Plans are bound to the exact TensorRT version and GPU model they were built with; ``onnx_sha256``
    (when given) must be the ONNX the plan was built from, ``plan_sha256`` the plan file's bytes.
    """
    problems = []
    built_gpu = record["gpu"]
    if built_gpu.get("name") != gpu.name:
        problems.append(f"it was built on GPU {built_gpu.get('name')!r}, this GPU is {gpu.name!r}")
    if built_gpu.get("compute_capability") != gpu.compute_capability:
        problems.append(
            f"it was built for compute capability {built_gpu.get('compute_capability')}, "
            f"this GPU has {gpu.compute_capability}"
        )
    if record["tensorrt_version"] != tensorrt_version:
        problems.append(
            f"it was built with TensorRT {record['tensorrt_version']}, TensorRT {tensorrt_version} is installed"
        )
    if onnx_sha256 is not None:
        problems.append(_source_problem(record, onnx_sha256))
    if plan_sha256 is not None:
        problems.append(sha256_mismatch("the plan file", record["plan_sha256"],
                                        "plan replaced or corrupt since its build", digest=plan_sha256))
    return [problem for problem in problems if problem]  # the hash checks give None when the file matches


def _source_problem(record: Mapping[str, Any], onnx_sha256: str) -> str | None:
    return sha256_mismatch("the given ONNX", record["onnx"].get("sha256"), "it was built from another ONNX",
                           digest=onnx_sha256)


def validate_source(plan_path: str | os.PathLike, record: Mapping[str, Any], onnx_sha256: str) -> None:
    """Raise :class:`PlanMismatchError` unless the plan of ``record`` was built from the ONNX whose
    SHA-256 is ``onnx_sha256``; needs neither TensorRT nor a GPU (the runner checks it first)."""
    problem = _source_problem(record, onnx_sha256)
    if problem:
        raise PlanMismatchError(f"refusing to run {plan_path}: {problem}; {REBUILD_HINT}")


def validate_plan(plan_path: str | os.PathLike, record: Mapping[str, Any], **checks: Any) -> None:
    """Raise :class:`PlanMismatchError` listing every problem :func:`check_plan` finds."""
    problems = check_plan(record, **checks)
    if problems:
        raise PlanMismatchError(f"refusing to run {plan_path}: " + "; ".join(problems) + f"; {REBUILD_HINT}")
