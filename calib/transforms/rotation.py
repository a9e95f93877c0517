"""Exact orthogonal rotations of a linear's input: one constant ``MatMul`` before its quantizer.

For an input-quantized linear ``y = x W^T + b`` (``x`` ``(..., C)``, ``W`` ``(C_out, C)``) and an
orthogonal ``R`` ``(C, C)`` (``R R^T = I``), the linear computes ``x R`` before its input quantizer
(``QuantLinear.input_rotation``) and multiplies with ``W R``: ``(x R)(W R)^T = x W^T``, so the float
model is unchanged up to fp32 rounding. The activation quantizer sees ``x R``: with a normalized
Hadamard ``R`` (:mod:`calib.transforms.hadamard`) every channel of ``x R`` is an equal-weight mix of
all channels of ``x``, so a few outlier channels no longer set a per-tensor grid that wastes its
levels on the others (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024). The weight
quantizer sees ``W R``, whose input columns are mixed the same way.

The deployed graph carries one ``MatMul`` with a constant float ``(C, C)`` matrix before the input's
``QuantizeLinear`` (float, like the smoothing ``Mul``; the integer ``MatMul`` keeps its Q/DQ on both
inputs), and the baked weight ``W R``. Nothing is folded into the producer of ``x``: a LayerNorm's
output cannot absorb a channel-mixing matrix, and DAT's residual stream also feeds convolutions.

Composition with the other transforms of a linear (all exact, in this order inside the linear:
multiplier, rotation, offset, quantizer):

- smoothing (:mod:`.smoothing`, every kind): the linear reads ``x / s`` (folded upstream or its own
  ``input_multiplier``) and its weight is ``(W * s) R``; smoothing must be added first
  (:func:`~calib.transforms.smoothing.add_smoothing` refuses a rotated linear);
- input shifts (:mod:`.input_shift`): the offset is subtracted from ``x R`` and ``W_q c`` (``W_q`` the
  quantized ``W R``) goes back through the bias, which stays exact; offsets are set in the rotated frame;
- shifts folded into biases (:mod:`.shift`, ``norm_output`` / ``attn_value``): not exact, since the bias
  fold ``c W_q 1`` would need ``c W_q R^T 1``, and the shift would no longer make the rotated quantizer's
  grid exact anyway. :func:`add_rotations` refuses a linear whose bias carries such a fold, and
  :func:`conflicting_shift_sites` names the sites to leave out (``2dq-calibrate --shifts --rotate``
  drops them and records how many).

``R`` is a buffer owned by the fold (:class:`InputRotation`); :mod:`.registry` stores it in the
artifact (``rotation.<linear>.matrix``), DQC does not train it, and
:func:`~calib.transforms.fold.bake_transforms` writes ``W R`` and ``R`` into plain tensors.

>>> from toolchain.models.examples import tiny_swinir
>>> from toolchain.quant import QuantConfig, float_mode, quantize_model
>>> model = quantize_model(tiny_swinir(), QuantConfig())
>>> x = torch.rand(1, 3, 16, 16)
>>> with float_mode(model):
...     before = model(x)
>>> sites = find_rotation_sites(model)
>>> len(sites), sites[0].construction
(4, 'hadamard(paley1-11)')
>>> _ = add_rotations(model, sites)
>>> with float_mode(model):
...     torch.allclose(model(x), before, atol=1e-5)
True
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.quant import QuantLinear

from .fold import FoldParametrization, _fold_modules, _folds, _module
from .hadamard import KINDS as MATRIX_KINDS
from .hadamard import rotation_matrix
from .shift import AddFoldedOffset, ShiftSite

log = logging.getLogger(__name__)

#: what ``--rotate`` selects: ``inputs`` = an explicit rotation of every (selected) input-quantized linear
KINDS = ("inputs",)


@dataclass(frozen=True)
class RotationSite:
    """The input rotation of one linear: ``R`` of kind ``matrix`` (:data:`~calib.transforms.hadamard.KINDS`)
    from ``seed``; ``construction`` says what was built (e.g. ``hadamard(paley1-59)``)."""

    linear: str
    matrix: str = "hadamard"
    seed: int = 0
    construction: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"linear": self.linear, "matrix": self.matrix, "seed": self.seed, "construction": self.construction}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RotationSite:
        site = RotationSite(str(data["linear"]), str(data["matrix"]), int(data["seed"]), str(data["construction"]))
        if site.matrix not in MATRIX_KINDS:
            raise ValueError(f"rotation {site.linear}: matrix must be one of {MATRIX_KINDS}, got {site.matrix!r}")
        return site


class InputRotation(FoldParametrization):
    """``QuantLinear.input_rotation`` ``(C, C)`` -> ``matrix``; owns the buffer ``matrix`` (``R``)."""

    def __init__(self, matrix: torch.Tensor, site: RotationSite) -> None:
        super().__init__()
        self.site = site
        self.register_buffer("matrix", matrix)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.matrix


class RotateColumns(FoldParametrization):
    """The same linear's weight ``(C_out, C)`` -> ``W @ R`` (``R``: its :class:`InputRotation`'s matrix)."""

    def __init__(self, owner: InputRotation) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # a reference, not a submodule: one state entry per R

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # torch.mm, not @: the model's matmul router counts @ calls of the attention that holds the linear
        return torch.mm(weight, self.owner.matrix)

    def unfold(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse, ``W R R^T`` (GPTQ writes a weight through it)."""
        return torch.mm(weight, self.owner.matrix.t())


def find_rotation_sites(model: nn.Module, matrix: str = "hadamard", seed: int = 0,
                        only: Iterable[str] = ()) -> list[RotationSite]:
    """One site per input-quantized linear of ``model`` whose path matches a pattern of ``only`` (fnmatch;
    empty: every one), in module order; linear ``i`` of the list uses seed ``seed + i`` (random kinds)."""
    if matrix not in MATRIX_KINDS:
        raise ValueError(f"rotation matrix must be one of {MATRIX_KINDS}, got {matrix!r}")
    patterns = tuple(only)
    paths = [path for path, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_quantizer is not None
             and (not patterns or any(fnmatch.fnmatchcase(path, p) for p in patterns))]
    if patterns and not paths:
        raise ValueError(f"rotation: no input-quantized linear matches {list(patterns)}")
    modules = dict(model.named_modules())
    sites = []
    for index, path in enumerate(paths):
        _, construction = rotation_matrix(modules[path].in_features, matrix, seed + index)
        sites.append(RotationSite(path, matrix, seed + index, construction))
    log.info("rotation: %d linears (%s)", len(sites), dict(Counter(s.construction for s in sites)))
    return sites


def add_rotations(model: nn.Module, sites: Iterable[RotationSite]) -> dict[str, torch.Tensor]:
    """Give each site's linear its rotation ``R`` (built from the site); returns the matrices by linear path.

    Add smoothing before rotations; shifts folded into the linear's bias are refused (see the module
    docstring). ``ValueError`` names the linear.
    """
    modules = dict(model.named_modules())
    made: dict[str, torch.Tensor] = {}
    for site in sites:
        linear = _module(modules, site.linear, QuantLinear)
        if linear.input_quantizer is None:
            raise ValueError(f"rotation: {site.linear} has no input quantizer to rotate for")
        if linear.input_rotation is not None or site.linear in made:
            raise ValueError(f"rotation: {site.linear} is already rotated")
        if linear.bias is not None and _folds(linear, "bias", AddFoldedOffset):
            raise ValueError(f"rotation: {site.linear} reads a tensor shifted through its bias (--shifts); a rotated "
                             "input does not keep that fold exact: leave the shift out (conflicting_shift_sites)")
        weight = linear.weight
        matrix, _ = rotation_matrix(linear.in_features, site.matrix, site.seed)
        matrix = matrix.to(dtype=weight.dtype, device=weight.device)
        owner = InputRotation(matrix, site)
        linear.input_rotation = torch.zeros_like(matrix)
        parametrize.register_parametrization(linear, "input_rotation", owner)
        parametrize.register_parametrization(linear, "weight", RotateColumns(owner))
        made[site.linear] = owner.matrix
    return made


def conflicting_shift_sites(model: nn.Module, sites: Iterable[ShiftSite], rotated: Iterable[str]) -> list[ShiftSite]:
    """The shift sites that fold into the bias of, or shift the input quantizer of, a linear in ``rotated``."""
    modules = dict(model.named_modules())
    rotated = set(rotated)
    quantizers = {modules[p].input_quantizer.name for p in rotated}
    return [s for s in sites if rotated & set(s.bias_folds) or quantizers & set(s.shifted)]


def rotation_owners(model: nn.Module) -> list[InputRotation]:
    """The folds that own each ``R``, in module order."""
    return [p for m in model.modules() for p in _fold_modules(m, "input_rotation", InputRotation)]


def rotation_sites(model: nn.Module) -> list[RotationSite]:
    """The rotations currently on ``model``, in module order."""
    return [p.site for p in rotation_owners(model)]


def rotation_summary(sites: list[RotationSite]) -> dict[str, Any]:
    """``{"linears": n, "matrix": kinds, "constructions": {name: count}}`` for a sidecar."""
    return {"linears": len(sites), "matrix": sorted({s.matrix for s in sites}),
            "constructions": dict(Counter(s.construction for s in sites))}
