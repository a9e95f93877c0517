"""Building blocks shared by the SR transformer models (no quantization code here).

Attention products are modules (:class:`MatMul`) rather than bare ``@`` so that tools outside the
model (quantizer attachment, export) can find both operands of every attention matmul by module type.
"""
from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    """``a @ b`` as a module: the two operands of an attention matmul, named by position."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b
