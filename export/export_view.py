"""The export view of a fake-quant model: the same network with quantizers turned into graph ops.

:func:`build_export_view` copies a model whose quantizers were attached by
:func:`toolchain.quant.quantize_model` and replaces each quantized layer by an equivalent module
that ``torch.export`` can trace into a QDQ graph (:mod:`export.qdq_ops`):

- an activation quantizer becomes ``twodq::quantize_dequantize`` with its fp32 bounds as constants;
- a linear's ``input_multiplier`` (explicit smoothing, :mod:`calib.transforms.smoothing` kind ``"input"``)
  becomes one ``Mul`` before that input's quantizer, its ``input_rotation`` (:mod:`calib.transforms.rotation`)
  one ``MatMul`` with a constant float ``(C_in, C_in)`` matrix after the ``Mul`` (the weight already carries
  it), its ``input_offset`` (:mod:`calib.transforms.input_shift`) one ``Sub`` after those (the bias already
  carries the offset back);
- a weight quantizer becomes integer codes (:func:`toolchain.quant.grid.integer_codes`, int8
  buffers) with their step as the scale, feeding ``twodq::dequantize``. Linear weights are stored
  transposed, ``(C_in, C_out)``, the layout of the ``MatMul`` they feed, so no ``Transpose`` sits
  between the ``DequantizeLinear`` and the ``MatMul``; per-channel scales are then along axis 1.
  Conv weights keep ``(C_out, C_in/groups, kh, kw)``, per-channel along axis 0.
- ``trt-int4`` (4-bit symmetric weights): linear weights are written in blocks of ``int4_block``
  along the reduction axis (axis 0 of ``(C_in, C_out)``), the reduction axis zero-padded to a
  multiple of the block; the layer pads its input with the same number of zeros (after the input's
  quantizer, so the ``MatMul`` sees a float activation: TensorRT's INT4 is weight-only). Every block
  of a column repeats that column's step, so the grid is the fake-quant model's exactly.

Each replacement holds its quantizers as submodules named after the quantizer's suffix (``input``,
``weight``, ``a``, ``b``), so a graph op's module path is its quantizer's name (the names
:mod:`export.graph_rewrite` gives the Q/DQ nodes, ``<quantizer>/QuantizeLinear``).

Only :class:`~toolchain.quant.QuantLinear`, :class:`~toolchain.quant.QuantMatMul` and
:class:`~toolchain.quant.QuantConv2d` carry quantizers; anything else is refused. The model itself
is not modified.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from toolchain.quant import QuantConv2d, QuantLinear, QuantMatMul, Quantizer, grid
from toolchain.quant.routing import opaque

from .qdq_ops import dequantize, quantize_dequantize

log = logging.getLogger(__name__)

INT4_BLOCKS = (64, 128)
INT4_BITS = 4


class ActivationQDQ(nn.Module):
    """An activation quantizer as a graph op: ``x`` (any shape) -> fake-quantized ``x``."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.name = quantizer.name
        # Python floats hold the fp32 bounds exactly; torch.export needs them as constants
        self.lower = float(quantizer.lower.detach())
        self.upper = float(quantizer.upper.detach())
        self.bits = quantizer.bits
        self.symmetric = quantizer.symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.lower, self.upper, self.bits, self.symmetric)


class QuantizedWeight(nn.Module):
    """Integer codes + scale of a weight; ``forward()`` returns the dequantized weight.

    ``codes`` int8 (values in the quantizer's code range; -8..7 when written as int4), ``scale``
    and ``zero_point`` (zeros) per tensor ``()``, per channel ``(C,)`` along ``axis``, or per block
    (``codes``' rank, ``ceil(size / block_size)`` along ``axis``).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int = 0) -> None:
        super().__init__()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int8))
        self.axis = axis
        self.block_size = block_size

    def forward(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block_size)


def _activation(quantizer: Optional[Quantizer]) -> Optional[ActivationQDQ]:
    if quantizer is None or not quantizer.enabled:
        return None
    _check_ready(quantizer)
    return ActivationQDQ(quantizer)


def _check_ready(quantizer: Quantizer) -> None:
    if not quantizer.initialized:
        raise ValueError(f"quantizer {quantizer.name} has no bounds; calibrate or load an artifact before export")
    if quantizer.observer is not None:
        raise ValueError(f"quantizer {quantizer.name} still has an observer attached")


def _weight_codes(weight: torch.Tensor, quantizer: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (weight's shape, int8) and step (``quantizer.bounds_shape``) of a weight quantizer."""
    _check_ready(quantizer)
    with torch.no_grad():
        codes = grid.integer_codes(weight.float(), quantizer.lower.float(), quantizer.upper.float(),
                                   quantizer.bits, quantizer.symmetric)
        step, _ = quantizer.step_and_zero_point()
    return codes, step.detach().float()


def is_int4_weight(quantizer: Quantizer) -> bool:
    """Whether a weight quantizer's codes fit int4 (4 bits, symmetric: codes -8..7)."""
    return quantizer.bits == INT4_BITS and quantizer.symmetric


class ExportLinear(nn.Module):
    """``QuantLinear`` for export: ``(..., C_in)`` -> ``(..., C_out)`` as ``MatMul`` + bias."""

    def __init__(self, layer: QuantLinear, int4_block: int = 0) -> None:
        super().__init__()
        self.input = _activation(layer.input_quantizer)
        multiplier = layer.input_multiplier
        self.register_buffer("input_multiplier", None if multiplier is None else multiplier.detach().clone())
        rotation = layer.input_rotation
        self.register_buffer("input_rotation", None if rotation is None else rotation.detach().clone())
        offset = layer.input_offset
        self.register_buffer("input_offset", None if offset is None else offset.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.pad = 0
        quantizer = layer.weight_quantizer
        if quantizer is None or not quantizer.enabled:
            self.weight = None
            self.float_weight = nn.Parameter(layer.weight.detach().t().contiguous().clone())
            return
        codes, step = _weight_codes(layer.weight, quantizer)
        codes = codes.t()  # (C_in, C_out): MatMul's B layout
        scale = step.reshape(-1) if step.dim() else step  # per channel: one step per output column
        if int4_block:
            if not is_int4_weight(quantizer):
                raise ValueError(f"quantizer {quantizer.name}: trt-int4 needs 4-bit symmetric weights, got "
                                 f"{quantizer.bits} bits, symmetric={quantizer.symmetric}")
            c_in, c_out = codes.shape
            self.pad = -c_in % int4_block
            codes = F.pad(codes, (0, 0, 0, self.pad))  # zero rows: padded inputs contribute nothing
            blocks = codes.shape[0] // int4_block
            scale = scale.reshape(1, -1).expand(blocks, c_out) if scale.dim() else scale.expand(blocks, c_out)
            self.weight = QuantizedWeight(codes, scale.clone(), axis=0, block_size=int4_block)
        else:
            self.weight = QuantizedWeight(codes, scale.clone(), axis=1 if scale.dim() else -1)
        self.float_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_multiplier is not None:
            x = x * self.input_multiplier  # explicit smoothing: one Mul before the input's Q/DQ
        if self.input_rotation is not None:
            with opaque():  # explicit rotation: one constant float MatMul before the input's Q/DQ
                x = torch.matmul(x, self.input_rotation)
        if self.input_offset is not None:
            x = x - self.input_offset  # input shift (its bias fold is baked already): one Sub
        if self.input is not None:
            x = self.input(x)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        weight = self.float_weight if self.weight is None else self.weight()
        with opaque():  # this MatMul is the linear's own, not a call of the module that holds it
            y = torch.matmul(x, weight)
        return y if self.bias is None else y + self.bias


class ExportMatMul(nn.Module):
    """``QuantMatMul`` for export: ``a @ b`` with each operand's quantizer as a graph op."""

    def __init__(self, layer: QuantMatMul) -> None:
        super().__init__()
        self.a = _activation(layer.a_quantizer)
        self.b = _activation(layer.b_quantizer)

    def forward(self, a: torch.Tensor, b: torch.Tensor, product=torch.matmul) -> torch.Tensor:
        if self.a is not None:
            a = self.a(a)
        if self.b is not None:
            b = self.b(b)
        return product(a, b)


class ExportConv2d(nn.Module):
    """``QuantConv2d`` for export: int8 weight codes (per tensor or per output channel, axis 0)."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        self.input = _activation(layer.input_quantizer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        self.padding, self.padding_mode = layer.padding, layer.padding_mode
        self.reversed_padding = layer._reversed_padding_repeated_twice
        quantizer = layer.weight_quantizer
        if quantizer is None or not quantizer.enabled:
            self.weight = None
            self.float_weight = nn.Parameter(layer.weight.detach().clone())
            return
        codes, step = _weight_codes(layer.weight, quantizer)
        scale = step.reshape(-1) if step.dim() else step
        self.weight = QuantizedWeight(codes, scale.clone(), axis=0 if scale.dim() else -1)
        self.float_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input is not None:
            x = self.input(x)
        weight = self.float_weight if self.weight is None else self.weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportGraph(nn.Module):
    """The exported function: ``input`` (N, 3, T, T) float32 -> ``output`` (N, 3, sT, sT) float32.

    With fp16 float layers the graph casts the input to fp16 and the output back, so every engine
    takes and returns float32 tiles.
    """

    def __init__(self, model: nn.Module, float_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.float_dtype = float_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factories = contextlib.nullcontext() if self.float_dtype == torch.float32 else FloatFactories(self.float_dtype)
        with factories:
            return self.model(x.to(self.float_dtype)).to(torch.float32)


class FloatFactories(TorchFunctionMode):
    """Float tensors a model creates at run time without a dtype come out in ``dtype``.

    Such tensors take torch's default dtype (float32): SwinIR, HAT and SRFormer build the
    shifted-window mask of a tile other than their training size with ``torch.zeros``, which then
    promotes the fp16 attention scores to float32. The cast is recorded in the traced graph (the
    exporter re-runs the graph later, when no mode is active).
    """

    FACTORIES = frozenset({torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange,
                           torch.linspace, torch.eye, torch.rand, torch.randn})

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if (func in self.FACTORIES and kwargs.get("dtype") is None and isinstance(result, torch.Tensor)
                and result.dtype == torch.float32):
            return result.to(self.dtype)
        return result


def build_export_view(model: nn.Module, float_dtype: torch.dtype = torch.float32, int4_block: int = 0) -> ExportGraph:
    """The export view of a fake-quant ``model`` (a copy; ``model`` is untouched).

    ``int4_block`` (64 or 128) writes 4-bit symmetric linear weights as int4 blocks (trt-int4);
    0 writes every weight as int8 codes.

    Raises:
        ValueError: a quantizer without bounds, outside the layers quantize_model creates, or (with
            ``int4_block``) a linear weight quantizer that is not 4-bit symmetric.

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> import calib
    >>> lr = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(model, forward_loop=lambda m: m(lr))
    >>> view = build_export_view(qmodel)
    >>> torch.equal(view(lr), qmodel(lr))
    True
    """
    if int4_block and int4_block not in INT4_BLOCKS:
        raise ValueError(f"int4 block size must be one of {INT4_BLOCKS}, got {int4_block}")
    view = copy.deepcopy(model).float().eval()
    replaced = 0
    for parent in list(view.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, child_name, ExportLinear(child, int4_block))
            elif isinstance(child, QuantMatMul):
                setattr(parent, child_name, ExportMatMul(child))
            elif isinstance(child, QuantConv2d):
                setattr(parent, child_name, ExportConv2d(child))
            else:
                continue
            replaced += 1
    left = [module.name for module in view.modules() if isinstance(module, Quantizer)]
    if left:
        raise ValueError(f"quantizers outside QuantLinear/QuantMatMul/QuantConv2d cannot be exported: {left[:5]}")
    log.info("export view: %d quantized layers replaced", replaced)
    for parameter in view.parameters():
        parameter.requires_grad_(False)
    return ExportGraph(view.to(float_dtype), float_dtype).eval()
