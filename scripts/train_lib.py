"""Pieces of ``train_swinir.py``: model configs, aligned patch sampling on the device, the learning
rate schedule, validation, checkpoints, fine-tuning init and export.

The model is spandrel's SwinIR class (the official architecture code, :func:`build_model`), so the
state dict, buffers included, has the official layout and the exported file loads with
``toolchain.load_model`` like a released checkpoint.

Training pairs follow BasicSR's pre-made LR folders: each training image is mod-cropped to the
scale and degraded once, whole, with the project's MATLAB bicubic (:func:`bicubic_degrade`); aligned
LR/HR patches are then cut from the two uint8 images. This is the degradation the test sets went
through (their LR was made from whole images too), and it keeps the CPU out of the training loop:
both images of every pair live in one flat uint8 tensor on the device, and a batch of crops, with
the eight flips/rotations, is one ``torch.take`` per resolution.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from toolchain.data import bicubic_degrade, mod_crop, to_uint8
from toolchain.files import atomic_path
from toolchain.inference import upscale_padded
from toolchain.loading import CheckpointError, compact_names, load_state_dict_model, read_state_dict
from toolchain.metrics import psnr_y
from toolchain.models import info_of

log = logging.getLogger("train_swinir")

#: ``light`` is the released SwinIR-light; ``tiny`` is for tests (same structure, a few thousand weights)
CONFIGS = {
    "light": {"embed_dim": 60, "depths": [6, 6, 6, 6], "num_heads": [6, 6, 6, 6]},
    "tiny": {"embed_dim": 12, "depths": [2, 2], "num_heads": [2, 2]},
}
#: what every configuration shares: the released lightweight SwinIR (official defaults elsewhere,
#: including stochastic depth 0.1 in training)
LIGHTWEIGHT = {"img_size": 64, "in_chans": 3, "window_size": 8, "mlp_ratio": 2.0, "img_range": 1.0,
               "upsampler": "pixelshuffledirect", "resi_connection": "1conv", "drop_path_rate": 0.1}
#: buffers the architecture computes from its configuration (official files store them too)
STORED_BUFFERS = ("relative_position_index", "attn_mask")
# v2: spandrel's SwinIR (buffers in the state dict) and the global RNG state (stochastic depth)
CHECKPOINT_FORMAT = "2dq-train-swinir-v2"
#: Adam as in the official SwinIR training options (KAIR): default betas, no weight decay
ADAM_BETAS = (0.9, 0.999)
#: the cosine schedule ends at this fraction of the peak learning rate
FINAL_LR_RATIO = 0.01

Pair = tuple[np.ndarray, np.ndarray]  # (HR uint8 (sH, sW, 3), LR uint8 (H, W, 3))


def model_config(name: str, scale: int) -> dict:
    """Constructor arguments of spandrel's ``SwinIR`` for a named configuration at ``scale`` (JSON-ready)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    return {**LIGHTWEIGHT, **CONFIGS[name], "upscale": scale}


def build_model(config: dict) -> nn.Module:
    """spandrel's SwinIR with ``config``, freshly initialized (global torch RNG), float32, eval mode.

    It goes through :func:`toolchain.loading.load_state_dict_model`, so it is the model
    ``toolchain.load_model`` makes of its own checkpoint, carrying the same ``ModelInfo`` (scale,
    input size rule); the hyper-parameters spandrel infers back must be ``config``.
    """
    from spandrel.architectures.SwinIR import SwinIR

    model = load_state_dict_model(SwinIR(**config).state_dict(), "SwinIR " + json.dumps(config))
    inferred = info_of(model).hyperparameters
    differs = {k: (v, inferred.get(k)) for k, v in config.items() if inferred.get(k) != v}
    if differs:
        raise ValueError(f"spandrel reads this SwinIR back with other settings (config, inferred): {differs}")
    return model


def make_pairs(images: Sequence[np.ndarray], scale: int, progress: bool = False) -> list[Pair]:
    """``(HR, LR)`` uint8 pairs: HR mod-cropped to ``scale``, LR its MATLAB bicubic downscale."""
    pairs = []
    for image in tqdm(images, desc=f"bicubic x{scale}", unit="img", disable=not progress):
        hr = np.ascontiguousarray(mod_crop(image, scale))
        pairs.append((hr, to_uint8(bicubic_degrade(hr, scale))))
    return pairs


class PairSampler:
    """Random aligned patches ``(LR (B, 3, p, p), HR (B, 3, sp, sp))``, float32 in [0, 1], on ``device``.

    Each patch picks an image uniformly, a uniform LR position, and one of the 8 flips/rotations;
    all random numbers come from the CPU ``generator`` passed to :meth:`sample` (so its state is
    the whole sampling state of a checkpoint). Pairs whose LR is smaller than ``patch`` are skipped.
    """

    def __init__(self, pairs: Sequence[Pair], patch: int, scale: int, device: torch.device | str) -> None:
        usable = [(hr, lr) for hr, lr in pairs if min(lr.shape[:2]) >= patch]
        if len(usable) < len(pairs):
            log.warning("%d of %d training images are smaller than the %d px LR patch and are not used",
                        len(pairs) - len(usable), len(pairs), patch)
        if not usable:
            raise ValueError(f"no training image is large enough for {patch} px LR patches at x{scale}")
        self.patch, self.scale, self.device = patch, scale, torch.device(device)
        self.count = len(usable)
        # LR sizes on the CPU, to draw positions without a device round trip
        self.lr_sizes = torch.tensor([lr.shape[:2] for _, lr in usable], dtype=torch.int64)
        self.hr, self.hr_offset, self.hr_width = self._flat([hr for hr, _ in usable])
        self.lr, self.lr_offset, self.lr_width = self._flat([lr for _, lr in usable])

    def _flat(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = np.array([im.size for im in images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        flat = torch.from_numpy(np.concatenate([im.reshape(-1) for im in images])).to(self.device)
        widths = torch.tensor([im.shape[1] for im in images], dtype=torch.int64, device=self.device)
        return flat, torch.from_numpy(offsets).to(self.device), widths

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(self.count, (batch,), generator=generator)
        span = self.lr_sizes[index] - self.patch + 1  # (B, 2) possible top/left positions
        position = (torch.rand(batch, 2, generator=generator, dtype=torch.float64) * span).long()
        flips = torch.rand(batch, 3, generator=generator) < 0.5  # transpose, vertical, horizontal
        index, position, flips = (t.to(self.device, non_blocking=True) for t in (index, position, flips))
        lr = self._crop(self.lr, self.lr_offset[index], self.lr_width[index], position, self.patch, flips)
        hr = self._crop(self.hr, self.hr_offset[index], self.hr_width[index], position * self.scale,
                        self.patch * self.scale, flips)
        return lr, hr

    @staticmethod
    def _crop(flat, offset, width, position, size, flips) -> torch.Tensor:
        """Gather ``(B, 3, size, size)`` crops at ``position`` (B, 2) from HWC images packed in ``flat``."""
        b = offset.shape[0]
        grid = torch.arange(size, device=flat.device)
        rows, cols = grid.view(1, size, 1).expand(b, size, size), grid.view(1, 1, size).expand(b, size, size)
        transpose, vflip, hflip = (f.view(b, 1, 1) for f in flips.unbind(1))
        rows, cols = torch.where(transpose, cols, rows), torch.where(transpose, rows, cols)
        rows = torch.where(vflip, size - 1 - rows, rows)
        cols = torch.where(hflip, size - 1 - cols, cols)
        pixel = (position[:, 0].view(b, 1, 1) + rows) * width.view(b, 1, 1) + position[:, 1].view(b, 1, 1) + cols
        channels = torch.arange(3, device=flat.device).view(1, 3, 1, 1)
        index = offset.view(b, 1, 1, 1) + pixel.unsqueeze(1) * 3 + channels
        return torch.take(flat, index).float().div_(255.0)


def learning_rate(iteration: int, peak: float, iters: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` iterations to ``peak``, then cosine to ``FINAL_LR_RATIO * peak``."""
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    progress = min(1.0, (iteration - warmup) / max(1, iters - warmup))
    final = peak * FINAL_LR_RATIO
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def validate(model: nn.Module, pairs: Sequence[Pair], scale: int, device: torch.device) -> float:
    """Mean PSNR-Y (dB, crop border = scale) of whole validation images, float32, eval protocol padding."""
    was_training = model.training
    model.eval()
    scores = []
    for hr, lr in pairs:
        x = torch.from_numpy(lr).to(device).permute(2, 0, 1)[None].float() / 255.0
        sr = upscale_padded(model, x, scale, info_of(model).multiple_of)  # as the evaluator pads
        scores.append(psnr_y(to_uint8(sr[0].permute(1, 2, 0).float().cpu().numpy()), hr, crop_border=scale))
    model.train(was_training)
    return float(np.mean(scores))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a training checkpoint (tensors and plain containers only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def init_from(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy every learnable tensor of checkpoint ``path`` except the upsampler's into ``model``.

    For fine-tuning x2 from x4: only ``upsample.*`` depends on the scale. Returns the keys left
    at their fresh initialization. Raises :class:`CheckpointError` on any other difference.
    """
    state = read_state_dict(path)
    kept = {k: v for k, v in state.items()
            if not k.startswith("upsample.") and k.rsplit(".", 1)[-1] not in STORED_BUFFERS}
    params = dict(model.named_parameters())
    wanted = {k for k in params if not k.startswith("upsample.")}
    problems = []
    if wanted - set(kept):
        problems.append(f"missing {compact_names(sorted(wanted - set(kept)))}")
    if set(kept) - wanted:
        problems.append(f"unexpected {compact_names(sorted(set(kept) - wanted))}")
    shapes = sorted(k for k in wanted & set(kept) if kept[k].shape != params[k].shape)
    if shapes:
        problems.append(f"wrong shape {compact_names(shapes)}")
    if problems:
        raise CheckpointError(f"--init {path}: does not fit {_described(model)}: " + "; ".join(problems))
    with torch.no_grad():
        for key in wanted:
            params[key].copy_(kept[key])
    return sorted(set(params) - wanted)


def _described(model: nn.Module) -> str:
    hyper = getattr(model, "hyperparameters", {})
    return "SwinIR " + json.dumps({k: hyper[k] for k in ("embed_dim", "depths", "num_heads", "upscale") if k in hyper})


def export_weights(model: nn.Module, path: Path, metadata: dict) -> Path:
    """Write the whole state dict as ``.safetensors``, atomically: the official SwinIR layout (weights
    float32, plus the ``relative_position_index`` / ``attn_mask`` buffers, by which spandrel identifies
    SwinIR)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    parameters = {k for k, _ in model.named_parameters()}
    extra = {k for k in tensors if k.rsplit(".", 1)[-1] not in STORED_BUFFERS} - parameters
    if extra:
        raise RuntimeError(f"the model's state dict holds more than its parameters and buffers: {sorted(extra)[:3]}")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path


class JsonLog:
    """Append-only JSON-lines log of training records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, iteration: int) -> None:
        """Drop records of iterations after ``iteration`` (written by a run killed after its last checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line).get("iter", 0) <= iteration]
        if len(kept) < len(lines):
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
