"""A tiny SR model with random weights, for the library's runnable examples (doctests).

spandrel's own SwinIR class at a toy size (embed 12, one group of one block, two heads, window 8,
``pixelshuffledirect``): it places, calibrates and exports in a second. Real models come from
checkpoints: :func:`toolchain.load_model`.
"""
from __future__ import annotations

import torch
from torch import nn


def tiny_swinir(scale: int = 2, depths: tuple[int, ...] = (1,), seed: int = 0) -> nn.Module:
    """spandrel's SwinIR at a toy size with seeded random weights, carrying its ``ModelInfo``.

    >>> model = tiny_swinir()
    >>> model(torch.rand(1, 3, 16, 16)).shape
    torch.Size([1, 3, 32, 32])
    """
    from spandrel.architectures.SwinIR import SwinIR

    from ..loading import load_state_dict_model

    torch.manual_seed(seed)
    net = SwinIR(upscale=scale, embed_dim=12, depths=list(depths), num_heads=[2] * len(depths), window_size=8,
                 upsampler="pixelshuffledirect")
    return load_state_dict_model(net.state_dict(), "tiny SwinIR")
