"""What a report reads: the artifacts, their labels, where DOBI's bounds come from, the calibration patches.

The calibration patches are rebuilt from the main artifact's ``calibration`` record exactly as
``2dq-calibrate`` drew them: :func:`toolchain.data.patches.sample_patches` over the images of the
recorded folder (checked against the recorded count and list hash), with the recorded patch
count, patch size, scale, seed and augmentation.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from calib.artifact import Artifact, ArtifactError, describe_images
from calib.dobi import DEFAULT_CANDIDATES
from calib.observers import DEFAULT_BINS

from .stats import DobiOptions

log = logging.getLogger(__name__)

#: ``2dq-calibrate``'s default ``--batch``, used when the artifact does not record one
DEFAULT_BATCH_SIZE = 8
_CALIBRATION_KEYS = ("data", "patches", "patch_size", "seed")


@dataclass(frozen=True)
class Entry:
    """An artifact shown in the report under ``label``."""

    label: str
    artifact: Artifact

    @property
    def method(self) -> str:
        return str(self.artifact.meta.get("method", "?"))


def describe(artifact: Artifact) -> str:
    """``"dobi W4A4"``: method and bits of an artifact."""
    config = artifact.quant_config
    return f"{artifact.meta.get('method', '?')} W{config.w_bits}A{config.a_bits}"


def make_entries(artifacts: Sequence[Artifact]) -> list[Entry]:
    """Unique labels: ``"dobi W4A4"``, with the file name added where two would be equal."""
    base = [describe(a) for a in artifacts]
    labels = [f"{b} ({a.path.stem})" if base.count(b) > 1 else b for a, b in zip(artifacts, base)]
    if len(set(labels)) != len(labels):
        raise ValueError(f"artifacts must be distinct files, got {[str(a.path) for a in artifacts]}")
    return [Entry(label, artifact) for label, artifact in zip(labels, artifacts)]


def same_calibration(a: Artifact, b: Artifact) -> bool:
    """Whether two artifacts quantize the same checkpoint the same way on the same calibration data."""
    keys = ("checkpoint_sha256", "model", "quant_config", "calibration")
    return all(a.meta.get(key) == b.meta.get(key) for key in keys) and bool(a.meta.get("calibration"))


def dobi_entry(entries: Sequence[Entry]) -> Optional[Entry]:
    """The first artifact made by DOBI on the main artifact's data and quantization, if any."""
    main = entries[0]
    for entry in entries:
        if entry.method == "dobi" and (entry is main or same_calibration(main.artifact, entry.artifact)):
            return entry
    return None


def dobi_options(meta: dict[str, Any]) -> DobiOptions:
    """DOBI's options as recorded in ``method_options`` (flat, or under ``"dobi"``), else the defaults."""
    options = meta.get("method_options") or {}
    if isinstance(options.get("dobi"), dict):
        options = options["dobi"]
    return DobiOptions(candidates=int(options.get("candidates", DEFAULT_CANDIDATES)),
                       mode=str(options.get("mode", "auto")), bins=int(options.get("bins", DEFAULT_BINS)))


def calibration_patches(artifact: Artifact, scale: int, images_dir: Union[str, os.PathLike, None] = None
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The artifact's calibration LR patches ``(N, 3, p, p)`` and a description of what was used.

    ``images_dir`` replaces the recorded folder (data moved); the image list must still match.

    Raises:
        ArtifactError: the artifact records no calibration data, or the images differ from those
            it was calibrated on.
    """
    from toolchain.data.patches import list_images, sample_patches

    record = artifact.meta.get("calibration") or {}
    missing = [key for key in _CALIBRATION_KEYS if key not in record]
    if missing:
        raise ArtifactError(f"{artifact.path}: its sidecar records no calibration data ({missing} missing from "
                            f"'calibration'), so the report cannot rebuild the calibration patches")
    folder = Path(images_dir) if images_dir is not None else Path(record["data"])
    if not folder.is_dir():
        raise ArtifactError(f"{artifact.path} was calibrated on images in {record['data']}, which is not a "
                            f"directory here; pass --calib-images DIR")
    images = list_images(folder)
    found = describe_images(folder, images)
    for key in ("images", "image_list_sha256"):
        if key in record and record[key] != found[key]:
            raise ArtifactError(f"{folder} holds other images ({found['images']} files, list SHA-256 "
                                f"{found['image_list_sha256'][:12]}) than {artifact.path} was calibrated on "
                                f"({record.get('images')} files, {str(record.get('image_list_sha256'))[:12]})")
    if int(record.get("scale", scale)) != scale:
        raise ArtifactError(f"{artifact.path} was calibrated at scale {record['scale']}, the model is x{scale}")
    lr, _ = sample_patches(images, int(record["patches"]), int(record["patch_size"]), scale, int(record["seed"]),
                           augment=bool(record.get("augment", True)))
    used = {"folder": str(folder), "images": found["images"], "patches": int(lr.shape[0]),
            "patch_size": int(record["patch_size"]), "seed": int(record["seed"]),
            "batch_size": int(record.get("batch_size", DEFAULT_BATCH_SIZE))}
    log.info("rebuilt %d calibration patches %dx%d from %d images in %s", lr.shape[0], lr.shape[-1],
             lr.shape[-2], found["images"], folder)
    return lr, used
