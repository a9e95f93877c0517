"""What to quantize and how: one frozen, validated, JSON-serializable config.

A :class:`QuantConfig` travels with every calibration artifact (its ``to_dict()`` goes into the JSON
sidecar), so reading one back must reproduce exactly the quantizers that were calibrated.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from . import grid

GRANULARITIES = ("per-tensor", "per-channel")
#: what ``quantize`` may select: attention/MLP linears, attention matmuls, convolutions
SELECTABLE = ("linear", "matmul", "conv")
TARGETS = ("trt-int8", "trt-int4", "ort")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths, weight granularity, selection and export target of a quantized model.

    - ``w_bits`` / ``a_bits``: weight and activation widths, 2..8 each (they may differ).
    - ``weight_granularity``: ``"per-tensor"`` (the paper) or ``"per-channel"`` (per output channel).
    - ``quantize``: any of ``"linear"`` (inputs and weights of the attention and MLP linears),
      ``"matmul"`` (both operands of every attention matmul), ``"conv"`` (inputs and weights of
      every ``nn.Conv2d``).
    - ``include`` / ``exclude``: fnmatch patterns on quantizer names (``"*.attn.qkv.*"``), applied
      after ``quantize``; an empty ``include`` keeps everything.
    - ``target``: ``"trt-int8"``, ``"trt-int4"`` (needs ``w_bits == 4``; weights symmetric,
      zero point 8) or ``"ort"``.
    - ``bits_overrides``: mixed precision, ``"PATTERN=BITS"`` entries: the quantizers whose names
      match the fnmatch pattern take ``BITS`` instead of ``w_bits`` / ``a_bits`` (the last matching
      entry wins; ``"encoder_layer1.*=8"`` keeps a sensitive stage at 8 bits). Each pattern must
      match a quantizer. Not with ``trt-int4``, whose weights are all 4-bit.

    >>> QuantConfig(w_bits=4, a_bits=8).weight_symmetric
    False
    >>> QuantConfig.from_dict(QuantConfig(target="trt-int4").to_dict()).weight_symmetric
    True
    >>> QuantConfig(w_bits=8).weight_symmetric   # an 8-bit grid is symmetric anyway (grid.step_and_zero_point)
    False
    """

    w_bits: int = 4
    a_bits: int = 4
    weight_granularity: str = "per-tensor"
    quantize: tuple[str, ...] = ("linear", "matmul")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target: str = "trt-int8"
    bits_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("w_bits", "a_bits"):
            try:
                grid.check_bits(getattr(self, field))
            except ValueError as err:
                raise ValueError(f"QuantConfig.{field}: {err}") from None
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantConfig.weight_granularity must be one of {GRANULARITIES}, "
                f"got {self.weight_granularity!r}"
            )
        # JSON gives lists; the frozen config holds tuples so that it stays hashable and comparable
        for field in ("quantize", "include", "exclude", "bits_overrides"):
            object.__setattr__(self, field, _string_tuple(field, getattr(self, field)))
        if not self.quantize:
            raise ValueError(f"QuantConfig.quantize must select at least one of {SELECTABLE}")
        unknown = [name for name in self.quantize if name not in SELECTABLE]
        if unknown:
            raise ValueError(f"QuantConfig.quantize: unknown {unknown}, expected a subset of {SELECTABLE}")
        if len(set(self.quantize)) != len(self.quantize):
            raise ValueError(f"QuantConfig.quantize lists an entry twice: {self.quantize}")
        if self.target not in TARGETS:
            raise ValueError(f"QuantConfig.target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "trt-int4" and self.w_bits != 4:
            raise ValueError(f"QuantConfig.target 'trt-int4' needs w_bits == 4, got w_bits={self.w_bits}")
        self.overrides()  # validates the entries
        if self.bits_overrides and self.target == "trt-int4":
            raise ValueError("QuantConfig.bits_overrides: not with target 'trt-int4' (its weights are all 4-bit)")

    def overrides(self) -> list[tuple[str, int]]:
        """``bits_overrides`` parsed: ``[(pattern, bits), ...]`` in order.

        >>> QuantConfig(bits_overrides=("encoder_layer1.*=8",)).overrides()
        [('encoder_layer1.*', 8)]
        """
        parsed = []
        for entry in self.bits_overrides:
            pattern, sep, bits = entry.rpartition("=")
            if not sep or not pattern or not bits.strip().isdigit():
                raise ValueError(f"QuantConfig.bits_overrides: {entry!r} is not PATTERN=BITS (e.g. 'encoder_layer1.*=8')")
            try:
                parsed.append((pattern.strip(), grid.check_bits(int(bits))))
            except ValueError as err:
                raise ValueError(f"QuantConfig.bits_overrides {entry!r}: {err}") from None
        return parsed

    def bits_for(self, name: str, kind: str) -> int:
        """Bits of the quantizer ``name`` of ``kind`` (``"weight"`` / ``"activation"``), overrides applied."""
        bits = self.w_bits if kind == "weight" else self.a_bits
        for pattern, override in self.overrides():
            if fnmatch.fnmatchcase(name, pattern):
                bits = override
        return bits

    @property
    def weight_only(self) -> bool:
        """Whether only weights are quantized: trt-int4, whose INT4 is weight-only (float16 activations)."""
        return self.target == "trt-int4"

    @property
    def weight_symmetric(self) -> bool:
        """Whether the target forces symmetric weight grids (``z = 2^(b-1)``): trt-int4's INT4 weights.

        The one place this rule lives; an 8-bit grid is symmetric whatever this says, because no other
        8-bit grid fits INT8 (:func:`toolchain.quant.grid.step_and_zero_point`, :class:`Quantizer`),
        so with ``bits_overrides`` each quantizer's own width decides that part.
        """
        return self.target == "trt-int4"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) that :meth:`from_dict` reads back to an equal config."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Config from :meth:`to_dict` output; unknown keys are an error, missing keys take defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"QuantConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantConfig: unknown keys {unknown}, expected a subset of {sorted(known)}")
        return cls(**data)


def _string_tuple(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"QuantConfig.{field} must be a list or tuple of strings, got {value!r}")
    if not all(isinstance(item, str) for item in value):
        raise TypeError(f"QuantConfig.{field} must contain only strings, got {value!r}")
    return tuple(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
