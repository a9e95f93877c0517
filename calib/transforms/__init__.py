"""Exact transforms beyond 2DQuant: channel smoothing, folded shifts, per-channel input shifts, input rotations.

This package owns every transform that rewrites a quantized model's tensors without changing its
float output, and everything about them: finding where each one applies, adding it as a learnable
fold, setting its parameters, describing and restoring it for an artifact, baking it for export, and
the order ``2dq-calibrate`` runs them in. It imports from :mod:`toolchain` and the rest of
:mod:`calib` only (never ``export`` or ``engines``); other code imports it from here, by the names
below.

Modules, each one idea:

- :mod:`.fold`: :class:`FoldParametrization` (the base of every fold), the helpers every transform
  shares, and :func:`bake_transforms` (folds -> plain tensors, bit for bit).
- :mod:`.trace`: which tensors carry the same channels (one traced float forward), and the check
  that a fold leaves the float output unchanged.
- :mod:`.smoothing`: SmoothQuant factors folded into LayerNorms and attention weights, or one explicit
  ``Mul`` (:class:`SmoothingGroup`, :func:`init_smoothquant`).
- :mod:`.shift`: offsets folded into biases that make 2DQuant's grids exact on integer engines
  (:class:`ShiftSite`, :func:`init_shifts`, :func:`calibrate_shifts`).
- :mod:`.input_shift`: per-channel offsets before an input quantizer, one ``Sub`` in the graph.
- :mod:`.rotation`: an orthogonal (Hadamard) rotation of a linear's input, its weight rotated back,
  one constant ``MatMul`` in the graph; :mod:`.hadamard` builds the matrices.
- :mod:`.rotation_fold`: rotations per attention head folded into the qkv and out-projection weights
  (q/k, v), no op in the graph.
- :mod:`.registry`: every kind in one table (:data:`TRANSFORMS`): learnable parameters, the artifact's
  spec and state, restore. A new transform is one module plus one entry there.
- :mod:`.pipeline`: :class:`TransformsConfig` and the order the calibration runs them in
  (:func:`attach_transforms`, :func:`finish_transforms`), and the command-line options.

>>> from calib.transforms import TransformsConfig, attach_transforms, transform_parameters
>>> TransformsConfig(smooth=("norm", "value"), shifts=True).enabled
True
"""
from __future__ import annotations

from .fold import FoldParametrization, bake_transforms, quantized_weight
from .input_shift import (
    AddWeightedOffset,
    InputOffset,
    add_input_shifts,
    init_input_shifts,
    input_shift_owners,
    input_shift_parameters,
    input_shift_paths,
)
from .hadamard import hadamard_matrix, random_orthogonal, rotation_matrix
from .pipeline import (
    ROTATE_KINDS,
    TransformsConfig,
    add_transform_arguments,
    attach_transforms,
    finish_transforms,
    rotate_kinds,
    smoothing_kinds,
    transforms_config_from_args,
)
from .registry import (
    TRANSFORMS,
    TransformKind,
    load_transforms_state,
    restore_transforms,
    transform_parameters,
    transforms_spec,
    transforms_state,
)
from .rotation import (
    InputRotation,
    RotateColumns,
    RotationSite,
    add_rotations,
    conflicting_shift_sites,
    find_rotation_sites,
    rotation_owners,
    rotation_sites,
    rotation_summary,
)
from .rotation_fold import (
    FoldedRotation,
    RotateHeadColumns,
    RotateRows,
    add_folded_rotations,
    find_folded_rotations,
    folded_rotation_owners,
)
from .shift import KINDS as SHIFT_KINDS
from .shift import (
    AddFoldedOffset,
    ShiftSite,
    SubtractOffset,
    add_shifts,
    calibrate_shifts,
    find_shift_sites,
    init_shifts,
    shift_owners,
    shift_parameters,
    shift_sites,
    shifted_fake_quantize,
)
from .smoothing import (
    DEFAULT_ALPHA,
    EXPLICIT_KINDS,
    FOLDED_KINDS,
    GROUP_KINDS,
    DivideRows,
    ScaleColumns,
    SmoothingGroup,
    add_smoothing,
    find_smoothing_groups,
    init_smoothquant,
    remove_smoothing,
    smoothing_groups,
    smoothing_owners,
    smoothing_parameters,
)
from .trace import ChannelStats, Trace, trace_channels, verify_folds

__all__ = [
    "DEFAULT_ALPHA", "EXPLICIT_KINDS", "FOLDED_KINDS", "GROUP_KINDS", "ROTATE_KINDS", "SHIFT_KINDS", "TRANSFORMS",
    "AddFoldedOffset", "AddWeightedOffset", "ChannelStats", "DivideRows", "FoldParametrization", "InputOffset",
    "FoldedRotation", "InputRotation", "RotateColumns", "RotateHeadColumns", "RotateRows", "RotationSite",
    "ScaleColumns", "ShiftSite", "SmoothingGroup", "SubtractOffset", "Trace", "TransformKind", "TransformsConfig",
    "add_folded_rotations", "add_input_shifts", "add_rotations", "add_shifts", "add_smoothing", "add_transform_arguments", "attach_transforms",
    "bake_transforms", "calibrate_shifts", "conflicting_shift_sites", "find_folded_rotations", "find_rotation_sites", "find_shift_sites",
    "find_smoothing_groups", "finish_transforms", "folded_rotation_owners", "hadamard_matrix", "init_input_shifts", "init_shifts", "init_smoothquant", "input_shift_owners", "input_shift_parameters",
    "input_shift_paths", "load_transforms_state", "quantized_weight", "random_orthogonal", "remove_smoothing",
    "restore_transforms", "rotate_kinds", "rotation_matrix", "rotation_owners", "rotation_sites", "rotation_summary",
    "shift_owners", "shift_parameters", "shift_sites", "shifted_fake_quantize", "smoothing_groups",
    "smoothing_kinds", "smoothing_owners", "smoothing_parameters", "trace_channels", "transform_parameters",
    "transforms_config_from_args", "transforms_spec", "transforms_state", "verify_folds",
]
