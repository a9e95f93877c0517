"""The calibration pipeline's exact transforms (beyond 2DQuant), as ``2dq-calibrate`` runs them.

Order on a quantized model: find smoothing groups, folded rotations and shift sites on one calibration
patch -> add smoothing, set its factors by SmoothQuant's rule -> add the rotations (folded per head,
then explicit) -> input shifts -> add shifts (offset 0; those that fold into a rotated tensor are left
out) -> the method sets the
bounds (DOBI, MinMax, ...) -> :func:`finish_transforms` makes each shifted grid exactly the one the
bounds describe (:func:`calib.transforms.shift.init_shifts`) -> DQC trains bounds, factors and
offsets together -> the artifact stores them; :func:`calib.artifact.load_quantized_model` bakes them.

What to add is a :class:`TransformsConfig`; :func:`transforms_config_from_args` is the one place the
command line's options (:func:`add_transform_arguments`) map to it. ``--smooth norm,value`` folds
into LayerNorm affine parameters and attention weights (no extra op); ``input`` adds one per-channel
``Mul`` before the input quantizer of every linear no fold reaches (NGswin's ``qkv``/``fc1``);
``--input-shifts`` centers those inputs per channel (one ``Sub``,
:mod:`calib.transforms.input_shift`); ``--shifts`` keeps asymmetric ranges exact through bias folds;
``--rotate inputs`` rotates the input of every input-quantized linear by an orthogonal (Hadamard)
matrix (one constant ``MatMul``, :mod:`calib.transforms.rotation`); ``--rotate qk,value`` rotates
attention operands per head, folded into the weights (:mod:`calib.transforms.rotation_fold`).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolchain.cli.common import UsageError
from toolchain.models import info_of

from .hadamard import KINDS as MATRIX_KINDS
from .input_shift import add_input_shifts, init_input_shifts
from .rotation import KINDS as INPUT_KINDS
from .rotation import add_rotations, conflicting_shift_sites, find_rotation_sites, rotation_summary
from .rotation_fold import KINDS as FOLDED_ROTATE_KINDS
from .rotation_fold import add_folded_rotations, find_folded_rotations
from .rotation_fold import conflicting_shift_sites as folded_conflicts
from .shift import KINDS as SHIFT_KINDS
from .shift import add_shifts, find_shift_sites, init_shifts, shift_sites
from .smoothing import DEFAULT_ALPHA, GROUP_KINDS, add_smoothing, find_smoothing_groups, init_smoothquant

log = logging.getLogger(__name__)

#: ``--rotate`` kinds: explicit input rotations, then the folds per attention head
ROTATE_KINDS = INPUT_KINDS + FOLDED_ROTATE_KINDS


@dataclass(frozen=True)
class TransformsConfig:
    """Which transforms :func:`attach_transforms` adds (the default: none).

    ``smooth``: smoothing group kinds from :data:`~calib.transforms.smoothing.GROUP_KINDS` (a list is
    kept as a tuple, repeats dropped); ``alpha``: SmoothQuant's migration strength in ``[0, 1]``;
    ``shifts``: exact asymmetric grids through bias folds; ``input_shifts``: center the inputs of the
    ``"input"`` smoothing groups per channel (needs ``"input"`` in ``smooth``); ``rotate``: rotation
    kinds from :data:`ROTATE_KINDS` (``"inputs"``: explicit, :mod:`.rotation`; ``"qk"``, ``"value"``:
    folded per attention head, :mod:`.rotation_fold`), with matrices of kind
    ``rotation`` (:data:`~calib.transforms.hadamard.KINDS`) from ``rotation_seed``, on the linears whose
    paths match a pattern of ``rotate_only`` (fnmatch; empty: all). ``ValueError`` names the option (as
    ``2dq-calibrate`` spells it) of a bad value.

    >>> TransformsConfig(smooth=["norm", "value", "norm"], shifts=True)
    TransformsConfig(smooth=('norm', 'value'), alpha=0.5, shifts=True, input_shifts=False, rotate=(), \
rotation='hadamard', rotation_seed=0, rotate_only=())
    >>> TransformsConfig(input_shifts=True)
    Traceback (most recent call last):
    ...
    ValueError: --input-shifts applies to the linears of explicit input smoothing: add input to --smooth
    """

    smooth: tuple[str, ...] = ()
    alpha: float = DEFAULT_ALPHA
    shifts: bool = False
    input_shifts: bool = False
    rotate: tuple[str, ...] = ()
    rotation: str = "hadamard"
    rotation_seed: int = 0
    rotate_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.smooth, str):
            raise ValueError(f"--smooth: a sequence of kinds from {', '.join(GROUP_KINDS)}, got the string "
                             f"{self.smooth!r}")
        object.__setattr__(self, "smooth", tuple(dict.fromkeys(self.smooth)))
        for kind in self.smooth:
            if kind not in GROUP_KINDS:
                raise ValueError(f"--smooth: unknown kind {kind!r}; choose from {', '.join(GROUP_KINDS)}")
        if self.input_shifts and "input" not in self.smooth:
            raise ValueError("--input-shifts applies to the linears of explicit input smoothing: add input to --smooth")
        if not 0.0 <= self.alpha <= 1.0:  # NaN fails too
            raise ValueError(f"--smooth-alpha must be in [0, 1], got {self.alpha}")
        for name, value in (("rotate", self.rotate), ("rotate_only", self.rotate_only)):
            if isinstance(value, str):
                raise ValueError(f"--{name.replace('_', '-')}: a sequence, got the string {value!r}")
            object.__setattr__(self, name, tuple(dict.fromkeys(value)))
        for kind in self.rotate:
            if kind not in ROTATE_KINDS:
                raise ValueError(f"--rotate: unknown kind {kind!r}; choose from {', '.join(ROTATE_KINDS)}")
        if self.rotation not in MATRIX_KINDS:
            raise ValueError(f"--rotation: unknown matrix {self.rotation!r}; choose from {', '.join(MATRIX_KINDS)}")
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int) or self.rotation_seed < 0:
            raise ValueError(f"--rotation-seed must be a non-negative integer, got {self.rotation_seed!r}")
        if self.rotate_only and "inputs" not in self.rotate:
            raise ValueError("--rotate-only selects among rotated linears: add --rotate inputs")

    @property
    def enabled(self) -> bool:
        """Whether any transform is asked for (input shifts need input smoothing)."""
        return bool(self.smooth) or self.shifts or bool(self.rotate)


def add_transform_arguments(group: argparse._ArgumentGroup) -> None:
    """The command line's transform options (:func:`transforms_config_from_args` reads them)."""
    group.add_argument("--smooth", default="", metavar="KINDS",
                       help="channel smoothing, comma-separated from norm (LayerNorm -> linears, folded), value "
                       "(attention v -> out-projection, folded), input (linears no fold reaches: one Mul in the "
                       "graph); 'folded' = norm,value; 'all' = all three (default: none)")
    group.add_argument("--smooth-alpha", type=float, default=DEFAULT_ALPHA,
                       help="SmoothQuant migration strength: s = max|X|^a / max|W|^(1-a) (default: %(default)s)")
    group.add_argument("--shifts", action="store_true",
                       help="exact asymmetric activation grids where the shift folds into biases "
                       f"({', '.join(SHIFT_KINDS)})")
    group.add_argument("--input-shifts", action="store_true",
                       help="with --smooth input: also center each channel of those linears' inputs by a learned "
                       "offset (one Sub after the Mul in the graph; the bias carries it back)")
    group.add_argument("--rotate", default="", metavar="KINDS",
                       help="exact orthogonal rotations, comma-separated from inputs (the input of every "
                       "input-quantized linear times R, its weight times R: one constant MatMul before the input's "
                       "Q/DQ in the graph), qk (q and k of an attention rotated per head, folded into the qkv "
                       "weights), value (v per head, folded into qkv and the out-projection); 'folded' = qk,value; "
                       "'all' = all three (default: none)")
    group.add_argument("--rotation", choices=MATRIX_KINDS, default="hadamard",
                       help="the rotation matrices: normalized Hadamard (Sylvester/Paley; a random orthogonal "
                       "matrix where no construction reaches the width), Hadamard with random signs, or random "
                       "orthogonal (default: %(default)s)")
    group.add_argument("--rotation-seed", type=int, default=0,
                       help="seed of random signs / random matrices (linear i uses seed + i) (default: %(default)s)")
    group.add_argument("--rotate-only", default="", metavar="PATTERNS",
                       help="with --rotate: comma-separated fnmatch patterns of the linears to rotate, e.g. "
                       "'*.ffn.fc2' (default: every input-quantized linear)")


def smoothing_kinds(text: str) -> tuple[str, ...]:
    """``--smooth`` -> group kinds (a usage error names what is unknown).

    >>> smoothing_kinds("folded,input,norm")
    ('norm', 'value', 'input')
    """
    aliases = {"folded": ("norm", "value"), "all": GROUP_KINDS}
    kinds: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        for kind in aliases.get(item, (item,)):
            if kind not in GROUP_KINDS:
                raise UsageError(f"--smooth: unknown kind {kind!r}; choose from {', '.join(GROUP_KINDS)}, "
                                 "folded, all")
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


def transforms_config_from_args(args: argparse.Namespace) -> TransformsConfig:
    """The :class:`TransformsConfig` of :func:`add_transform_arguments`' options (a bad one: ``UsageError``).

    >>> parser = argparse.ArgumentParser()
    >>> add_transform_arguments(parser.add_argument_group("transforms"))
    >>> transforms_config_from_args(parser.parse_args(["--smooth", "all", "--input-shifts", "--rotate", "inputs"]))
    TransformsConfig(smooth=('norm', 'value', 'input'), alpha=0.5, shifts=False, input_shifts=True, \
rotate=('inputs',), rotation='hadamard', rotation_seed=0, rotate_only=())
    """
    kinds = smoothing_kinds(args.smooth)
    try:
        return TransformsConfig(smooth=kinds, alpha=args.smooth_alpha, shifts=args.shifts,
                                input_shifts=args.input_shifts, rotate=rotate_kinds(args.rotate), rotation=args.rotation,
                                rotation_seed=args.rotation_seed, rotate_only=_items(args.rotate_only))
    except ValueError as err:
        raise UsageError(str(err)) from None


def attach_transforms(model: nn.Module, lr: torch.Tensor, forward_loop: Callable[[nn.Module], None],
                      config: TransformsConfig) -> dict[str, Any]:
    """Detect and add the transforms ``config`` asks for (before any bound is set); returns their facts.

    ``lr``: calibration patches ``(N, 3, h, w)``; the first one, cropped to the model's input
    multiple, is the detection input. ``forward_loop`` feeds the float statistics of SmoothQuant and
    of the input shifts.

    >>> from toolchain.models.examples import tiny_swinir
    >>> from toolchain.quant import QuantConfig, quantize_model
    >>> from calib.observers import batch_forward_loop
    >>> model = quantize_model(tiny_swinir(), QuantConfig())
    >>> lr = torch.rand(4, 3, 16, 16)
    >>> config = TransformsConfig(smooth=("norm",), shifts=True)
    >>> attach_transforms(model, lr, batch_forward_loop(lr, progress=False), config)
    {'smoothing': {'alpha': 0.5, 'groups': {'norm': 2}}, 'shifts': {'norm_output': 2, 'attn_value': 1, 'attn_key': 1}}
    """
    if not isinstance(config, TransformsConfig):
        raise TypeError(f"attach_transforms: config must be a TransformsConfig, got {type(config).__name__} "
                        "(command-line options map to one through transforms_config_from_args)")
    if not config.enabled:
        return {}
    example = _example(model, lr)
    facts: dict[str, Any] = {}
    sites = find_shift_sites(model, example) if config.shifts else []  # detection runs on the unfolded model
    groups = find_smoothing_groups(model, example, config.smooth) if config.smooth else []
    folded_kinds = tuple(k for k in config.rotate if k in FOLDED_ROTATE_KINDS)
    folded = find_folded_rotations(model, example, folded_kinds, config.rotation, config.rotation_seed) \
        if folded_kinds else []
    if config.smooth:
        add_smoothing(model, groups)
        if groups:
            init_smoothquant(model, forward_loop, config.alpha)
        facts["smoothing"] = {"alpha": config.alpha,
                              "groups": {k: sum(g.kind == k for g in groups) for k in config.smooth}}
    if config.rotate:  # after smoothing ((W * s) M R), folded before explicit, before the input shifts (of x R)
        add_folded_rotations(model, folded)
        rotations = []
        if "inputs" in config.rotate:
            try:
                rotations = find_rotation_sites(model, config.rotation, config.rotation_seed, config.rotate_only)
            except ValueError as err:
                raise UsageError(f"--rotate-only: {err}") from None
            add_rotations(model, rotations)
        facts["rotation"] = {**rotation_summary(rotations),
                             "folded": {k: sum(g.kind == k for g in folded) for k in folded_kinds}}
        if config.shifts:
            dropped = conflicting_shift_sites(model, sites, [r.linear for r in rotations]) + \
                folded_conflicts(sites, folded)
            sites = [s for s in sites if s not in dropped]
            facts["rotation"]["shift_sites_dropped"] = len({s.name for s in dropped})
            log.info("rotation: %d shift sites fold into rotated tensors and are left out",
                     facts["rotation"]["shift_sites_dropped"])
    if config.input_shifts:
        modules = dict(model.named_modules())
        paths = [g.producer for g in groups if g.kind == "input" and modules[g.producer].bias is not None]
        if paths:
            add_input_shifts(model, paths)
            init_input_shifts(model, forward_loop)
        facts["input_shifts"] = len(paths)
    if config.shifts:
        add_shifts(model, sites)
        facts["shifts"] = {k: sum(s.kind == k for s in sites) for k in SHIFT_KINDS}
    log.info("transforms: %s", facts)
    return facts


def finish_transforms(model: nn.Module) -> None:
    """After the bounds are set: give every shift the offset that makes its grid the bounds' (idempotent)."""
    if shift_sites(model):
        init_shifts(model)


def rotate_kinds(text: str) -> tuple[str, ...]:
    """``--rotate`` -> kinds (aliases ``folded``, ``all``; unknown kinds are left for the config to name).

    >>> rotate_kinds("folded,inputs")
    ('qk', 'value', 'inputs')
    """
    aliases = {"folded": FOLDED_ROTATE_KINDS, "all": ROTATE_KINDS}
    return tuple(dict.fromkeys(k for item in _items(text) for k in aliases.get(item, (item,))))


def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _example(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """One calibration patch cropped to the model's input multiple (detection needs no padding inside)."""
    multiple = info_of(model).multiple_of
    height, width = (size - size % multiple for size in lr.shape[-2:])
    if height == 0 or width == 0:
        raise UsageError(f"--patch-size {lr.shape[-1]} is smaller than the model's input multiple {multiple}: "
                         "transform detection needs a patch the model does not pad")
    device = next(model.parameters()).device
    return lr[:1, :, :height, :width].to(device)
