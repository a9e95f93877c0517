"""Calibration artifacts: quantizer bounds (``.safetensors``) plus a JSON sidecar of metadata.

Path convention: the artifact is named by its bounds file, which must end in ``.safetensors``;
the sidecar sits beside it with the suffix ``.json`` (``run/w4a4.safetensors`` ->
``run/w4a4.json``). Both are written atomically (temporary file, then rename).

- bounds: one float32 tensor per bound, ``<quantizer name>.lower`` / ``<quantizer name>.upper``
  (shape ``()`` per tensor, ``(C_out, 1, ...)`` per channel), exactly
  :func:`toolchain.quant.bounds_state`; with folds (:mod:`calib.transforms`)
  also their learned parameters under ``transforms/`` (``transforms/smoothing.<group>.log_scale``,
  ``transforms/shift.<site>.offset``); with GPTQ (:mod:`calib.gptq`) or learned rounding the refined float
  weights of the linears, and with ``--reconstruct-affine`` (:mod:`calib.float_affine`) the trained biases and
  normalization affines, under ``weights/`` (``weights/<module>.weight``, ``weights/<module>.bias``: the
  checkpoint's parameter, replaced).
- sidecar: ``format_version``, ``checkpoint`` (file name) and ``checkpoint_sha256``, ``model``
  (``arch`` and ``config``), ``quant_config`` (:meth:`QuantConfig.to_dict`), ``method`` and
  ``method_options``, ``calibration`` (data folder, image count and list hash, patches, patch
  size, seed), ``versions`` (torch, numpy, 2dq), ``created`` (UTC, ISO 8601), and
  ``bounds_sha256``, the hash of the bounds file, so that a sidecar paired with another bounds
  file is refused; ``transforms`` (:func:`calib.transforms.transforms_spec`) when the model has folds.

:func:`load_quantized_model` rebuilds the fake-quant model from the float checkpoint and an
artifact, refusing a checkpoint whose SHA-256 differs from the one calibrated; refined weights are
written into the float model first, then folds are re-created, loaded and baked
(:func:`calib.transforms.bake_transforms`), so the model it returns is a plain quantized model whose
outputs are the calibrated model's bit for bit.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from toolchain.files import atomic_path, check_sha256, sha256_file
from toolchain.quant import QuantConfig, bounds_state, load_bounds, quantize_model

from .transforms import bake_transforms, restore_transforms, transforms_spec, transforms_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BOUNDS_SUFFIX = ".safetensors"
TRANSFORMS_PREFIX = "transforms/"
WEIGHTS_PREFIX = "weights/"
SIDECAR_SUFFIX = ".json"
_SIDECAR_KEYS = ("format_version", "checkpoint_sha256", "model", "quant_config", "method", "bounds_sha256")

PathLike = Union[str, os.PathLike]
#: set by :func:`load_quantized_model`: the hashes and config an export of the model records
PROVENANCE_ATTRIBUTE = "_twodq_provenance"


class ArtifactError(ValueError):
    """An artifact that is unreadable, incomplete, or does not belong to the given checkpoint."""


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: ``bounds`` by tensor name and the sidecar ``meta`` dict."""

    path: Path
    bounds: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def quant_config(self) -> QuantConfig:
        try:
            return QuantConfig.from_dict(self.meta["quant_config"])
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{sidecar_path(self.path)}: invalid quant_config: {err}") from err


def sidecar_path(path: PathLike) -> Path:
    """``run/w4a4.safetensors`` -> ``run/w4a4.json``; other suffixes are refused."""
    path = Path(path)
    if path.suffix != BOUNDS_SUFFIX:
        raise ValueError(f"artifact path {path} must end in {BOUNDS_SUFFIX} (its sidecar is the same name "
                         f"with {SIDECAR_SUFFIX})")
    return path.with_suffix(SIDECAR_SUFFIX)


def describe_images(root: PathLike, files: Iterable[PathLike]) -> dict[str, Any]:
    """``{"images": n, "image_list_sha256": ...}``: hash of the sorted paths relative to ``root``."""
    root = Path(root)
    names = sorted(Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"images": len(names), "image_list_sha256": digest}


def package_versions() -> dict[str, str]:
    try:
        ours = metadata.version("2dq")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"torch": torch.__version__, "numpy": np.__version__, "2dq": ours}


def model_description(model: nn.Module) -> dict[str, Any]:
    """``{"arch", "config"}`` of a model: its spandrel architecture and hyper-parameters (JSON-ready)."""
    from toolchain.models.info import INFO_ATTRIBUTE

    info = model.__dict__.get(INFO_ATTRIBUTE)
    if info is None:
        return {"arch": type(model).__name__, "config": {}}
    return {"arch": info.arch, "config": info.hyperparameters}


def save_artifact(path: PathLike, model: nn.Module, *, checkpoint: PathLike, quant_config: QuantConfig,
                  method: str, method_options: Optional[Mapping[str, Any]] = None,
                  calibration: Optional[Mapping[str, Any]] = None,
                  checkpoint_sha256: Optional[str] = None,
                  weights: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write ``model``'s bounds to ``path`` (``.safetensors``) and the sidecar beside it; returns ``path``.

    ``checkpoint`` is the float checkpoint the model was loaded from (hashed unless
    ``checkpoint_sha256`` is given). ``weights``: float parameters that replace the checkpoint's, by
    name (``<module>.weight``, ``<module>.bias``: GPTQ's or learned rounding's weights, trained biases and affines).
    Nothing is left behind if writing fails.

    >>> import tempfile
    >>> from toolchain import load_model
    >>> folder = tempfile.TemporaryDirectory()
    >>> weights = Path(folder.name) / "x2.pth"       # a float checkpoint (tiny, random weights)
    >>> from toolchain.models.examples import tiny_swinir
    >>> torch.save(tiny_swinir().state_dict(), weights)
    >>> from calib.baselines import calibrate_minmax
    >>> from calib.observers import batch_forward_loop
    >>> config = QuantConfig(w_bits=4, a_bits=4)
    >>> model = quantize_model(load_model(weights), config)
    >>> _ = calibrate_minmax(model, batch_forward_loop(torch.rand(4, 3, 16, 16), progress=False))
    >>> path = save_artifact(Path(folder.name) / "w4a4.safetensors", model, checkpoint=weights,
    ...                      quant_config=config, method="minmax")
    >>> sorted(p.name for p in Path(folder.name).iterdir())
    ['w4a4.json', 'w4a4.safetensors', 'x2.pth']
    >>> folder.cleanup()
    """
    path = Path(path)
    sidecar_path(path)   # a usage error before any work
    bounds = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in bounds_state(model).items()}
    quantizer_count = len(bounds) // 2
    spec, state = transforms_spec(model), transforms_state(model)
    bounds.update({TRANSFORMS_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous()
                   for name, t in state.items()})
    bounds.update({WEIGHTS_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous()
                   for name, t in (weights or {}).items()})
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": checkpoint_sha256 or sha256_file(checkpoint),
        "model": model_description(model),
        "quant_config": quant_config.to_dict(),
        "method": method,
        "method_options": dict(method_options or {}),
        "calibration": dict(calibration or {}),
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quantizers": quantizer_count,
    }
    if any(spec.values()):
        meta["transforms"] = spec
    if weights:
        meta["refined_weights"] = len(weights)
    return _write(path, bounds, meta)


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the bounds file and its sidecar (``bounds_sha256`` added to ``meta``), both atomically."""
    from safetensors.torch import save_file

    sidecar = sidecar_path(path)
    with contextlib.ExitStack() as stack:
        bounds_tmp = stack.enter_context(atomic_path(path))
        sidecar_tmp = stack.enter_context(atomic_path(sidecar))
        # one metadata entry: safetensors writes its metadata map in no fixed order, and equal bounds
        # should make byte-identical files (and so equal bounds_sha256)
        save_file(tensors, str(bounds_tmp), metadata={"format": f"2dq-bounds/{FORMAT_VERSION}"})
        meta["bounds_sha256"] = sha256_file(bounds_tmp)
        sidecar_tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    log.info("wrote %s and %s (%d quantizers)", path, sidecar, meta["quantizers"])
    return path


def save_rebounded(path: PathLike, source: Artifact, bounds: Mapping[str, torch.Tensor], *, method: str,
                   method_options: Mapping[str, Any]) -> Path:
    """Write ``source`` again at ``path`` with new quantizer ``bounds`` (the same names and shapes): the
    artifact of a run that trained only the bounds of a model loaded from ``source`` (``2dq-calibrate --init``).

    Folds, refined weights, quantization config, calibration record and transforms are ``source``'s, unchanged;
    the sidecar gets ``method``, ``method_options`` and ``init`` (``source``'s file name and bounds hash).
    ``ValueError`` naming the first bound that does not match.
    """
    path = Path(path)
    old = {k: v for k, v in source.bounds.items() if not k.startswith((TRANSFORMS_PREFIX, WEIGHTS_PREFIX))}
    if set(bounds) != set(old):
        extra, missing = sorted(set(bounds) - set(old)), sorted(set(old) - set(bounds))
        raise ValueError(f"new bounds do not match {source.path}'s quantizers: "
                         f"{'unknown ' + extra[0] if extra else 'missing ' + missing[0]}")
    tensors = dict(source.bounds)
    for name, tensor in bounds.items():
        if tensor.shape != old[name].shape:
            raise ValueError(f"bound {name}: shape {tuple(tensor.shape)}, {source.path} has {tuple(old[name].shape)}")
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    meta = {key: value for key, value in source.meta.items() if key != "bounds_sha256"}
    meta.update(method=method, method_options=dict(method_options), versions=package_versions(),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                init={"artifact": source.path.name, "bounds_sha256": source.meta["bounds_sha256"]})
    meta.setdefault("quantizers", len(old) // 2)
    return _write(path, tensors, meta)


def load_artifact(path: PathLike) -> Artifact:
    """Read an artifact's bounds and sidecar, checking that they belong together.

    Raises:
        ArtifactError: a missing or unreadable file, an unknown format version, missing sidecar
            keys, or bounds whose hash differs from the sidecar's ``bounds_sha256``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        sidecar = sidecar_path(path)
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    for file in (path, sidecar):
        if not file.is_file():
            raise ArtifactError(f"artifact file {file} does not exist (an artifact is a {BOUNDS_SUFFIX} bounds "
                                f"file plus its {SIDECAR_SUFFIX} sidecar)")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{sidecar}: not a JSON sidecar ({err})") from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{sidecar}: expected a JSON object, got {type(meta).__name__}")
    missing = [key for key in _SIDECAR_KEYS if key not in meta]
    if missing:
        raise ArtifactError(f"{sidecar}: missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{sidecar}: format_version {meta['format_version']!r}, this 2dq reads {FORMAT_VERSION}")
    check_sha256(path, meta["bounds_sha256"], f"{path} is not the bounds file described by {sidecar} "
                 "(its bounds_sha256)", error=ArtifactError)
    try:
        bounds = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from err
    return Artifact(path, dict(bounds), meta)


def load_quantized_model(weights_path: PathLike, artifact_path: PathLike,
                         device: Union[str, torch.device] = "cpu", *, bake: bool = True) -> nn.Module:
    """The fake-quant model: float checkpoint + calibration artifact, verified, in eval mode.

    Checks that ``weights_path`` has the SHA-256 the artifact was calibrated on, rebuilds the
    artifact's :class:`QuantConfig`, attaches the quantizers and loads the bounds strictly. ``bake=False``
    leaves the folds live (parametrized, as calibration left them: what ``2dq-calibrate --init`` trains
    from; the outputs are the same) instead of writing them into plain weights.

    Raises:
        ArtifactError: another checkpoint (hash mismatch, both files and hashes named), another
            architecture or configuration, or bounds that do not fit the quantizers.

    >>> import tempfile
    >>> from toolchain import load_model
    >>> folder = tempfile.TemporaryDirectory()
    >>> weights = Path(folder.name) / "x2.pth"       # a float checkpoint (tiny, random weights)
    >>> from toolchain.models.examples import tiny_swinir
    >>> torch.save(tiny_swinir().state_dict(), weights)
    >>> import calib
    >>> lr = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(load_model(weights), forward_loop=lambda m: m(lr))
    >>> artifact = calib.save(qmodel, Path(folder.name) / "w4a4.safetensors", checkpoint=weights)
    >>> model = load_quantized_model(weights, artifact)
    >>> torch.equal(model(lr), qmodel(lr))
    True
    >>> folder.cleanup()
    """
    from toolchain import load_model

    artifact = load_artifact(artifact_path)
    meta = artifact.meta
    check_sha256(weights_path, meta["checkpoint_sha256"], f"checkpoint mismatch: {artifact_path} was calibrated on "
                 f"another checkpoint ({meta.get('checkpoint', '?')})", error=ArtifactError)
    model = load_model(weights_path, device=device)
    want = meta["model"]
    got = model_description(model)
    if json.loads(json.dumps(got)) != want:
        raise ArtifactError(f"{artifact_path} describes model {want}, but {weights_path} builds {got}")
    refined = {k[len(WEIGHTS_PREFIX):]: v for k, v in artifact.bounds.items() if k.startswith(WEIGHTS_PREFIX)}
    if refined:
        _write_refined(model, refined, artifact_path)
    config = artifact.quant_config
    try:
        quantize_model(model, config)
    except ValueError as err:
        raise ArtifactError(f"{artifact_path}: its quant_config does not apply to {weights_path}: {err}") from err
    bounds = {k: v for k, v in artifact.bounds.items() if not k.startswith((TRANSFORMS_PREFIX, WEIGHTS_PREFIX))}
    folds = {k[len(TRANSFORMS_PREFIX):]: v for k, v in artifact.bounds.items() if k.startswith(TRANSFORMS_PREFIX)}
    spec = meta.get("transforms")
    if spec or folds:
        try:
            restore_transforms(model, spec or {}, folds)
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{artifact_path}: its transforms do not apply to {weights_path}: {err}") from err
    try:
        load_bounds(model, bounds)
    except ValueError as err:
        raise ArtifactError(f"{artifact_path}: its bounds do not fit the quantizers of {config}: {err}") from err
    if (spec or folds) and bake:
        bake_transforms(model)
    # what an export of this model records as its origin (export.api)
    model.__dict__[PROVENANCE_ATTRIBUTE] = {"checkpoint_sha256": meta["checkpoint_sha256"],
                                            "artifact_sha256": sha256_file(artifact_path),
                                            "quant_config": meta["quant_config"]}
    return model.to(device).eval()


@torch.no_grad()
def _write_refined(model: nn.Module, refined: Mapping[str, torch.Tensor], artifact_path: PathLike) -> None:
    """Copy the artifact's refined float weights into the checkpoint's model (names and shapes checked)."""
    params = dict(model.named_parameters())
    for name, value in refined.items():
        target = params.get(name)
        if target is None or target.shape != value.shape:
            found = "no such parameter" if target is None else f"shape {tuple(target.shape)}"
            raise ArtifactError(f"{artifact_path}: refined weight {name} {tuple(value.shape)} does not fit the "
                                f"model ({found})")
        target.copy_(value.to(target.dtype))
