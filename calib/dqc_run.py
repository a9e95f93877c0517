"""One DQC run over training images: :func:`run_dqc` with typed, frozen configs.

:class:`calib.dqc.DQCConfig` holds the optimization (steps, batch, LR, loss weights, seed);
:class:`DQCData` where the patches come from (image files, patch size, held-out validation);
:class:`DQCRun` where and how the run executes (device, threads, checkpoint file, resume). The
command line builds all three from its flags in one place,
:func:`calib.dqc_cli.dqc_configs_from_args`; Python callers build them directly.

:func:`run_dqc` draws random LR patches (bicubic degradation of random HR crops,
:class:`toolchain.data.patches.PatchDataset`) from the training images, holds out
``DQCData.val_fraction`` of the images (``split_train_val``) for a fixed validation batch, and
keeps the bounds of the best validation step (:func:`calib.dqc.distill`). Never point it at Set5,
Set14 or B100.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from toolchain.models import info_of

from . import distributed
from .dqc import DQCConfig, distill

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_SUFFIX", "DEFAULT_PATCH", "DEFAULT_VAL_FRACTION", "DEFAULT_VAL_PATCHES", "DQCData", "DQCRun",
           "default_checkpoint_path", "require_config", "run_dqc", "validation_batch"]

#: DQC LR patch size: a CPU budget (the paper: 64 on a GPU); see :mod:`calib.dqc_cli`
DEFAULT_PATCH = 48
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_PATCHES = 16
#: the checkpoint beside an artifact: ``run/w4a4.safetensors`` -> ``run/w4a4.dqc-checkpoint.safetensors``
CHECKPOINT_SUFFIX = ".dqc-checkpoint.safetensors"

PathLike = Union[str, os.PathLike]


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DQCData:
    """Where DQC's patches come from.

    - ``images``: the training image files (HR); a held-out share of them gives the validation batch.
      Any sequence of paths, kept in the given order as a tuple of :class:`~pathlib.Path`; for every
      image under a folder use :meth:`from_folder`.
    - ``patch_size``: LR patch side of training and validation patches (the HR crop is ``scale`` times it).
    - ``val_fraction``: share of ``images`` held out for validation, in (0, 1).
    - ``val_patches``: patches in the fixed validation batch (used when ``DQCConfig.val_every > 0``).

    >>> DQCData(["a.png", "b.png"], patch_size=16).images
    (PosixPath('a.png'), PosixPath('b.png'))
    >>> DQCData(["a.png"], val_fraction=1.0)
    Traceback (most recent call last):
    ValueError: DQCData.val_fraction must be in (0, 1), got 1.0
    """

    images: tuple[Path, ...]
    patch_size: int = DEFAULT_PATCH
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_patches: int = DEFAULT_VAL_PATCHES

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, os.PathLike)):
            raise TypeError(f"DQCData.images must be a sequence of image files, got the single path {self.images!r} "
                            "(for the images under a folder: DQCData.from_folder)")
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        if not self.images:
            raise ValueError("DQCData.images holds no image files")
        _positive_int("DQCData", "patch_size", self.patch_size)
        _positive_int("DQCData", "val_patches", self.val_patches)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DQCData.val_fraction must be in (0, 1), got {self.val_fraction!r}")

    @classmethod
    def from_folder(cls, folder: PathLike, **options: Any) -> "DQCData":
        """The image files under ``folder`` (recursively, :func:`toolchain.data.patches.list_images`)."""
        from toolchain.data.patches import list_images

        return cls(tuple(list_images(folder)), **options)


@dataclass(frozen=True)
class DQCRun:
    """Where and how a DQC run executes.

    - ``device``: torch device (each ``torchrun`` rank takes ``cuda:<LOCAL_RANK>`` for a CUDA device).
    - ``threads``: torch CPU threads to set before the run (None: leave PyTorch's setting).
    - ``checkpoint``: checkpoint file (rank 0 writes it; None: no checkpoints); see
      :func:`default_checkpoint_path` for the one beside an artifact.
    - ``resume``: continue the run of ``checkpoint`` (:func:`calib.dqc.distill`); needs a checkpoint.

    >>> DQCRun(checkpoint="run/w4a4.dqc-checkpoint.safetensors", resume=True).checkpoint
    PosixPath('run/w4a4.dqc-checkpoint.safetensors')
    >>> DQCRun(threads=0)
    Traceback (most recent call last):
    ValueError: DQCRun.threads must be a positive integer, got 0
    """

    device: str = "cpu"
    threads: Optional[int] = None
    checkpoint: Optional[Path] = None
    resume: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device", str(torch.device(self.device)))
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"DQCRun.device must name a torch device, got {self.device!r} ({err})") from None
        if self.threads is not None:
            _positive_int("DQCRun", "threads", self.threads)
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if not isinstance(self.resume, bool):
            raise ValueError(f"DQCRun.resume must be True or False, got {self.resume!r}")
        if self.resume and self.checkpoint is None:
            raise ValueError("DQCRun.resume needs DQCRun.checkpoint, the file of the run to continue")


def default_checkpoint_path(artifact: PathLike) -> Path:
    """The DQC checkpoint beside an artifact: its name with :data:`CHECKPOINT_SUFFIX`.

    >>> default_checkpoint_path("run/w4a4.safetensors")
    PosixPath('run/w4a4.dqc-checkpoint.safetensors')
    """
    artifact = Path(artifact)
    stem = artifact.name[: -len(artifact.suffix)] if artifact.suffix else artifact.name
    return artifact.with_name(stem + CHECKPOINT_SUFFIX)


def require_config(where: str, name: str, value: Any, kind: type) -> None:
    """``TypeError`` unless ``value`` is a ``kind`` (e.g. a parsed ``argparse.Namespace`` passed instead)."""
    if not isinstance(value, kind):
        raise TypeError(f"{where}: {name} must be a {kind.__name__}, got {type(value).__name__} (command-line "
                        "options become configs in one place per tool, e.g. calib.dqc_cli.dqc_configs_from_args)")


def validation_batch(val_files: list, patch: int, scale: int, seed: int, n: int) -> tuple[torch.Tensor, int]:
    """DQC's fixed held-out batch: ``n`` LR patches ``(n, 3, patch, patch)`` of ``val_files`` (the held-out
    part of ``split_train_val(images, val_fraction, seed)``), and how many of the files were usable."""
    from toolchain.data.patches import PatchDataset

    val = PatchDataset(val_files, patch, scale, seed=seed + 2, length=n)
    return torch.stack([val[i][0] for i in range(len(val))]), len(val.paths)


def run_dqc(model: nn.Module, config: DQCConfig, data: DQCData, run: DQCRun = DQCRun(), *,
            teacher: Optional[nn.Module] = None, progress: bool = True,
            weights_out: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
    """Run DQC on ``model`` (quantized, bounds from DOBI) over ``data``'s images; returns JSON metadata.

    With ``config.rounding`` the weights end baked on their grids; ``weights_out`` (a dict) receives them by
    parameter name, for the artifact (:func:`calib.artifact.save_artifact`'s ``weights``).

    The returned dict (``{"config", "data", "result", "checkpoint", "processes"}``) belongs in the
    artifact's ``method_options``; ``model`` ends with the bounds of the best validation step (the
    last step's when ``config.val_every`` is 0). ``config.seed`` also seeds the train/validation split
    and the patches. Joins a ``torchrun`` process group if the environment describes one, and leaves
    it at the end. ``TypeError`` if a config is not of its class (e.g. an ``argparse.Namespace``).

    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir()   # random weights; real ones: load_model
    >>> from toolchain.defaults import DEFAULT_CALIB_IMAGES
    >>> from calib import quantize
    >>> model = quantize(model, forward_loop=lambda m: m(torch.rand(8, 3, 16, 16)))   # DOBI bounds
    >>> config = DQCConfig(iters=2, batch=2, val_every=0, feature_taps="layers.0")  # one stage: name it
    >>> options = run_dqc(model, config, DQCData.from_folder(DEFAULT_CALIB_IMAGES, patch_size=16), progress=False)
    >>> options["result"]["iterations"], options["data"]["train_images"], options["checkpoint"]
    (2, 25, None)
    """
    from toolchain.data.patches import PatchDataset, split_train_val

    for name, value, kind in (("config", config, DQCConfig), ("data", data, DQCData), ("run", run, DQCRun)):
        require_config("run_dqc", name, value, kind)
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    patch, seed, scale = data.patch_size, config.seed, info_of(model).scale
    context = distributed.init_from_env(run.device)
    try:
        train_files, val_files = split_train_val(list(data.images), data.val_fraction, seed)
        train = PatchDataset(train_files, patch, scale, seed=seed + 1, length=config.iters * config.batch)
        # the keys and their order enter the checkpoint's run hash: keep them as they are
        description = {"train_images": len(train.paths), "patch_size": patch, "scale": scale, "seed": seed,
                       "files": sorted(Path(p).name for p in train_files + val_files)}
        val_batch = None
        if config.val_every:
            val_batch, val_images = validation_batch(val_files, patch, scale, seed, data.val_patches)
            description.update(val_images=val_images, val_fraction=data.val_fraction, val_patches=data.val_patches)
        log.info("DQC: %d steps of %d LR patches %dx%d from %d training images (%s), on %d process(es)",
                 config.iters, config.batch, patch, patch, len(train.paths),
                 f"validation on {len(val_batch)} patches of {description['val_images']} held-out images"
                 if val_batch is not None else "no validation: the last step's bounds are kept", context.world)
        result = distill(model, train, config, val_batch=val_batch, teacher=teacher, checkpoint_path=run.checkpoint,
                         resume=run.resume, context=context, description=description, progress=progress)
    finally:
        distributed.shutdown(context)
    description.pop("files")
    if weights_out is not None:
        weights_out.update(result.refined)
    return {"config": config.to_dict(), "data": description, "result": result.to_dict(),
            "checkpoint": None if run.checkpoint is None else str(run.checkpoint), "processes": context.world}
