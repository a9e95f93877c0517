"""Export of fake-quant models to QDQ ONNX (:mod:`export.onnx_export`), TensorRT-rules lint (:mod:`export.lint`).

>>> from export import export_onnx                # doctest: +SKIP
>>> export_onnx(qmodel, "w4a4.onnx", tile=64)      # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .api import export_onnx

        return export_onnx
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = ["export_onnx"]
