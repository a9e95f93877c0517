"""QDQ ONNX export of a fake-quant model: the graph the engines run is the grid that was calibrated.

Approach: :func:`~export.export_view.build_export_view` replaces every quantized layer by a module
whose quantizers are two custom torch ops (:mod:`export.qdq_ops`); ``torch.onnx.export`` (the
``torch.export``-based exporter) traces the view at a fixed tile size with a dynamic batch and
translates the ops to ``Clip -> QuantizeLinear -> DequantizeLinear`` (activations) and int8 / int4
initializers feeding ``DequantizeLinear`` (weights); :func:`export.graph_rewrite.simplify` folds
masks, biases and shape arithmetic; ``onnx.checker`` (full check) and the TensorRT-rules lint
(:mod:`export.lint`) must pass; the file is written atomically and its bytes depend only on the
model, the artifact and the options.

Graph contract: input ``input`` (N, 3, T, T) float32, output ``output`` (N, 3, sT, sT) float32,
``N`` dynamic (``batch``); ``metadata_props`` (:class:`export.metadata.ExportMetadata`) tell engines and tools what
the file is.

A tiny SwinIR x2 (random weights) saved as a checkpoint, calibrated, saved as an artifact, exported:

>>> import tempfile, calib
>>> from toolchain import load_model
>>> folder = tempfile.TemporaryDirectory()
>>> weights, artifact = Path(folder.name) / "x2.pth", Path(folder.name) / "w4a4.safetensors"
>>> from toolchain.models.examples import tiny_swinir
>>> torch.save(tiny_swinir().state_dict(), weights)
>>> lr = torch.rand(4, 3, 16, 16)
>>> _ = calib.save(calib.quantize(load_model(weights), forward_loop=lambda m: m(lr)), artifact, checkpoint=weights)
>>> result = export_onnx(weights, artifact, Path(folder.name) / "w4a4.onnx", ExportOptions(tile=16))
>>> result.path.name, result.op_counts["DequantizeLinear"], result.violations
('w4a4.onnx', 12, [])
>>> folder.cleanup()
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
import dataclasses
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional

import onnx
import onnx_ir as ir
import torch
from torch import nn

from toolchain.files import atomic_path, sha256_file
from toolchain.quant.config import TARGETS

from .exact_sizes import exact_size_ints
from .export_view import INT4_BLOCKS, build_export_view
from .graph_rewrite import count_ops, simplify
from .metadata import ExportMetadata
from .qdq_ops import translations
from .sort_ops import sort_translations
from toolchain.models import info_of

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 21
#: the torch.export-based exporter's own translations need opset 18 (older targets fail its version
#: converter; TensorRT's lint accepts 13+); fp16 QuantizeLinear inputs need 19; int4 and blocks 21
MIN_OPSET, MIN_OPSET_FP16, MIN_OPSET_INT4 = 18, 19, 21
MAX_OPSET = 23
INPUT_NAME, OUTPUT_NAME = "input", "output"
#: the batch sizes the exported graph is traced for (it runs any batch in this range)
MAX_BATCH = 4096
#: tiles per call when the model's code does not allow a dynamic batch (the verifier's default batch)
DEFAULT_STATIC_BATCH = 4


class ExportLintError(ValueError):
    """The exported graph breaks TensorRT's Q/DQ rules (see :mod:`export.lint`)."""

    def __init__(self, violations: list) -> None:
        self.violations = violations
        shown = "\n".join(f"  {v}" for v in violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        super().__init__(f"{len(violations)} TensorRT-rule violation(s):\n{shown}{more}")


@dataclass(frozen=True)
class ExportOptions:
    """What to export: tile size, target, float dtype, opset, int4 block, lint on/off.

    ``target`` None takes the artifact's; ``float_dtype`` None is ``"fp16"`` for ``trt-int4``
    (TensorRT's weight-only INT4 runs with fp16 activations) and ``"fp32"`` otherwise.
    """

    tile: int = 64
    target: Optional[str] = None
    float_dtype: Optional[str] = None
    opset: int = DEFAULT_OPSET
    int4_block: int = 64
    lint: bool = True
    #: tiles per call of a static-batch graph (None: dynamic where the model allows it)
    batch: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile <= 0:
            raise ValueError(f"tile must be a positive integer, got {self.tile!r}")
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.float_dtype is not None and self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float dtype must be one of {tuple(FLOAT_DTYPES)}, got {self.float_dtype!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset}")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or not 1 <= self.batch <= MAX_BATCH):
            raise ValueError(f"batch must be an integer in [1, {MAX_BATCH}] or None (dynamic), got {self.batch!r}")
        if self.int4_block not in INT4_BLOCKS:
            raise ValueError(f"int4 block must be one of {INT4_BLOCKS}, got {self.int4_block}")

    def resolved(self, artifact_target: str) -> "ExportOptions":
        """Options with ``target`` and ``float_dtype`` filled in, checked against the opset."""
        target = self.target or artifact_target
        float_dtype = self.float_dtype or ("fp16" if target == "trt-int4" else "fp32")
        if target == "trt-int4" and self.opset < MIN_OPSET_INT4:
            raise ValueError(f"target trt-int4 (int4 weights, block quantization) needs opset >= {MIN_OPSET_INT4}, "
                             f"got {self.opset}")
        if float_dtype == "fp16" and self.opset < MIN_OPSET_FP16:
            raise ValueError(f"fp16 float layers need opset >= {MIN_OPSET_FP16} (fp16 QuantizeLinear), got {self.opset}")
        return dataclasses.replace(self, target=target, float_dtype=float_dtype)


@dataclass(frozen=True)
class Provenance:
    """Where a model came from: hashes of the float checkpoint and of the artifact's bounds file,
    and the artifact's quant config (``QuantConfig.to_dict()``)."""

    checkpoint_sha256: str
    artifact_sha256: str
    quant_config: dict[str, Any]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: node counts before/after simplification, ops, metadata."""

    path: Optional[Path]
    nodes_exported: int
    nodes: int
    op_counts: dict[str, int]
    metadata: dict[str, str]
    violations: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "nodes_exported": self.nodes_exported,
                "nodes": self.nodes, "op_counts": self.op_counts, "metadata": self.metadata,
                "violations": [str(v) for v in self.violations]}


def export_onnx(weights: str | os.PathLike, artifact: str | os.PathLike, path: str | os.PathLike,
                options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export the fake-quant model of ``weights`` + ``artifact`` to ``path`` (see the module docstring).

    Raises:
        calib.artifact.ArtifactError: an artifact of another checkpoint, or unreadable files.
        ValueError: bad options, a tile that is not a multiple of the model's input multiple.
        ExportLintError: TensorRT-rule violations (unless ``options.lint`` is False).
    """
    from calib.artifact import load_artifact, load_quantized_model

    model = load_quantized_model(weights, artifact)
    meta = load_artifact(artifact).meta
    provenance = Provenance(meta["checkpoint_sha256"], sha256_file(artifact), meta["quant_config"])
    return export_model(model, path, options, provenance)


def export_float_onnx(weights: str | os.PathLike, path: str | os.PathLike,
                      options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export the float model of ``weights`` (no quantizer) through the same exporter, simplification and
    checks as the QDQ graphs: the float baseline of the same tiles. Its metadata records no artifact
    (``artifact_sha256`` empty), which is how ``2dq-build-engine --verify`` knows to compare its engine with
    the float model."""
    from toolchain.loading import load_model

    model = load_model(weights)
    return export_model(model, path, options, Provenance(sha256_file(weights), "", {}))


def export_model(model: nn.Module, path: Optional[str | os.PathLike], options: ExportOptions,
                 provenance: Provenance) -> ExportResult:
    """Export a fake-quant ``model`` (quantizers attached by ``quantize_model``, bounds set) to ``path``.

    ``path`` None checks and lints without writing (:func:`to_onnx` returns the proto itself).
    """
    proto, result = to_onnx(model, options, provenance)
    if path is not None:
        path = Path(path)
        with atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp))
        result.path = path
        log.info("wrote %s (%d nodes, %s)", path, result.nodes, _short_counts(result.op_counts))
    return result


def to_onnx(model: nn.Module, options: ExportOptions, provenance: Provenance) -> tuple[onnx.ModelProto, ExportResult]:
    """The checked, linted QDQ ``ModelProto`` of ``model`` and its :class:`ExportResult`."""
    from .lint import lint_model

    options = options.resolved(provenance.quant_config.get("target", "trt-int8"))
    multiple = info_of(model).multiple_of
    if options.tile % multiple or options.tile < info_of(model).minimum:
        raise ValueError(f"tile {options.tile} is not a multiple of the model's input multiple {multiple} of at least "
                         f"its minimum {info_of(model).minimum}")
    float_dtype = FLOAT_DTYPES[options.float_dtype]
    int4_block = options.int4_block if options.target == "trt-int4" else 0
    view = build_export_view(model, float_dtype, int4_block)
    ir_model, static_batch = _trace(view, options, float_dtype)
    nodes_exported = ir_model.graph.num_nodes()
    simplify(ir_model, static_batch)
    opset = ir_model.opset_imports.get("", options.opset)
    if opset != options.opset:
        raise RuntimeError(f"the exporter wrote opset {opset}, not the requested {options.opset}")
    export_meta = _metadata(model, options, provenance, int4_block, static_batch)
    result_meta = export_meta.to_props()
    ir_model.metadata_props.update(result_meta)
    ir_model.producer_name = "2dq"
    ir_model.producer_version = _version()
    ir_model.doc_string = None
    proto = ir.serde.serialize_model(ir_model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"the exported graph fails onnx.checker (full check): {err}") from err
    violations = lint_model(proto)
    if violations and options.lint:
        raise ExportLintError(violations)
    result = ExportResult(None, nodes_exported, ir_model.graph.num_nodes(), count_ops(ir_model.graph), result_meta,
                          violations)
    log.info("exported %s: %d nodes from the exporter, %d after simplification", export_meta.arch,
             nodes_exported, result.nodes)
    return proto, result


def _trace(view: nn.Module, options: ExportOptions, float_dtype: torch.dtype) -> tuple[ir.Model, Optional[int]]:
    """The exporter's graph and its static batch (None: the batch is dynamic).

    ``torch.export`` runs first with a dynamic batch; a model whose own code fixes the batch while
    tracing (DAT's ``windows2img`` computes ``int(N / windows)``) raises a constraint violation there,
    and the graph is then traced for ``options.batch or DEFAULT_STATIC_BATCH`` tiles per call instead,
    which engines pad to (the torch.onnx fallbacks would otherwise hand back a graph that claims a
    dynamic batch and computes garbage for any other). ``options.batch`` forces a static batch.
    """
    static = options.batch
    captured = io.StringIO()
    try:
        # the exporter prints its progress and torch-internal deprecation warnings: not for our users
        # exact_size_ints: int(windows.shape[0] / ...) in spandrel's window code keeps the batch symbolic
        # (without it, torch.export fixes the batch at the example's 2 silently or by a constraint violation)
        with contextlib.redirect_stdout(captured), warnings.catch_warnings(), exact_size_ints(view):
            warnings.simplefilter("ignore", FutureWarning)
            program = None
            if static is None:
                # torch.export specializes a dimension of size 1, so the example batch is 2
                batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
                try:
                    program = torch.export.export(view, (torch.zeros(2, 3, options.tile, options.tile),),
                                                  dynamic_shapes=({0: batch},), strict=False)
                except torch._dynamo.exc.UserError as err:  # a constraint violation: the code fixes the batch
                    static = DEFAULT_STATIC_BATCH
                    log.warning("the model's code fixes the batch size while tracing (%s); exporting a static batch "
                                "of %d tiles per call (engines pad shorter batches)", str(err).splitlines()[0][:200],
                                static)
            if program is None:
                program = torch.export.export(view, (torch.zeros(static, 3, options.tile, options.tile),), strict=False)
            table = {**translations(options.opset, float_dtype), **sort_translations(options.opset)}
            onnx_program = torch.onnx.export(
                program, opset_version=options.opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                optimize=False, verbose=False, custom_translation_table=table)
    except Exception as err:  # the exporter raises many error types; all mean the same here
        raise RuntimeError(f"torch.onnx.export failed at tile {options.tile}: {_cause(err)}{type(err).__name__}: "
                           f"{str(err)[:2000]}") from err
    finally:
        log.debug("exporter output:\n%s", captured.getvalue())
    return onnx_program.model, static


def _cause(err: Exception) -> str:
    """The line of the exporter's long report that says what failed, first (empty when there is none):
    an op of the model's forward with no ONNX translation, or one of our translations refusing a call.

    >>> _cause(RuntimeError("... No ONNX function found for <OpOverload(op='aten.sort', overload='stable')>. ..."))
    "no ONNX translation for aten.sort.stable (an op of the model's forward). "
    """
    text = "\n".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if missing:
        return f"no ONNX translation for {missing[1]}.{missing[2]} (an op of the model's forward). "
    if "Padding size should be less than the corresponding input dimension" in text:
        return ("the model pads its input with reflection by at least the tile (GRL pads to a multiple of 64; its "
                "eager code falls back to zeros, which tracing cannot): use a larger --tile. ")
    refused = re.search(r"<class 'ValueError'>: ([^\n]+)", text)
    return f"{refused[1]}. " if refused else ""


def _metadata(model: nn.Module, options: ExportOptions, provenance: Provenance, int4_block: int,
              static_batch: Optional[int] = None) -> ExportMetadata:
    info = info_of(model)
    return ExportMetadata(
        arch=info.arch, scale=info.scale, tile=options.tile, multiple=info.multiple_of, target=options.target,
        float_dtype=options.float_dtype, opset=options.opset, checkpoint_sha256=provenance.checkpoint_sha256,
        artifact_sha256=provenance.artifact_sha256, quant_config=provenance.quant_config,
        model_config=info.hyperparameters, batch=static_batch, int4_block=int4_block or None)


def _version() -> str:
    try:
        return importlib_metadata.version("2dq")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _short_counts(counts: dict[str, int], top: int = 6) -> str:
    return ", ".join(f"{op} {n}" for op, n in list(counts.items())[:top])
