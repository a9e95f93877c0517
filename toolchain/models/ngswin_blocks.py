"""The N-gram Swin Transformer block (NSTB) of NGswin and its parts.

Feature maps are channels-last ``(B, H, W, C)`` throughout; windows are ``(B * nW, N, C)`` with the
window index ordered (batch, window row, window column) and ``N = window_size**2`` tokens in raster
order. Module and parameter names follow the official checkpoints (see :mod:`.ngswin`).

Both attention products are plain ``@`` in the model's code, in the main window attention and in the
N-gram context alike (both are :class:`CosineWindowAttention`); quantizer placement finds them by
tracing (:mod:`toolchain.quant.placement`):

- scores ``q_unit @ k_unit_t``: ``q_unit`` ``(B_, heads, N, d)`` is the query divided by its L2 norm
  over the head channels, ``k_unit_t`` ``(B_, heads, d, N)`` the L2-normalized key, transposed. The
  product is the cosine similarity in [-1, 1]; the learned per-head logit scale multiplies it
  *after* the matmul, then the relative position bias (and shifted-window mask) are added.
- context ``probs @ v``: the softmax probabilities ``(B_, heads, N, N)`` and the raw values
  ``(B_, heads, N, d)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The official logit scale is clamped at log(1 / 0.01) before exponentiation (Swin-V2 rule).
_MAX_LOGIT_SCALE = math.log(100.0)
# Added to attention logits between tokens that a cyclic shift brought from different regions.
_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` int64: row of the ``((2w-1)**2, heads)`` bias table for each token pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, N): row, column of each token
    delta = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # (2, N, N), in [0, 2w-2]
    return delta[0] * (2 * window_size - 1) + delta[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """``(nW, N, N)`` additive mask for windows of a map rolled by ``-shift``: 0 within a region, -100 across.

    After the roll, the last ``window_size`` rows (and columns) mix the band ``[H - w, H - shift)`` with
    the wrapped band ``[H - shift, H)``; tokens of different bands must not attend to each other.
    """
    def bands(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift).long()

    labels = bands(height)[:, None] * 3 + bands(width)[None, :]  # (H, W)
    labels = labels.view(height // window_size, window_size, width // window_size, window_size)
    labels = labels.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)  # (nW, N)
    differs = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, _MASK_VALUE)


class CosineWindowAttention(nn.Module):
    """Multi-head scaled-cosine self-attention inside windows, with a learned relative position bias table.

    ``inner = heads * (dim // heads)`` may be smaller than ``dim`` (e.g. 6 heads of 10 channels for 64).
    Input and output ``(B_, N, dim)``; ``mask`` ``(nW, N, N)`` with ``B_`` a multiple of ``nW``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        inner = (dim // num_heads) * num_heads
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q_unit = F.normalize(q, dim=-1)
        k_unit = F.normalize(k, dim=-1)
        logits = q_unit @ k_unit.transpose(-2, -1)  # (B_, heads, N, N) cosines
        logits = logits * torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        logits = logits + bias.permute(2, 0, 1)
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.view(batch // windows, windows, self.num_heads, tokens, tokens)
            logits = logits + mask[None, :, None]
            logits = logits.view(batch, self.num_heads, tokens, tokens)
        out = self.softmax(logits) @ v  # (B_, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class NGramContext(nn.Module):
    """One context vector per window from its N-gram neighbourhood of windows (the paper's N-gram context).

    Each ``w x w`` window is first embedded into one "unigram" (a depthwise ``w x w`` stride-``w`` conv
    grouping channel pairs, ``dim -> dim/2``). The forward direction lets each unigram attend over the
    ``n x n`` unigrams starting at it (itself and its lower/right neighbours); the backward direction
    over those ending at it. The ``n*n`` attention outputs are averaged, the two directions concatenated
    and mixed by a 1x1 conv. At the map border the missing ``n-1`` unigram rows (and columns) are filled
    by copying, in order, the ``n-1`` rows just inside the border, excluding the border row itself
    (for ``n = 2``: reflection).

    Input ``(B, H, W, dim)``; output ``(B, H/w, W/w, dim)``. Needs at least ``n`` windows per side.
    """

    def __init__(self, dim: int, window_size: int, ngram: int, num_heads: int):
        super().__init__()
        self.ngram = ngram
        self.unigram_embed = nn.Conv2d(dim, dim // 2, window_size, stride=window_size, groups=dim // 2)
        self.ngram_attn = CosineWindowAttention(dim // 2, num_heads, ngram)
        self.merge = nn.Conv2d(dim, dim, 1)

    def _pad(self, unigrams: torch.Tensor, forward: bool) -> torch.Tensor:
        n = self.ngram
        for dim in (2, 3):  # rows first, then columns (corners come from the row-padded map)
            length = unigrams.shape[dim]
            if forward:
                unigrams = torch.cat([unigrams, unigrams.narrow(dim, length - n, n - 1)], dim)
            else:
                unigrams = torch.cat([unigrams.narrow(dim, 1, n - 1), unigrams], dim)
        return unigrams

    def _attend(self, padded: torch.Tensor) -> torch.Tensor:
        """``(B, C, h+n-1, w+n-1)`` padded unigrams -> ``(B, C, h, w)`` mean attention output per window."""
        n = self.ngram
        grams = padded.unfold(2, n, 1).unfold(3, n, 1)  # (B, C, h, w, n, n): row, column offsets last
        batch, channels, rows, cols = grams.shape[:4]
        grams = grams.permute(0, 2, 3, 4, 5, 1).reshape(batch * rows * cols, n * n, channels)
        context = self.ngram_attn(grams).mean(dim=1)  # (B*h*w, C)
        return context.view(batch, rows, cols, channels).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unigrams = self.unigram_embed(x.permute(0, 3, 1, 2))  # (B, dim/2, h, w)
        rows, cols = unigrams.shape[2:]
        if min(rows, cols) < self.ngram:
            raise ValueError(f"N-gram context needs at least {self.ngram} windows per side, "
                             f"got {rows}x{cols}")
        forward = self._attend(self._pad(unigrams, forward=True))
        backward = self._attend(self._pad(unigrams, forward=False))
        both = torch.cat([forward, backward], dim=1)
        return self.merge(both).permute(0, 2, 3, 1)


class NGramWindowPartition(nn.Module):
    """Adds each window's N-gram context to its tokens, cyclically shifts, and cuts the map into windows.

    ``(B, H, W, dim)`` -> ``(B * nW, w*w, dim)``; the context is added in the unshifted window grid.
    """

    def __init__(self, dim: int, window_size: int, ngram: int, num_heads: int, shift: int):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.ngram_context = NGramContext(dim, window_size, ngram, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        w = self.window_size
        context = self.ngram_context(x)  # (B, H/w, W/w, dim)
        x = x.view(batch, height // w, w, width // w, w, dim) + context[:, :, None, :, None, :]
        if self.shift:
            x = x.view(batch, height, width, dim).roll((-self.shift, -self.shift), dims=(1, 2))
            x = x.view(batch, height // w, w, width // w, w, dim)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, dim)


class FeedForward(nn.Module):
    """``fc1 -> GELU -> fc2`` on ``(..., dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NGramSwinBlock(nn.Module):
    """NSTB: (shifted-)window cosine attention with N-gram context, then an MLP; post-norm residuals.

    ``x + norm1(attention(x))``, then ``x + norm2(ffn(x))``. ``(B, H, W, dim)`` -> same shape; ``mask``
    is :func:`shifted_window_mask` for this map size when ``shift > 0``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, ngram: int, mlp_ratio: float):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.ngram_window_partition = NGramWindowPartition(dim, window_size, ngram, num_heads, shift)
        self.attn = CosineWindowAttention(dim, num_heads, window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, height, width, dim = x.shape
        w = self.window_size
        windows = self.attn(self.ngram_window_partition(x), mask if self.shift else None)
        y = windows.view(batch, height // w, width // w, w, w, dim).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(batch, height, width, dim)
        if self.shift:
            y = y.roll((self.shift, self.shift), dims=(1, 2))
        x = x + self.norm1(y)
        return x + self.norm2(self.ffn(x))
