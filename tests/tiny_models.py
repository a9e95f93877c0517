"""Tiny SR transformers for the tests: spandrel's own classes with random weights, loaded as users load theirs.

Each builder constructs the official architecture class (spandrel / spandrel_extra_arches) with a
tiny configuration and a seed, then goes through :func:`toolchain.loading.load_state_dict_model`, so
the model carries the descriptor facts (scale, size requirements) exactly as a loaded checkpoint
does. ``SWINIR_TINY`` is the configuration of the golden outputs in ``../shared/reference/golden``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from toolchain.loading import load_state_dict_model

#: the golden tiny SwinIR of ../shared/reference (embed 12, two groups of two blocks, window 8)
SWINIR_TINY = dict(img_size=64, window_size=8, embed_dim=12, depths=[2, 2], num_heads=[2, 2], mlp_ratio=2.0,
                   upsampler="pixelshuffledirect", img_range=1.0, resi_connection="1conv")


def tiny_swinir(scale: int = 4, seed: int = 0, **overrides) -> nn.Module:
    """spandrel's SwinIR, tiny (:data:`SWINIR_TINY` with ``overrides``), random weights from ``seed``."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    return load_state_dict_model(SwinIR(upscale=scale, **{**SWINIR_TINY, **overrides}).state_dict(), "tiny SwinIR")


def tiny_dat(scale: int = 2, seed: int = 0) -> nn.Module:
    """spandrel's DAT, tiny (embed 32, two groups of two blocks, split 8x32), random weights."""
    from spandrel.architectures.DAT import DAT

    torch.manual_seed(seed)
    net = DAT(upscale=scale, img_size=64, embed_dim=32, split_size=[8, 32], depth=[2, 2], num_heads=[2, 2],
              expansion_factor=2.0, resi_connection="1conv", upsampler="pixelshuffledirect")
    return load_state_dict_model(net.state_dict(), "tiny DAT")


def tiny_hat(scale: int = 2, seed: int = 0) -> nn.Module:
    """spandrel's HAT, tiny (embed 12, one group of two blocks, window 8), random weights."""
    from spandrel.architectures.HAT import HAT

    torch.manual_seed(seed)
    net = HAT(upscale=scale, img_size=64, window_size=8, embed_dim=12, depths=[2], num_heads=[2], mlp_ratio=2.0,
              compress_ratio=3, squeeze_factor=4, upsampler="pixelshuffle", num_feat=16)
    return load_state_dict_model(net.state_dict(), "tiny HAT")


def tiny_srformer(scale: int = 2, seed: int = 0) -> nn.Module:
    """spandrel_extra_arches' SRFormer, tiny (embed 12, one group of two blocks, window 8), random weights."""
    from spandrel_extra_arches.architectures.SRFormer import SRFormer

    torch.manual_seed(seed)
    net = SRFormer(upscale=scale, img_size=64, window_size=8, embed_dim=12, depths=[2], num_heads=[2], mlp_ratio=2.0,
                   upsampler="pixelshuffledirect")
    return load_state_dict_model(net.state_dict(), "tiny SRFormer")



def _loaded(net: nn.Module, name: str) -> nn.Module:
    return load_state_dict_model(net.state_dict(), name)


# The other SR transformers spandrel loads, tiny (x2, random weights from the seed), each as small as its class
# allows: RGT's and CRAFT's position-bias MLPs are a quarter of a quarter of the width wide (none at embed 12), DCTLSA
# concatenates six modules and its loader assumes five heads, GRL pads its input to 64 (tiles of 64).
def tiny_swin2sr(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.Swin2SR import Swin2SR

    torch.manual_seed(seed)
    return _loaded(Swin2SR(upscale=scale, img_size=64, window_size=8, embed_dim=12, depths=[2], num_heads=[2],
                           mlp_ratio=2.0, upsampler="pixelshuffledirect"), "tiny Swin2SR")


def tiny_omnisr(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.OmniSR import OmniSR

    torch.manual_seed(seed)
    return _loaded(OmniSR(num_feat=16, block_num=1, pe=True, window_size=8, res_num=1, up_scale=scale, bias=True),
                   "tiny OmniSR")


def tiny_grl(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.GRL import GRL

    torch.manual_seed(seed)
    return _loaded(GRL(upscale=scale, img_size=64, window_size=8, embed_dim=16, depths=[2], num_heads_window=[2],
                       num_heads_stripe=[2], mlp_ratio=2, upsampler="pixelshuffledirect", stripe_size=[8, 8],
                       anchor_window_down_factor=2), "tiny GRL")


def tiny_rgt(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.RGT import RGT

    torch.manual_seed(seed)
    return _loaded(RGT(upscale=scale, img_size=64, embed_dim=48, depth=[2], num_heads=[2], split_size=[8, 16],
                       mlp_ratio=2.0), "tiny RGT")


def tiny_drct(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.DRCT import DRCT

    torch.manual_seed(seed)
    return _loaded(DRCT(upscale=scale, img_size=64, window_size=8, embed_dim=12, depths=[2], num_heads=[2],
                        mlp_ratio=2.0, upsampler="pixelshuffle", gc=8), "tiny DRCT")


def tiny_fdat(scale: int = 2, seed: int = 0) -> nn.Module:
    """FDAT initializes every convolution with std 0.02, so that its random output is near 0 (|y| < 0.03, where
    every engine agrees after clipping to [0, 1]); its convolutions here get std 1/sqrt(fan in) instead."""
    from spandrel.architectures.FDAT import FDAT

    torch.manual_seed(seed)
    net = FDAT(scale=scale, embed_dim=16, num_groups=1, depth_per_group=2, num_heads=2, window_size=8)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(module.weight[0].numel() ** -0.5 / module.weight.std())
    return _loaded(net, "tiny FDAT")


def tiny_craft(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.CRAFT import CRAFT

    torch.manual_seed(seed)
    return _loaded(CRAFT(upscale=scale, window_size=8, embed_dim=48, depths=[2], num_heads=[2], split_size_0=4,
                         split_size_1=16, mlp_ratio=2.0), "tiny CRAFT")


def tiny_ditn(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.DITN import DITN

    torch.manual_seed(seed)
    return _loaded(DITN(upscale=scale, dim=12, UFONE_blocks=1, ITL_blocks=2), "tiny DITN")


def tiny_dctlsa(scale: int = 2, seed: int = 0) -> nn.Module:
    from spandrel.architectures.DCTLSA import DCTLSA

    torch.manual_seed(seed)
    return _loaded(DCTLSA(nf=20, num_modules=6, upscale=scale, num_head=5), "tiny DCTLSA")



def tiny_atd(scale: int = 2, seed: int = 0) -> nn.Module:
    """ATD groups tokens by a sort of their categories (stable in a quantized model, TopK in the graph)."""
    from spandrel.architectures.ATD import ATD

    torch.manual_seed(seed)
    return _loaded(ATD(upscale=scale, img_size=64, window_size=8, embed_dim=12, depths=[2], num_heads=[2],
                       mlp_ratio=2.0, num_tokens=16, reducted_dim=4, convffn_kernel_size=5,
                       upsampler="pixelshuffledirect"), "tiny ATD")


def tiny_safmn(scale: int = 2, seed: int = 0) -> nn.Module:
    """A model without attention or linears (convolutions only)."""
    from spandrel.architectures.SAFMN import SAFMN

    torch.manual_seed(seed)
    return _loaded(SAFMN(dim=12, n_blocks=2, upscaling_factor=scale), "tiny SAFMN")


def tiny_plksr(scale: int = 2, seed: int = 0) -> nn.Module:
    """A model without attention or linears (convolutions only)."""
    from spandrel.architectures.PLKSR import PLKSR

    torch.manual_seed(seed)
    return _loaded(PLKSR(dim=16, n_blocks=2, upscaling_factor=scale, kernel_size=9, split_ratio=0.25), "tiny PLKSR")


#: :func:`make_loud`'s factor on every Linear weight
LOUD_GAIN = 10.0


def make_loud(model: nn.Module, gain: float = LOUD_GAIN) -> nn.Module:
    """``model`` (float, before ``quantize_model``) with every ``nn.Linear`` weight times ``gain``, in place.

    A tiny model with random weights barely changes when quantized (its blocks are near-identity at the
    initialization's scale: tiny SwinIR x2 float vs W4A4 70 dB, W8A8 94 dB), so a check "engine matches
    fake-quant" passes a float graph as well; loud, the blocks do real work and quantization shows
    (float vs W4A4 32 dB, W8A8 52 dB).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    return model


def save_checkpoint(model: nn.Module, path: Path) -> Path:
    """``model``'s state dict (buffers included, as official files hold them) as safetensors."""
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
