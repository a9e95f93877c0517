"""SwinIR (Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCV-W 2021).

Our implementation of the official architecture for super-resolution, with parameter names equal
to the official checkpoint keys. Two upsamplers: ``pixelshuffledirect`` (SwinIR-light: one conv and
one pixel shuffle) and ``pixelshuffle`` (classical SwinIR: conv + LeakyReLU, then conv/shuffle
stages). No quantization code lives here: quantizers attach from outside to the ``nn.Linear``
layers and to the two :class:`~toolchain.models.common.MatMul` modules of every window attention.

Shapes: images are ``(B, C, H, W)``; token sequences are ``(B, H*W, C)``; windows are
``(B*nW, N, C)`` with ``N = window_size**2`` tokens per window and ``nW`` windows per image.

Attention masks of the shifted windows depend on the input size, so they are computed in each
forward pass from Python ints (:func:`shifted_window_mask`) instead of being stored: an ONNX trace
at a fixed tile size bakes them as constants. The official checkpoints do store them (and the
relative position indices) as buffers; the loader drops those (:data:`STORED_BUFFERS`).

One official behaviour is not reproduced: the official blocks fall back to a single unshifted
window when the *training* image size (``img_size``) is not larger than the window, which never
happens for the released SR models (``img_size`` 48 or 64, window 8).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import MatMul

ARCH = "swinir"
RGB_MEAN = (0.4488, 0.4371, 0.4040)
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect")
RESI_CONNECTIONS = ("1conv", "3conv")
# Tensors the official checkpoints carry that we recompute (last component of the key).
STORED_BUFFERS = ("attn_mask", "relative_position_index")
# Official value added to attention logits across the seams of a shifted window.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into windows ``(B*nW, window*window, C)``, batch outermost."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, window*window, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    """``(N, N)`` int64: row of the bias table for each (query, key) pair of a window.

    The table has ``(2*window - 1)**2`` rows, one per 2-D offset between two tokens.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((rows.flatten(), cols.flatten()))  # (2, N)
    offset = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), in [0, 2w-2]
    return offset[0] * (2 * window - 1) + offset[1]


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(nW, N, N)`` float32 mask for shifted windows: 0 inside a region, ``MASK_VALUE`` across.

    After the cyclic shift by ``-shift``, the last ``window`` rows (columns) of the padded map hold
    tokens from up to three regions (bulk, last window, wrapped-around strip); tokens may only
    attend within their region. ``height`` and ``width`` are multiples of ``window``. Computed
    with numpy from the sizes alone, so a traced graph holds the mask as a constant.
    """
    height, width = int(height), int(width)

    def region(size: int) -> np.ndarray:  # 0 bulk, 1 last window before the strip, 2 strip
        index = np.arange(size)
        return (index >= size - window).astype(np.int64) + (index >= size - shift)

    ids = region(height)[:, None] * 3 + region(width)[None, :]  # (H, W)
    ids = ids.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    ids = ids.reshape(-1, window * window)  # (nW, N), windows in window_partition's order
    mask = np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32)
    return torch.from_numpy(mask).to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.matmul_qk = MatMul()
        self.matmul_pv = MatMul()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B*nW, N, C)``, ``mask`` ``(nW, N, N)`` or None -> ``(B*nW, N, C)``."""
        windows, n, c = x.shape
        qkv = self.qkv(x).reshape(windows, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, head_dim)
        attn = self.matmul_qk(q * self.head_scale, k.transpose(-2, -1))  # (B*nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.view(-1, n_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.softmax(attn)
        out = self.matmul_pv(attn, v)  # (B*nW, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(windows, n, c))


class Mlp(nn.Module):
    """Token-wise feed-forward: ``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention and MLP, each pre-normalized with a residual add."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, x_size: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` ``(B, H*W, C)``; ``mask`` is the shifted-window mask, used only if shifted."""
        height, width = x_size
        b, _, c = x.shape
        y = self.norm1(x).view(b, height, width, c)
        if self.shift_size:
            y = torch.roll(y, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        y = self.attn(window_partition(y, self.window_size), mask if self.shift_size else None)
        y = window_merge(y, self.window_size, height, width)
        if self.shift_size:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x + y.reshape(b, height * width, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """A stack of blocks alternating regular and shifted windows."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, qkv_bias) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                qkv_bias,
            )
            for i in range(depth)
        )

    def forward(self, x, x_size, mask):
        for block in self.blocks:
            x = block(x, x_size, mask)
        return x


def _residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group (and the body): ``1conv`` or the cheaper ``3conv``."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


def _tokens_to_image(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` -> ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x_size[0], x_size[1])


class RSTB(nn.Module):
    """Residual Swin Transformer Block: a residual group of blocks, a conv, a skip connection.

    Maps tokens ``(B, H*W, C)`` to tokens of the same shape; its output is what DQC distils.
    """

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, qkv_bias, resi_connection):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window_size, mlp_ratio, qkv_bias)
        self.conv = _residual_conv(dim, resi_connection)

    def forward(self, x, x_size, mask):
        y = self.conv(_tokens_to_image(self.residual_group(x, x_size, mask), x_size))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Feature map ``(B, C, H, W)`` -> normalized tokens ``(B, H*W, C)`` (patch size 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


def _init_weights(module: nn.Module) -> None:
    """The official initialization (matters only when training from scratch)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SwinIR(nn.Module):
    """SwinIR for super-resolution: ``(N, in_chans, H, W)`` in [0, 1] -> ``(N, in_chans, sH, sW)``.

    >>> model = SwinIR.lightweight(4).eval()
    >>> model(torch.rand(1, 3, 20, 30)).shape
    torch.Size([1, 3, 80, 120])
    """

    arch = ARCH

    def __init__(
        self, *, scale: int, in_chans: int = 3, embed_dim: int = 60,
        depths: tuple[int, ...] | list[int] = (6, 6, 6, 6),
        num_heads: tuple[int, ...] | list[int] = (6, 6, 6, 6), window_size: int = 8,
        mlp_ratio: float = 2.0, upsampler: str = "pixelshuffledirect",
        resi_connection: str = "1conv", img_range: float = 1.0, qkv_bias: bool = True,
        num_feat: int = 64,
    ) -> None:
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if resi_connection not in RESI_CONNECTIONS:
            raise ValueError(f"resi_connection must be one of {RESI_CONNECTIONS}, got {resi_connection!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if upsampler == "pixelshuffle" and scale != 3 and scale & (scale - 1):
            raise ValueError(f"upsampler 'pixelshuffle' supports scales 2^n and 3, got {scale}")
        self.config = {
            "scale": int(scale), "in_chans": int(in_chans), "embed_dim": int(embed_dim),
            "depths": [int(d) for d in depths], "num_heads": [int(h) for h in num_heads],
            "window_size": int(window_size), "mlp_ratio": float(mlp_ratio), "upsampler": upsampler,
            "resi_connection": resi_connection, "img_range": float(img_range),
            "qkv_bias": bool(qkv_bias), "num_feat": int(num_feat),
        }
        self.scale = int(scale)
        self.input_multiple = int(window_size)
        self.window_size = int(window_size)
        self.img_range = float(img_range)
        self.upsampler = upsampler
        mean = RGB_MEAN if in_chans == 3 else (0.0,)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, depth, heads, window_size, mlp_ratio, qkv_bias, resi_connection)
            for depth, heads in zip(depths, num_heads)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU()
            )
            stages = [(3, 9)] if scale == 3 else [(2, 4)] * int(math.log2(scale))
            self.upsample = nn.Sequential(*(
                module for factor, width in stages
                for module in (nn.Conv2d(num_feat, width * num_feat, 3, 1, 1), nn.PixelShuffle(factor))
            ))
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, scale * scale * in_chans, 3, 1, 1), nn.PixelShuffle(scale)
            )
        self.apply(_init_weights)

    @classmethod
    def lightweight(cls, scale: int) -> SwinIR:
        """SwinIR-light as released: 60 channels, 4 groups of 6 blocks, 6 heads, window 8."""
        return cls(scale=scale)

    @classmethod
    def classical(cls, scale: int) -> SwinIR:
        """Classical SwinIR as released: 180 channels, 6 groups of 6 blocks, ``pixelshuffle``."""
        return cls(scale=scale, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6,
                   upsampler="pixelshuffle")

    def residual_groups(self) -> list[nn.Module]:
        """The RSTB modules, whose token outputs ``(B, H*W, C)`` DQC distils."""
        return list(self.layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: ``(B, C, H, W)`` -> ``(B, C, H, W)``; H, W multiples of the window."""
        height, width = x.shape[-2:]
        mask = None
        if any(len(layer.residual_group.blocks) > 1 for layer in self.layers):
            mask = shifted_window_mask(
                height, width, self.window_size, self.window_size // 2, device=x.device
            ).to(x.dtype)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, (height, width), mask)
        return _tokens_to_image(self.norm(tokens), (height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] -> ``(N, C, scale*H, scale*W)``.

        The input is padded by reflection to a multiple of the window size and the output cropped.
        """
        if x.dim() != 4 or x.shape[1] != self.config["in_chans"]:
            raise ValueError(f"expected (N, {self.config['in_chans']}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.window_size, -width % self.window_size
        if pad_h >= height or pad_w >= width:
            raise ValueError(
                f"input {height}x{width} is too small to reflect-pad to a multiple of "
                f"{self.window_size} (each side needs more pixels than the padding)"
            )
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        if self.upsampler == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        x = x / self.img_range + self.mean
        return x[..., : height * self.scale, : width * self.scale]


_BLOCK = re.compile(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.")


def matches(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's tensors have SwinIR's names."""
    return (
        "conv_first.weight" in state_dict
        and "patch_embed.norm.weight" in state_dict
        and "layers.0.residual_group.blocks.0.attn.relative_position_bias_table" in state_dict
    )


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`SwinIR` inferred from tensor shapes.

    ``img_range`` cannot be seen in the weights and is the official 1.0.

    Raises:
        ValueError: the tensors do not describe a SwinIR we can build.
    """
    blocks: dict[int, int] = {}
    for key in state_dict:
        found = _BLOCK.match(key)
        if found:
            layer, block = int(found[1]), int(found[2])
            blocks[layer] = max(blocks.get(layer, 0), block + 1)
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"residual groups are not numbered 0..n-1: {sorted(blocks)}")
    first = "layers.0.residual_group.blocks.0."
    try:
        embed_dim, in_chans = state_dict["conv_first.weight"].shape[:2]
        table_rows = state_dict[first + "attn.relative_position_bias_table"].shape[0]
        hidden = state_dict[first + "mlp.fc1.weight"].shape[0]
        num_heads = [
            state_dict[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
            for i in range(len(blocks))
        ]
    except KeyError as err:
        raise ValueError(f"SwinIR tensor {err.args[0]} is missing") from None
    window_size = (math.isqrt(table_rows) + 1) // 2
    if (2 * window_size - 1) ** 2 != table_rows:
        raise ValueError(f"relative_position_bias_table has {table_rows} rows, not (2w-1)^2")
    config = {
        "in_chans": int(in_chans), "embed_dim": int(embed_dim),
        "depths": [blocks[i] for i in range(len(blocks))], "num_heads": [int(h) for h in num_heads],
        "window_size": window_size, "mlp_ratio": hidden / embed_dim, "img_range": 1.0,
        "qkv_bias": first + "attn.qkv.bias" in state_dict,
        "resi_connection": "3conv" if "conv_after_body.0.weight" in state_dict else "1conv",
        "num_feat": 64,
    }
    if "conv_before_upsample.0.weight" in state_dict:
        num_feat = state_dict["conv_before_upsample.0.weight"].shape[0]
        stages = [k for k in state_dict if re.fullmatch(r"upsample\.\d+\.weight", k)]
        if not stages:
            raise ValueError("'pixelshuffle' upsampler without upsample convs")
        widened = state_dict["upsample.0.weight"].shape[0] // num_feat
        scale = 3 if widened == 9 else 2 ** len(stages)
        config.update(upsampler="pixelshuffle", num_feat=int(num_feat), scale=scale)
    elif "upsample.0.weight" in state_dict:
        squared = state_dict["upsample.0.weight"].shape[0] // in_chans
        scale = math.isqrt(squared)
        if scale * scale * in_chans != state_dict["upsample.0.weight"].shape[0]:
            raise ValueError(f"upsample.0.weight has {state_dict['upsample.0.weight'].shape[0]} "
                             f"output channels, not scale^2 * {in_chans}")
        config.update(upsampler="pixelshuffledirect", scale=scale)
    else:
        raise ValueError("no upsampler found (supported: pixelshuffle, pixelshuffledirect)")
    return config


def build(**config) -> SwinIR:
    """A :class:`SwinIR` from constructor arguments (as :func:`config_from_state_dict` gives)."""
    return SwinIR(**config)
