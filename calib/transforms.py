"""The calibration pipeline's exact transforms (beyond 2DQuant), as ``2dq-calibrate`` runs them.

Order on a quantized model: find smoothing groups and shift sites on one calibration patch ->
add smoothing, set its factors by SmoothQuant's rule -> add shifts (offset 0) -> the method sets the
bounds (DOBI, MinMax, ...) -> :func:`finish_transforms` makes each shifted grid exactly the one the
bounds describe (:func:`calib.shift.init_shifts`) -> DQC trains bounds, factors and offsets together
-> the artifact stores them; :func:`calib.artifact.load_quantized_model` bakes them.

Options (see :func:`add_transform_arguments`): ``--smooth norm,value`` folds into LayerNorm affine
parameters and attention weights (no extra op); ``input`` adds one per-channel ``Mul`` before the input
quantizer of every linear no fold reaches (NGswin's ``qkv``/``fc1``); ``--input-shifts`` centers
those inputs per channel (one ``Sub``, :mod:`calib.input_shift`); ``--shifts`` keeps asymmetric
ranges exact through bias folds.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolchain.cli.common import UsageError

from .input_shift import add_input_shifts, init_input_shifts
from .shift import KINDS as SHIFT_KINDS
from .shift import add_shifts, find_shift_sites, init_shifts, shift_sites
from .smoothing import DEFAULT_ALPHA, GROUP_KINDS, add_smoothing, find_smoothing_groups, init_smoothquant
from toolchain.models import info_of

log = logging.getLogger(__name__)


def add_transform_arguments(group: argparse._ArgumentGroup) -> None:
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


def smoothing_kinds(text: str) -> tuple[str, ...]:
    """``--smooth`` -> group kinds (a usage error names what is unknown)."""
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


def attach_transforms(model: nn.Module, lr: torch.Tensor, forward_loop: Callable[[nn.Module], None],
                      args: argparse.Namespace) -> dict[str, Any]:
    """Detect and add the transforms ``args`` ask for (before any bound is set); returns their facts."""
    kinds = smoothing_kinds(args.smooth)
    if args.input_shifts and "input" not in kinds:
        raise UsageError("--input-shifts applies to the linears of explicit input smoothing: add input to --smooth")
    if not kinds and not args.shifts:
        return {}
    if not 0.0 <= args.smooth_alpha <= 1.0:
        raise UsageError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
    example = _example(model, lr)
    facts: dict[str, Any] = {}
    sites = find_shift_sites(model, example) if args.shifts else []  # detection runs on the unfolded model
    if kinds:
        groups = find_smoothing_groups(model, example, kinds)
        add_smoothing(model, groups)
        if groups:
            init_smoothquant(model, forward_loop, args.smooth_alpha)
        facts["smoothing"] = {"alpha": args.smooth_alpha,
                              "groups": {k: sum(g.kind == k for g in groups) for k in kinds}}
        if args.input_shifts:
            modules = dict(model.named_modules())
            paths = [g.producer for g in groups if g.kind == "input" and modules[g.producer].bias is not None]
            if paths:
                add_input_shifts(model, paths)
                init_input_shifts(model, forward_loop)
            facts["input_shifts"] = len(paths)
    if args.shifts:
        add_shifts(model, sites)
        facts["shifts"] = {k: sum(s.kind == k for s in sites) for k in SHIFT_KINDS}
    log.info("transforms: %s", facts)
    return facts


def finish_transforms(model: nn.Module) -> None:
    """After the bounds are set: give every shift the offset that makes its grid the bounds' (idempotent)."""
    if shift_sites(model):
        init_shifts(model)


def _example(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """One calibration patch cropped to the model's input multiple (detection needs no padding inside)."""
    multiple = info_of(model).multiple_of
    height, width = (size - size % multiple for size in lr.shape[-2:])
    if height == 0 or width == 0:
        raise UsageError(f"--patch-size {lr.shape[-1]} is smaller than the model's input multiple {multiple}: "
                         "transform detection needs a patch the model does not pad")
    device = next(model.parameters()).device
    return lr[:1, :, :height, :width].to(device)
