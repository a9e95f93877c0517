"""``export_onnx(qmodel, path, tile=...)``: the Python API's export of an in-memory fake-quant model.

The same graph as ``2dq-export`` (:func:`export.onnx_export.export_model`); the provenance written
into the ONNX metadata is the artifact's when the model came from :func:`calib.load`, else the
digest of the model's float weights (an in-memory model has no files to hash).
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Union

from torch import nn

from .onnx_export import DEFAULT_OPSET, ExportOptions, ExportResult, Provenance, export_model


def export_onnx(qmodel: nn.Module, path: Union[str, os.PathLike, None], *, tile: int = 64,
                target: Optional[str] = None, float_dtype: Optional[str] = None, opset: int = DEFAULT_OPSET,
                int4_block: int = 64, lint: bool = True) -> ExportResult:
    """Export a calibrated fake-quant ``qmodel`` as a QDQ ONNX graph for ``tile`` x ``tile`` LR tiles.

    ``path`` None checks and lints only. Raises :class:`export.onnx_export.ExportLintError` on
    TensorRT-rule violations (``lint=False`` reports them in the result instead).
    """
    from calib.api import RECORD_ATTRIBUTE
    from calib.artifact import PROVENANCE_ATTRIBUTE

    loaded = qmodel.__dict__.get(PROVENANCE_ATTRIBUTE)
    if loaded is not None:
        provenance = Provenance(**loaded)
    else:
        record = qmodel.__dict__.get(RECORD_ATTRIBUTE)
        if record is None:
            raise ValueError(f"export_onnx: {type(qmodel).__name__} carries no quantization record: quantize it with "
                             "calib.quantize or load it with calib.load")
        digest = _weights_digest(qmodel)
        provenance = Provenance(digest, "in-memory", record["quant_config"].to_dict())
    options = ExportOptions(tile=tile, target=target, float_dtype=float_dtype, opset=opset, int4_block=int4_block,
                            lint=lint)
    return export_model(qmodel, path, options, provenance)


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if not name.endswith((".lower", ".upper")):
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
