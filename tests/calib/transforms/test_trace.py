"""Channel tracing and fold verification (calib/transforms/trace.py): per-channel statistics, and folds
that would change the float output dropped."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from calib.transforms.smoothing import SmoothingGroup, find_smoothing_groups
from calib.transforms.trace import ChannelStats
from toolchain.quant import QuantConfig, quantize_model


def test_channel_stats_survive_token_permutations():
    x = torch.randn(2, 16, 5)
    permuted = x.reshape(32, 5)[torch.randperm(32)].reshape(4, 8, 5)
    assert ChannelStats.of(x, (-1,)).matches(ChannelStats.of(permuted, (-1,)))
    assert not ChannelStats.of(x, (-1,)).matches(ChannelStats.of(permuted + 1e-3, (-1,)))
    assert not ChannelStats.of(x, (-1,)).matches(ChannelStats.of(x[:, :, [1, 0, 2, 3, 4]], (-1,)))


class _Branch(nn.Module):
    """LayerNorm -> MLP; ``post`` also adds the LayerNorm output to the result (not foldable)."""

    def __init__(self, post: bool) -> None:
        super().__init__()
        self.post = post
        self.norm = nn.LayerNorm(6)
        self.mlp = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y if self.post else x) + self.mlp(y)


@pytest.mark.parametrize("post", [False, True])
def test_verification_drops_a_norm_that_also_feeds_the_residual(post):
    torch.manual_seed(0)
    example = torch.randn(1, 10, 6)
    model = quantize_model(_Branch(post), QuantConfig(quantize=("linear",)), example)
    groups = find_smoothing_groups(model, example)
    assert groups == ([] if post else [SmoothingGroup("norm", "norm", 0, 6, ("mlp.0",))])

