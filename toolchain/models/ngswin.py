"""NGswin: N-gram Swin Transformer for lightweight image super-resolution.

Our implementation of the architecture of H. Choi, J. Lee and J. Yang, "N-Gram in Swin Transformers for
Efficient Lightweight Image Super-Resolution", CVPR 2023. Module and parameter names equal those of the
authors' released code and checkpoints (https://github.com/rami0205/NGramSwin, Apache-2.0 license), so
the official ``NGswin_x2.pth`` / ``NGswin_x3.pth`` load strictly; the code itself is written anew.

Data flow for an LR image ``(N, 3, H, W)`` in [0, 1] (``w`` window size, ``D`` embed dim):

1. zero-pad right/bottom to a multiple of ``pad_multiple = 2**(stages-1) * w`` (32), then
   ``(x - mean) / std`` with the training set statistics of the scale;
2. ``shallow_extract``: 3x3 conv -> ``c0`` ``(N, H, W, D)``;
3. encoder stages ``encoder_layer{i}`` at ``H / 2**(i-1)``: stage ``i > 1`` reads the concatenation of
   the 2x2 max-pooled previous input and the previous stage's patch-merged output, projected back to
   ``D`` (``across_cascade_proj``). Inside a stage, block ``j`` reads block ``j-1``'s input plus output;
   the stage output ``e_i`` is the last block's output; patch merging reads output plus input;
4. ``bottleneck`` (SCDP): each ``e_i`` plus the LeakyReLU of the ``i-1`` times max-pooled shallow
   feature, pixel-shuffled up to full size (``D / 4**(i-1)`` channels), concatenated (``84``), 3x3
   depthwise conv, GELU, point-wise linear, LayerNorm;
5. ``decoder_layer1`` on bottleneck + ``e_1``; ``norm``; + ``c0`` (global skip);
6. ``to_target``: 3x3 conv, pixel shuffle, 3x3 conv; ``* std + mean``; crop to ``scale * (H, W)``.

Each N-gram Swin block (:mod:`.ngswin_blocks`) adds a per-window N-gram context to the window tokens,
runs scaled-cosine window attention (``attn``; the N-gram context has its own, ``ngram_attn``) and an
MLP, with post-norm residuals. Both attention products are plain ``@``: the scores take the
L2-normalized queries ``(B_, heads, N, d)`` and the L2-normalized, transposed keys ``(B_, heads, d, N)``
(the per-head logit scale multiplies the cosines afterwards); the context takes the softmax
probabilities ``(B_, heads, N, N)`` and the values ``(B_, heads, N, d)``.

spandrel has no NGswin; :class:`NGswinArch` is its ``Architecture`` (key detection, hyper-parameters
from tensor shapes), registered beside spandrel's own by :func:`toolchain.models.registry`. Its
descriptor's ``size_requirements`` (multiple of 32, minimum the N-gram context needs) carry the
official evaluation protocol: the LR image is padded *symmetrically* to a multiple of 32 before the
forward, whose own zero padding is then a no-op. Without that, zero padding costs about 0.6 dB (Set5 x2).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from spandrel import Architecture, ImageModelDescriptor, ModelTiling, SizeRequirements, StateDict
from torch import nn

from .ngswin_blocks import NGramSwinBlock, shifted_window_mask


# Normalization statistics of the official training data, by scale.
_MEAN = (0.4485, 0.4375, 0.4045)
_STD = {2: (0.2397, 0.2290, 0.2389), 3: (0.2373, 0.2265, 0.2367), 4: (0.2352, 0.2244, 0.2349)}


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (top-left, top-right, bottom-left, bottom-right), LayerNorm, linear.

    ``(B, H, W, D)`` -> ``(B, H/2, W/2, D)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class NGramStage(nn.Module):
    """A stack of N-gram Swin blocks (even blocks plain windows, odd blocks shifted by ``w/2``).

    ``forward(x)``: ``(B, H, W, in_dim)`` -> ``(out, merged)``: ``out`` ``(B, H, W, dim)`` the last block's
    output; ``merged`` ``(B, H/2, W/2, dim)`` patch-merged (output + input of the last block), or ``None``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, ngram: int,
                 mlp_ratio: float, in_dim: int, downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.across_cascade_proj = nn.Linear(in_dim, dim) if in_dim != dim else None
        shifts = [0 if i % 2 == 0 else window_size // 2 for i in range(depth)]
        self.blocks = nn.ModuleList(
            NGramSwinBlock(dim, num_heads, window_size, shift, ngram, mlp_ratio) for shift in shifts)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.across_cascade_proj is not None:
            x = self.across_cascade_proj(x)
        _, height, width, _ = x.shape
        mask = None
        if len(self.blocks) > 1:  # computed once for all shifted blocks of the stage
            mask = shifted_window_mask(height, width, self.window_size, self.window_size // 2, x.device)
        block_in, out = x, x
        for i, block in enumerate(self.blocks):
            if i > 0:
                block_in = out + block_in
            out = block(block_in, mask)
        merged = self.downsample(out + block_in) if self.downsample is not None else None
        return out, merged


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling of a channels-last map ``(B, H, W, C)`` -> ``(B, H/2, W/2, C)``."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def _pixel_shuffle_last(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel shuffle of a channels-last map: ``(B, h, w, C*f*f)`` -> ``(B, h*f, w*f, C)``."""
    batch, rows, cols, channels = x.shape
    x = x.view(batch, rows, cols, channels // factor ** 2, factor, factor).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, rows * factor, cols * factor, channels // factor ** 2)


class SCDPBottleneck(nn.Module):
    """Shuffle, Concatenate, Depthwise conv, Point-wise projection of the encoder outputs.

    ``forward(shallow (B, D, H, W), [e_i (B, H/2**i, W/2**i, D)])`` -> ``(B, H, W, dec_dim)``.
    """

    def __init__(self, stages: int, dim: int, dec_dim: int):
        super().__init__()
        concat = sum(dim // 4 ** i for i in range(stages))
        self.pool_act = nn.LeakyReLU()
        self.depthwise = nn.Conv2d(concat, concat, 3, padding=1, groups=concat)
        self.act = nn.GELU()
        self.pointwise = nn.Linear(concat, dec_dim)
        self.norm = nn.LayerNorm(dec_dim)

    def forward(self, shallow: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        pooled = shallow
        parts = []
        for i, feature in enumerate(features):
            if i > 0:
                pooled = F.max_pool2d(pooled, 2)
            parts.append(_pixel_shuffle_last(feature + self.pool_act(pooled).permute(0, 2, 3, 1), 2 ** i))
        x = self.act(self.depthwise(torch.cat(parts, dim=-1).permute(0, 3, 1, 2)))
        return self.norm(self.pointwise(x.permute(0, 2, 3, 1)))


class NGswin(nn.Module):
    """NGswin (see the module docstring). ``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, scale*H, scale*W)``."""

    def __init__(self, scale: int, embed_dim: int = 64, depths: tuple[int, ...] = (6, 4, 4),
                 num_heads: tuple[int, ...] = (6, 4, 4), dec_depth: int = 6, dec_num_heads: int = 6,
                 window_size: int = 8, ngrams: tuple[int, ...] = (2, 2, 2, 2), mlp_ratio: float = 2.0,
                 in_chans: int = 3):
        super().__init__()
        if scale not in _STD:
            raise ValueError(f"NGswin scale must be one of {sorted(_STD)}, got {scale}")
        if len(num_heads) != len(depths) or len(ngrams) != len(depths) + 1:
            raise ValueError(f"NGswin needs one head count per encoder stage and one n-gram per stage "
                             f"(encoders + decoder): depths={depths}, num_heads={num_heads}, ngrams={ngrams}")
        self.scale = scale
        self.window_size = window_size
        self.pad_multiple = 2 ** (len(depths) - 1) * window_size
        # Stage i works at 1/2**i of the padded size; its N-gram context needs ngrams[i] windows per side.
        self.min_padded_size = max([n * window_size * 2 ** i for i, n in enumerate(ngrams[:-1])]
                                   + [ngrams[-1] * window_size, self.pad_multiple])
        self.hyperparameters = dict(scale=scale, embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                                    dec_depth=dec_depth, dec_num_heads=dec_num_heads, window_size=window_size,
                                    ngrams=list(ngrams), mlp_ratio=mlp_ratio, in_chans=in_chans)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD[scale]).view(1, 3, 1, 1), persistent=False)

        self.shallow_extract = nn.Sequential(OrderedDict(conv1=nn.Conv2d(in_chans, embed_dim, 3, padding=1)))
        self.encoder_stages = len(depths)
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.add_module(f"encoder_layer{i + 1}", NGramStage(
                embed_dim, depth, heads, window_size, ngrams[i], mlp_ratio, in_dim=(i + 1) * embed_dim,
                downsample=i + 1 < len(depths)))
        self.bottleneck = SCDPBottleneck(len(depths), embed_dim, embed_dim)
        self.decoder_layer1 = NGramStage(embed_dim, dec_depth, dec_num_heads, window_size, ngrams[-1],
                                         mlp_ratio, in_dim=embed_dim, downsample=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.to_target = nn.Sequential(OrderedDict(
            before_shuffle=nn.Conv2d(embed_dim, in_chans * scale ** 2, 3, padding=1),
            shuffler=nn.PixelShuffle(scale),
            to_origin=nn.Conv2d(in_chans, in_chans, 3, padding=1)))

    def _encoders(self) -> list[NGramStage]:
        return [getattr(self, f"encoder_layer{i + 1}") for i in range(self.encoder_stages)]

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        _, _, height, width = lr.shape
        unit = self.pad_multiple
        # Zero padding in [0, 1] space, before normalization, as the official forward does.
        x = F.pad(lr, (0, -width % unit, 0, -height % unit))
        if min(x.shape[2:]) < self.min_padded_size:
            raise ValueError(f"NGswin input {height}x{width} is too small: padded to a multiple of {unit}, "
                             f"each side must reach {self.min_padded_size} (N-gram context needs n windows "
                             "per side at every stage)")
        shallow = self.shallow_extract((x - self.mean) / self.std)  # (N, D, H, W)
        cascade = shallow.permute(0, 2, 3, 1)
        stage_in, features = cascade, []
        for stage in self._encoders():
            out, merged = stage(stage_in)
            features.append(out)
            if merged is not None:
                stage_in = torch.cat([_max_pool(stage_in), merged], dim=-1)
        decoded, _ = self.decoder_layer1(self.bottleneck(shallow, features) + features[0])
        feature = (self.norm(decoded) + cascade).permute(0, 3, 1, 2)
        sr = self.to_target(feature) * self.std + self.mean
        return sr[:, :, :height * self.scale, :width * self.scale]


_DETECT_KEYS = ("shallow_extract.conv1.weight", "bottleneck.pointwise.weight", "to_target.before_shuffle.weight",
                "encoder_layer1.blocks.0.attn.qkv.weight", "decoder_layer1.blocks.0.attn.qkv.weight")


def matches(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint holds NGswin's learnable tensors (N-gram context, SCDP bottleneck)."""
    return (all(key in state_dict for key in _DETECT_KEYS)
            and any(".ngram_window_partition.ngram_context." in key for key in state_dict))


def _stage_shape(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, int, int]:
    """(depth, heads, ngram) of the stage whose keys start with ``prefix``."""
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if not blocks:
        raise ValueError(f"NGswin checkpoint has no blocks under '{prefix}'")
    first = f"{prefix}blocks.0."
    heads = state_dict[first + "attn.logit_scale"].shape[0]
    gram_table = state_dict[first + "ngram_window_partition.ngram_context.ngram_attn."
                            "relative_position_bias_table"]
    return max(blocks) + 1, heads, (math.isqrt(gram_table.shape[0]) + 1) // 2


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`NGswin` read from the checkpoint's tensor shapes.

    >>> net = NGswin(2, embed_dim=12, depths=(2, 1), num_heads=(2, 2), dec_depth=1, dec_num_heads=2,
    ...              ngrams=(2, 2, 2))
    >>> config = config_from_state_dict(net.state_dict())
    >>> config["depths"], config["dec_depth"], config["window_size"]
    ([2, 1], 1, 8)
    >>> config == net.hyperparameters
    True
    """
    if not matches(state_dict):
        raise ValueError("state dict is not an NGswin checkpoint "
                         "(no shallow_extract / bottleneck / N-gram context keys)")
    embed_dim, in_chans = state_dict["shallow_extract.conv1.weight"].shape[:2]
    shuffle_channels = state_dict["to_target.before_shuffle.weight"].shape[0]
    scale = math.isqrt(shuffle_channels // in_chans)
    if in_chans * scale ** 2 != shuffle_channels:
        raise ValueError(f"NGswin to_target.before_shuffle has {shuffle_channels} outputs, "
                         f"not {in_chans} * scale**2 for an integer scale")
    stages = sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"encoder_layer(\d+)\.", key))})
    encoders = [_stage_shape(state_dict, f"encoder_layer{i}.") for i in stages]
    dec_depth, dec_heads, dec_ngram = _stage_shape(state_dict, "decoder_layer1.")
    window_table = state_dict["encoder_layer1.blocks.0.attn.relative_position_bias_table"]
    window = (math.isqrt(window_table.shape[0]) + 1) // 2
    hidden = state_dict["encoder_layer1.blocks.0.ffn.fc1.weight"].shape[0]
    return dict(scale=scale, embed_dim=embed_dim, depths=[d for d, _, _ in encoders],
                num_heads=[h for _, h, _ in encoders], dec_depth=dec_depth, dec_num_heads=dec_heads,
                window_size=window, ngrams=[n for _, _, n in encoders] + [dec_ngram],
                mlp_ratio=hidden / embed_dim, in_chans=in_chans)


class NGswinArch(Architecture[NGswin]):
    """spandrel ``Architecture`` of NGswin: detection by its keys, hyper-parameters from shapes."""

    def __init__(self) -> None:
        super().__init__(id="NGswin", name="NGswin", detect=matches)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[NGswin]:
        config = config_from_state_dict(state_dict)
        for key in ("depths", "num_heads", "ngrams"):
            config[key] = tuple(config[key])
        model = NGswin(**config)
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose="SR", tags=[f"{config['embed_dim']}dim"],
            supports_half=False, supports_bfloat16=True, scale=config["scale"], input_channels=config["in_chans"],
            output_channels=config["in_chans"],
            size_requirements=SizeRequirements(minimum=model.min_padded_size, multiple_of=model.pad_multiple),
            tiling=ModelTiling.SUPPORTED)
