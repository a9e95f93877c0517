"""Any-size inference shared by every backend: mirror padding, crop back, and overlapping tiles.

Two ways to run an image, both used by PyTorch, ONNX Runtime and TensorRT backends alike:

- :func:`upscale_padded` pads the LR image by mirror concatenation (edge-including symmetric
  padding, as SwinIR's and NGswin's test code) to the model's input multiple (``ModelInfo.multiple_of``, from its spandrel descriptor), runs it whole and
  crops the output back. This is the evaluation protocol of the papers.
- :func:`tiled_upscale` cuts the padded image into fixed-size overlapping tiles, runs them in batches
  through any ``run_tiles`` callable (a model, an ORT session, a TensorRT plan with a fixed tile
  shape), and blends the outputs with linear ramps over the overlaps so that no seam is visible and
  memory stays bounded whatever the image size. A single tile that covers the image reproduces
  :func:`upscale_padded` exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

RunTiles = Callable[[torch.Tensor], torch.Tensor]


def mirror_indices(size: int, target: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices ``0..target-1`` into an axis of length ``size``, continued by edge-including mirroring.

    ``[0, 1, ..., size-1, size-1, ..., 0, 0, 1, ...]``: the same as concatenating the flipped image
    repeatedly (numpy's ``symmetric`` mode), valid for any ``target`` even when it exceeds ``2*size``.
    """
    if size <= 0:
        raise ValueError(f"cannot pad an empty axis (size {size})")
    idx = torch.arange(target, device=device) % (2 * size)
    return torch.where(idx < size, idx, 2 * size - 1 - idx)


def pad_symmetric(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``x`` (N, C, H, W) at the bottom/right to ``(height, width)`` by mirror concatenation."""
    _, _, h, w = x.shape
    if height < h or width < w:
        raise ValueError(f"target size {height}x{width} is smaller than the input {h}x{w}")
    rows = mirror_indices(h, height, x.device)
    cols = mirror_indices(w, width, x.device)
    return x.index_select(2, rows).index_select(3, cols)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def upscale_padded(run: RunTiles, lr: torch.Tensor, scale: int, multiple: int) -> torch.Tensor:
    """Pad ``lr`` (N, 3, H, W) to a multiple of ``multiple``, run it whole, crop to (sH, sW)."""
    _, _, h, w = lr.shape
    padded = pad_symmetric(lr, round_up(h, multiple), round_up(w, multiple))
    return run(padded)[..., : h * scale, : w * scale]


@dataclass(frozen=True)
class TileSpec:
    """Tiling of an LR image: square tiles of ``tile`` pixels, ``overlap`` shared with neighbours,
    ``batch`` tiles per call of the backend."""

    tile: int
    overlap: int = 16
    batch: int = 4

    def __post_init__(self) -> None:
        if self.tile <= 0:
            raise ValueError(f"tile must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")
        if self.batch <= 0:
            raise ValueError(f"batch must be positive, got {self.batch}")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Top-left offsets along one axis: stride ``tile - overlap``, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blending weights: linear ramps of ``overlap`` samples at the sides that have a neighbour."""
    weight = torch.ones(length, dtype=torch.float32)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if ramp_start:
            weight[:overlap] = torch.minimum(weight[:overlap], ramp)
        if ramp_end:
            weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def tiled_upscale(
    run_tiles: RunTiles,
    lr: torch.Tensor,
    scale: int,
    spec: TileSpec,
    multiple: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Upscale ``lr`` (1, 3, H, W) by overlapping ``spec.tile`` tiles run in batches.

    ``run_tiles`` maps a batch (N, 3, T, T) to (N, 3, sT, sT); ``spec.tile`` must be a multiple of
    ``multiple`` (the model's window or padding multiple). The image is first padded by mirroring to
    at least one tile and to a multiple of ``multiple``; the output is cropped back to (sH, sW).
    Memory holds one batch of tiles plus the output image.
    """
    if lr.dim() != 4 or lr.shape[0] != 1:
        raise ValueError(f"tiled_upscale takes one image (1, C, H, W), got shape {tuple(lr.shape)}")
    if spec.tile % multiple:
        raise ValueError(f"tile {spec.tile} is not a multiple of the model's input multiple {multiple}")
    _, channels, h, w = lr.shape
    ph = max(round_up(h, multiple), spec.tile)
    pw = max(round_up(w, multiple), spec.tile)
    padded = pad_symmetric(lr, ph, pw)
    rows, cols = tile_starts(ph, spec.tile, spec.overlap), tile_starts(pw, spec.tile, spec.overlap)
    boxes = [(r, c) for r in rows for c in cols]
    out_tile = spec.tile * scale
    # float32 accumulators: the output image itself dominates memory (8000x8000x3 at x4 of 2000x2000)
    output = torch.zeros(1, channels, ph * scale, pw * scale, dtype=torch.float32)
    weights = torch.zeros(1, 1, ph * scale, pw * scale, dtype=torch.float32)
    overlap_out = spec.overlap * scale
    batches = range(0, len(boxes), spec.batch)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="tiles", unit="batch", leave=False)
    for first in batches:
        chunk = boxes[first : first + spec.batch]
        inputs = torch.cat([padded[..., r : r + spec.tile, c : c + spec.tile] for r, c in chunk])
        results = run_tiles(inputs)
        expected = (len(chunk), channels, out_tile, out_tile)
        if tuple(results.shape) != expected:
            raise RuntimeError(f"backend returned tiles of shape {tuple(results.shape)}, expected {expected}")
        for (r, c), tile_out in zip(chunk, results.to(torch.float32)):
            wy = _ramp(out_tile, overlap_out, r > 0, r + spec.tile < ph)
            wx = _ramp(out_tile, overlap_out, c > 0, c + spec.tile < pw)
            blend = wy[:, None] * wx[None, :]
            ys, xs = slice(r * scale, r * scale + out_tile), slice(c * scale, c * scale + out_tile)
            output[0, :, ys, xs] += tile_out * blend
            weights[0, 0, ys, xs] += blend
    output /= weights
    return output[..., : h * scale, : w * scale].to(lr.dtype)
