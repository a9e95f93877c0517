"""ONNX for a stable sort: ``TopK`` over the whole axis, which puts equal values in index order.

torch.onnx has no translation of ``aten.sort``. A quantized model runs its sorts stable (:func:`toolchain.quant.
routing.stable_sort`), and a stable sort along an axis of length ``n`` is ``TopK`` with ``k = n`` (``largest`` for
descending), whose ties the ONNX specification breaks by the lower index: the same order, so the engine groups
ATD's tokens as the reference does. An unstable sort (a float model's) is refused: its order of equal values is
PyTorch's algorithm's, which no graph reproduces. TensorRT's ``TopK`` takes ``k <= 3840``.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxscript
import torch

__all__ = ["sort_translations"]


def sort_translations(opset: int) -> dict:
    """``custom_translation_table`` entries for ``aten.sort.stable`` at ``opset``."""
    op = getattr(onnxscript, f"opset{opset}")

    def sort_onnx(x, stable=None, dim: int = -1, descending: bool = False):
        if not stable:
            raise ValueError("an unstable torch.sort (stable=False) has no ONNX equivalent: the order of equal values is "
                             "PyTorch's algorithm's (a quantized model runs its sorts stable)")
        axis = op.Constant(value=onnx.numpy_helper.from_array(np.array([dim], dtype=np.int64)))
        k = op.Gather(op.Shape(x), axis)
        return op.TopK(x, k, axis=dim, largest=1 if descending else 0, sorted=1)

    return {torch.ops.aten.sort.stable: sort_onnx}
