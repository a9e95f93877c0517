"""The Python API of 2dq, shaped like ModelOpt's: quantize an in-memory model with a calibration callback.

::

    import toolchain, calib, export
    from toolchain.quant import QuantConfig

    model = toolchain.load_model("DAT_light_x4.pth")            # any checkpoint spandrel loads
    def forward_loop(m):                                         # the library never owns the data loop
        for batch in patches.split(8):
            m(batch)
    qmodel = calib.quantize(model, QuantConfig(w_bits=4, a_bits=4), forward_loop)   # placement + DOBI
    calib.distill(qmodel, train_patches, calib.DQCConfig(iters=40))                # DQC (2DQuant)
    #   ... on a GPU with a resumable checkpoint: calib.DQCRun(device="cuda", checkpoint="run/dqc.safetensors")
    calib.save(qmodel, "run/w4a4.safetensors", checkpoint="DAT_light_x4.pth")
    qmodel = calib.load("DAT_light_x4.pth", "run/w4a4.safetensors")                # verified round trip
    export.export_onnx(qmodel, "run/w4a4.onnx", tile=64)                           # QDQ graph, linted

The seven ``2dq-*`` tools are command lines over the same functions (placement:
:func:`toolchain.quant.quantize_model`; methods: :mod:`calib.dobi`, :mod:`calib.baselines`; DQC:
:func:`calib.dqc.distill`; artifacts: :mod:`calib.artifact`; export: :mod:`export.onnx_export`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from toolchain.quant import QuantConfig, quantize_model

from .artifact import load_quantized_model, save_artifact
from .baselines import calibrate_minmax, calibrate_percentile
from .dobi import calibrate_dobi
from .distributed import DistContext
from .dqc import DQCConfig, DQCResult
from .dqc import distill as _distill
from .dqc_run import DQCRun, require_config
from .transforms import TransformsConfig, attach_transforms, finish_transforms

ForwardLoop = Callable[[nn.Module], None]
#: bound-setting methods of :func:`quantize` (2DQuant = ``"dobi"`` then :func:`distill`)
METHODS = ("dobi", "minmax", "percentile")
#: where :func:`quantize` records what the model was quantized with (read by :func:`save`)
RECORD_ATTRIBUTE = "_twodq_quantized"


class _FirstInput(Exception):
    """Stops a forward loop once its first model input is seen (placement needs one input)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__("first input captured")
        self.x = x


def quantize(model: nn.Module, config: QuantConfig = QuantConfig(), forward_loop: Optional[ForwardLoop] = None,
             *, method: str = "dobi", example: Optional[torch.Tensor] = None,
             transforms: Optional[TransformsConfig] = None, **method_options: Any) -> nn.Module:
    """Place quantizers on ``model`` (in place) and set their bounds from ``forward_loop(model)``.

    ``forward_loop`` runs calibration data through the model it is given (32 LR patches as the paper).
    Placement traces one input: ``example``, else the first input ``forward_loop`` feeds (the loop is
    stopped there and run again in full for calibration). ``method``: ``"dobi"`` (default; options
    ``candidates``, ``mode``, ``bins``), ``"minmax"``, ``"percentile"`` (``percentile``, ``bins``), or
    None to place only. ``transforms``: the exact transforms beyond 2DQuant
    (:class:`calib.transforms.TransformsConfig`: smoothing, shifts; ``2dq-calibrate --smooth/--shifts``),
    detected on ``example`` and set from ``forward_loop`` before the bounds. Returns ``model``.

    Raises ``ValueError`` for an unknown method, a loop that never calls the model, or a config that
    selects nothing in it; ``TypeError`` for ``transforms`` that is not a ``TransformsConfig``.

    >>> from toolchain.models.examples import tiny_swinir
    >>> from calib.transforms import TransformsConfig
    >>> lr = torch.rand(4, 3, 16, 16)
    >>> qmodel = quantize(tiny_swinir(), forward_loop=lambda m: m(lr),
    ...                   transforms=TransformsConfig(smooth=("norm", "value"), shifts=True))
    >>> sorted(qmodel.__dict__[RECORD_ATTRIBUTE]["method_options"]["transforms"])
    ['shifts', 'smoothing']
    """
    if transforms is not None:
        require_config("quantize", "transforms", transforms, TransformsConfig)
    if method is not None and method not in METHODS:
        raise ValueError(f"quantize: method must be one of {METHODS} or None, got {method!r}")
    if method is not None and forward_loop is None:
        raise ValueError("quantize: a forward_loop is needed to calibrate (or method=None to place only)")
    if example is None:
        from toolchain.models.info import INFO_ATTRIBUTE, example_input

        if INFO_ATTRIBUTE in model.__dict__:
            example = example_input(model)
        elif forward_loop is not None:
            example = _first_input(model, forward_loop)
        else:
            raise ValueError(f"quantize: {type(model).__name__} carries no SR model description; pass example= or a "
                             "forward_loop")
    quantize_model(model, config, example)
    model.__dict__[RECORD_ATTRIBUTE] = {"quant_config": config, "method": method, "method_options": method_options}
    if transforms is not None and transforms.enabled:
        if forward_loop is None:
            raise ValueError("quantize: transforms need a forward_loop (their statistics come from it)")
        method_options["transforms"] = attach_transforms(model, example, forward_loop, transforms)
    if method == "dobi":
        calibrate_dobi(model, forward_loop, **_method_only(method_options))
    elif method == "minmax":
        calibrate_minmax(model, forward_loop)
    elif method == "percentile":
        calibrate_percentile(model, forward_loop, **_method_only(method_options))
    finish_transforms(model)  # each shifted grid becomes exactly the one its bounds describe
    return model


def _method_only(options: dict[str, Any]) -> dict[str, Any]:
    """The options a calibration method takes (the record also holds the transforms' facts)."""
    return {key: value for key, value in options.items() if key != "transforms"}


def _first_input(model: nn.Module, forward_loop: ForwardLoop) -> torch.Tensor:
    def capture(module: nn.Module, args: tuple) -> None:
        raise _FirstInput(args[0].detach().clone())

    handle = model.register_forward_pre_hook(capture)
    try:
        forward_loop(model)
    except _FirstInput as found:
        return found.x[:1]
    finally:
        handle.remove()
    raise ValueError("quantize: forward_loop never called the model")


def distill(qmodel: nn.Module, train_patches: Union[torch.Tensor, Sequence], config: DQCConfig = DQCConfig(),
            run: DQCRun = DQCRun(), *, val_batch: Optional[torch.Tensor] = None,
            teacher: Optional[nn.Module] = None, progress: bool = True) -> DQCResult:
    """DQC: train the bounds of a calibrated ``qmodel`` by distillation from its float self (or ``teacher``).

    ``train_patches``: LR patches ``(N, 3, h, w)`` (a tensor) or any sequence of them; iteration ``t``
    draws its batch by a seeded permutation. ``config``: the frozen :class:`DQCConfig`; ``run``: the
    frozen :class:`~calib.dqc_run.DQCRun` (device, threads, checkpoint file, resume; one process).
    The same configs drive ``2dq-calibrate --method 2dquant`` (:func:`calib.dqc_run.run_dqc`, which
    draws the patches from image files itself). In place; returns what the run did.

    >>> import argparse
    >>> distill(torch.nn.Linear(2, 2), torch.rand(4, 3, 8, 8), argparse.Namespace(dqc_iters=2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: distill: config must be a DQCConfig, got Namespace (command-line options become configs in one place ...)
    """
    require_config("distill", "config", config, DQCConfig)
    require_config("distill", "run", run, DQCRun)
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    record = qmodel.__dict__.get(RECORD_ATTRIBUTE)
    if record is not None:
        record["method"] = f"{record['method']}+dqc" if record["method"] == "dobi" else record["method"]
        record["method_options"] = {**record["method_options"], "dqc": config.to_dict()}
    return _distill(qmodel, train_patches, config, val_batch=val_batch, teacher=teacher, progress=progress,
                    checkpoint_path=run.checkpoint, resume=run.resume,
                    context=DistContext(device=torch.device(run.device)))


def save(qmodel: nn.Module, path: Union[str, os.PathLike], *, checkpoint: Union[str, os.PathLike],
         calibration: Optional[dict[str, Any]] = None, weights: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write ``qmodel``'s bounds (and folds) as an artifact at ``path`` (``.safetensors`` + ``.json``).

    ``checkpoint``: the float checkpoint file ``qmodel`` was loaded from (its hash pairs them). ``weights``: new
    float weights by parameter name to store with them (:attr:`calib.dqc.DQCResult.refined` after DQC with
    ``DQCConfig(rounding=True)``).
    """
    record = qmodel.__dict__.get(RECORD_ATTRIBUTE)
    if record is None:
        raise ValueError(f"save: {type(qmodel).__name__} was not quantized by calib.quantize")
    method = {"dobi+dqc": "2dquant"}.get(record["method"], record["method"] or "none")
    return save_artifact(path, qmodel, checkpoint=checkpoint, quant_config=record["quant_config"], method=method,
                         method_options=record["method_options"], calibration=calibration, weights=weights)


def load(checkpoint: Union[str, os.PathLike], artifact: Union[str, os.PathLike],
         device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The fake-quant model of ``checkpoint`` + ``artifact`` (hashes and quantizer names checked)."""
    return load_quantized_model(checkpoint, artifact, device=device)
