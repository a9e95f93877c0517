"""SwinIR-light with random weights for the benchmarks (no trained SwinIR-light checkpoint exists here).

spandrel's SwinIR class with the official light configuration (embed 60, four groups of six blocks,
six heads, window 8, MLP ratio 2, ``pixelshuffledirect``), loaded like a user's checkpoint so that it
carries its descriptor facts (:func:`toolchain.models.info_of`).
"""
from __future__ import annotations

import torch
from torch import nn

from toolchain.loading import load_state_dict_model

SWINIR_LIGHT = dict(img_size=64, window_size=8, embed_dim=60, depths=[6, 6, 6, 6], num_heads=[6, 6, 6, 6],
                    mlp_ratio=2.0, upsampler="pixelshuffledirect", img_range=1.0, resi_connection="1conv")


def swinir_light(scale: int, seed: int = 0) -> nn.Module:
    """SwinIR-light x``scale`` (official configuration), random weights from ``seed``, eval mode."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    net = SwinIR(upscale=scale, **SWINIR_LIGHT)
    return load_state_dict_model(net.state_dict(), f"SwinIR-light x{scale} (random)")
