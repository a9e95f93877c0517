"""What upscales an image: one interface for PyTorch, fake-quant, bicubic and every engine.

``2dq-eval`` and ``2dq-upscale`` see only :class:`Upscaler`: ``scale`` and
``upscale(lr) -> sr`` on HxWx3 float32 RGB arrays in [0, 1] (the output is not clamped; metrics
quantize it to uint8 as BasicSR does).

Engine backends provide a *tile runner*: an object with ``scale``, ``tile`` (the fixed square input
tile of the engine), ``multiple`` and ``__call__(tiles)`` mapping a float32 tensor (N, 3, T, T) to
(N, 3, sT, sT). :class:`TiledUpscaler` turns any tile runner into an :class:`Upscaler` with the shared
tiling code of :mod:`toolchain.inference`, so every backend upscales through the same code.

The engines themselves live above this layer (:mod:`engines`); :func:`engines.upscalers.make_upscaler`
picks one by name for the command lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .inference import TileSpec, tiled_upscale, upscale_padded
from .models.info import info_of

class Upscaler(Protocol):
    scale: int

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        """HxWx3 float32 in [0, 1] -> (scale*H)x(scale*W)x3 float32."""


class TileRunner(Protocol):
    scale: int
    tile: int
    multiple: int

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, T) float32 -> (N, 3, scale*T, scale*T) float32."""


def to_batch(image: np.ndarray) -> torch.Tensor:
    """HxWx3 array -> (1, 3, H, W) float32 tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def from_batch(batch: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> HxWx3 float32 array."""
    return batch[0].permute(1, 2, 0).detach().to("cpu", torch.float32).numpy()


@dataclass
class TorchUpscaler:
    """A PyTorch SR model (float or fake-quant) on ``device``; whole-image or tiled."""

    model: nn.Module
    device: torch.device | str = "cpu"
    tiles: TileSpec | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()
        self.scale = info_of(self.model).scale
        self.multiple = info_of(self.model).multiple_of

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).to("cpu", torch.float32)

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        batch = to_batch(lr)
        if self.tiles is None:
            return from_batch(upscale_padded(self._run, batch, self.scale, self.multiple))
        return from_batch(tiled_upscale(self._run, batch, self.scale, self.tiles, self.multiple))


@dataclass
class TiledUpscaler:
    """Any engine's tile runner (fixed tile shape, batch of tiles) as an :class:`Upscaler`."""

    runner: Any
    overlap: int = 16
    batch: int = 4
    progress: bool = False

    def __post_init__(self) -> None:
        self.scale = int(self.runner.scale)
        self.spec = TileSpec(self.runner.tile, self.overlap, self.batch)

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        out = tiled_upscale(self.runner, to_batch(lr), self.scale, self.spec, self.runner.multiple, self.progress)
        return from_batch(out)


@dataclass
class BicubicUpscaler:
    """MATLAB-compatible bicubic interpolation: the reference row of every SR table."""

    scale: int

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        from .data.imresize import imresize

        return imresize(lr.astype(np.float64), self.scale).astype(np.float32)
