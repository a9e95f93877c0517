"""Any-size inference: mirror padding, crop back, tiling with seam-free blending."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolchain.inference import TileSpec, mirror_indices, pad_symmetric, tile_starts, tiled_upscale, upscale_padded
from toolchain.tolerances import TILE_BLEND_ATOL


def nearest_x2(tiles: torch.Tensor) -> torch.Tensor:
    """A position-independent x2 upscaler: tiling it must change nothing."""
    return F.interpolate(tiles, scale_factor=2, mode="nearest")


def test_mirror_indices_match_numpy_symmetric():
    for size, target in [(3, 10), (5, 5), (1, 4), (7, 30)]:
        expected = np.pad(np.arange(size), (0, target - size), mode="symmetric")
        assert mirror_indices(size, target).tolist() == expected.tolist()


def test_pad_symmetric_is_mirror_concatenation():
    x = torch.rand(1, 3, 5, 7)
    padded = pad_symmetric(x, 8, 16)
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 9)), mode="symmetric")
    np.testing.assert_array_equal(padded.numpy(), ref)
    with pytest.raises(ValueError, match="smaller"):
        pad_symmetric(x, 4, 7)


def test_upscale_padded_crops_to_scale_times_input():
    x = torch.rand(1, 3, 19, 29)
    out = upscale_padded(nearest_x2, x, 2, 8)
    assert out.shape == (1, 3, 38, 58)
    torch.testing.assert_close(out, nearest_x2(x), rtol=0, atol=0)


def test_tile_starts_cover_axis_with_overlap():
    for size, tile, overlap in [(150, 32, 8), (64, 64, 16), (65, 64, 16), (2000, 64, 16)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(size, tile)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("shape,spec", [((150, 90), TileSpec(32, 8, 3)), ((40, 200), TileSpec(64, 16, 5)), ((17, 23), TileSpec(32, 0, 1))])
def test_tiled_equals_untiled_for_position_independent_operator(shape, spec):
    x = torch.rand(1, 3, *shape)
    tiled = tiled_upscale(nearest_x2, x, 2, spec, multiple=8)
    torch.testing.assert_close(tiled, nearest_x2(x), rtol=0, atol=TILE_BLEND_ATOL)


def test_single_covering_tile_reproduces_whole_image_exactly():
    calls = []

    def run(tiles):
        calls.append(tiles.shape)
        return nearest_x2(tiles) + tiles.mean()  # depends on the whole tile

    x = torch.rand(1, 3, 37, 53)
    tiled = tiled_upscale(run, x, 2, TileSpec(64, 16, 4), multiple=8)
    whole = upscale_padded(run, x, 2, 64)
    assert calls == [(1, 3, 64, 64), (1, 3, 64, 64)]
    assert torch.equal(tiled, whole)


def test_tiles_are_batched_and_shape_checked():
    batches = []

    def run(tiles):
        batches.append(tiles.shape[0])
        return nearest_x2(tiles)

    tiled_upscale(run, torch.rand(1, 3, 100, 100), 2, TileSpec(32, 8, 4), multiple=8)
    assert max(batches) == 4 and sum(batches) == len(tile_starts(100, 32, 8)) ** 2
    with pytest.raises(RuntimeError, match="expected"):
        tiled_upscale(lambda t: t, torch.rand(1, 3, 40, 40), 2, TileSpec(32, 8, 4), multiple=8)
    with pytest.raises(ValueError, match="multiple"):
        tiled_upscale(nearest_x2, torch.rand(1, 3, 40, 40), 2, TileSpec(30, 8, 4), multiple=8)


def test_tile_spec_validation():
    for bad in [dict(tile=0), dict(tile=32, overlap=32), dict(tile=32, batch=0)]:
        with pytest.raises(ValueError):
            TileSpec(**bad)


def test_large_image_runs_in_bounded_batches():
    """2000x2000 LR at x2: the backend never sees more than one batch of tiles at a time."""
    seen = []

    def run(tiles):
        seen.append(tiles.numel())
        return nearest_x2(tiles)

    x = torch.rand(1, 3, 2000, 2000)
    out = tiled_upscale(run, x, 2, TileSpec(64, 8, 8), multiple=8)
    assert out.shape == (1, 3, 4000, 4000)
    assert max(seen) == 8 * 3 * 64 * 64
    torch.testing.assert_close(out[..., :512, :512], nearest_x2(x[..., :256, :256]), rtol=0, atol=TILE_BLEND_ATOL)
