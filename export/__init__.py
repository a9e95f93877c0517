"""Export of fake-quant models to QDQ ONNX (:mod:`export.onnx_export`), TensorRT-rules lint (:mod:`export.lint`).

Owns the QDQ graph and its metadata schema (:mod:`export.metadata`, read by every engine). Imports
:mod:`toolchain` and :mod:`calib`; its command-line module (``cli.py``) may import anything.

>>> import torch, calib
>>> from toolchain.models.examples import tiny_swinir
>>> model = tiny_swinir()   # random weights; real ones: load_model
>>> from export import export_onnx
>>> lr = torch.rand(4, 3, 16, 16)
>>> qmodel = calib.quantize(model, forward_loop=lambda m: m(lr))
>>> result = export_onnx(qmodel, None, tile=16)   # None: trace, check and lint only; a path writes the file
>>> result.path, result.op_counts["QuantizeLinear"], result.violations
(None, 8, [])
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .api import export_onnx

        return export_onnx
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = ["export_onnx"]
