"""Two custom torch ops that carry quantization through ``torch.export``, and their ONNX translations.

The export view of a model (:mod:`export.export_view`) calls these ops where the fake-quant model
calls its quantizers. ``torch.export`` keeps them as opaque nodes, and the ONNX exporter turns them
into standard operators through :data:`TRANSLATIONS`:

- ``twodq::quantize_dequantize(x, lower, upper, bits, symmetric)`` (an activation quantizer) ->
  ``Clip(x, -z*s, (2^b-1-z)*s) -> QuantizeLinear(s, 0:int8) -> DequantizeLinear(s, 0:int8)``, the
  grid of ARCHITECTURE.md section 2 with ``s``, ``z`` and the clip values from
  :mod:`toolchain.quant.grid`, rounded to the dtype of ``x`` (fp32, or fp16 for fp16 graphs);
- ``twodq::dequantize(codes, scale, zero_point, axis, block_size)`` (a quantized weight) ->
  ``DequantizeLinear(codes, scale, zero_point)`` reading the integer codes as an initializer,
  per tensor, per channel along ``axis``, or in blocks of ``block_size`` along ``axis``.

Per-tensor weights pass ``axis = -1`` (no axis attribute). In eager mode both ops compute what the engines compute, so the export view can be run in PyTorch
and compared with the fake-quant model.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import onnxscript

from toolchain.quant import grid


@torch.library.custom_op("twodq::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, lower: float, upper: float, bits: int, symmetric: bool) -> torch.Tensor:
    """Fake quantization of ``x`` (any shape) on the grid of fp32 bounds ``[lower, upper]``."""
    low, high = _bounds(lower, upper)
    return grid.fake_quantize(x.float(), low, high, bits, symmetric).to(x.dtype)


@quantize_dequantize.register_fake
def _quantize_dequantize_fake(x, lower, upper, bits, symmetric):
    return torch.empty_like(x)


@torch.library.custom_op("twodq::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
               block_size: int) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in ``scale``'s dtype, broadcast as ONNX DequantizeLinear does.

    ``scale`` is a scalar (per tensor), 1-D along ``axis`` (per channel, ``block_size == 0``) or of
    ``codes``' rank with ``ceil(codes.shape[axis] / block_size)`` entries along ``axis`` (blocks).
    """
    return (codes.to(scale.dtype) - _expand(zero_point, codes, axis, block_size).to(scale.dtype)) * _expand(
        scale, codes, axis, block_size)


@dequantize.register_fake
def _dequantize_fake(codes, scale, zero_point, axis, block_size):
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


def _bounds(lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    # the bounds were fp32 tensors; a Python float holds an fp32 value exactly, so this is lossless
    return torch.tensor(lower, dtype=torch.float32), torch.tensor(upper, dtype=torch.float32)


def _expand(param: torch.Tensor, codes: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """A scale or zero point broadcast against ``codes``."""
    if param.dim() == 0:
        return param
    axis = axis % codes.dim()
    if block_size:
        return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, codes.shape[axis])
    shape = [1] * codes.dim()
    shape[axis] = -1
    return param.reshape(shape)


def grid_constants(lower: float, upper: float, bits: int, symmetric: bool) -> tuple[float, float, float]:
    """``(step, clip_low, clip_high)`` of a quantizer's grid in fp32 (:mod:`toolchain.quant.grid`)."""
    low, high = _bounds(lower, upper)
    step, zero_point = grid.step_and_zero_point(low, high, bits, symmetric)
    clip_low, clip_high = grid.clip_values(step, zero_point, bits)
    return float(step), float(clip_low), float(clip_high)


def translations(opset: int, float_dtype: torch.dtype) -> dict:
    """``custom_translation_table`` for :func:`torch.onnx.export` at ``opset`` for a graph whose float
    tensors are ``float_dtype`` (scales and clip values are written in that dtype)."""
    op = getattr(onnxscript, f"opset{opset}")
    np_dtype = np.float16 if float_dtype == torch.float16 else np.float32

    def constant(value) -> object:
        return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(value)))

    def quantize_dequantize_onnx(x, lower: float, upper: float, bits: int, symmetric: bool):
        step, clip_low, clip_high = grid_constants(lower, upper, bits, symmetric)
        scale = constant(np.array(step, dtype=np_dtype))
        zero = constant(np.array(0, dtype=np.int8))
        clipped = op.Clip(x, constant(np.array(clip_low, dtype=np_dtype)), constant(np.array(clip_high, dtype=np_dtype)))
        return op.DequantizeLinear(op.QuantizeLinear(clipped, scale, zero), scale, zero)

    def dequantize_onnx(codes, scale, zero_point, axis: int, block_size: int):
        if block_size:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
        if axis >= 0:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis)
        return op.DequantizeLinear(codes, scale, zero_point)

    return {
        torch.ops.twodq.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.twodq.dequantize.default: dequantize_onnx,
    }
