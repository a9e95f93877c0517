"""A two-operand einsum that is a batched matrix product, written as one: permute, reshape, ``matmul``.

Models that write attention as ``einsum("b h i d, b h j d -> b h i j", q, k)`` (OmniSR, SCUNet, AuraSR) would
export an ONNX ``Einsum`` behind the operands' DequantizeLinear: no runtime fuses that into an integer product
(ONNX Runtime and TensorRT fuse Q/DQ into ``MatMul``), so the engine would compute the attention in float. The
router (:mod:`toolchain.quant.routing`) gives such a site the operands already laid out as ``(..., M, K)`` and
``(..., K, N)`` and ``matmul`` as the product, so the quantizers sit right before a ``MatMul`` in every graph,
with the layout of a site written with ``@`` (``q @ k^T``: the contraction last in ``a``, first in ``b``).
Per-tensor quantizers see the same values either way; einsum itself computes this way (permute and ``bmm``).

An equation it cannot write so (an ellipsis, a letter twice in one operand, a letter summed inside one operand)
stays an einsum.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["EinsumAsMatMul", "einsum_as_matmul"]


@dataclass(frozen=True)
class EinsumAsMatMul:
    """An equation's product as ``product(prepare_a(a), prepare_b(b), sizes)``: a ``matmul``, then a reshape and
    permute to the equation's output (:meth:`operands` binds the sizes).

    ``batch``, ``m``, ``n``, ``k``: the letters of the batch axes (in both operands and the output), of ``a``'s
    rows, of ``b``'s columns and of the contraction.
    """

    a_letters: str
    b_letters: str
    out_letters: str
    batch: str
    m: str
    n: str
    k: str

    def prepare_a(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` as ``(batch..., prod(m), prod(k))``."""
        return _grouped(a, self.a_letters, self.batch, (self.m, self.k))

    def prepare_b(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` as ``(batch..., prod(k), prod(n))``."""
        return _grouped(b, self.b_letters, self.batch, (self.k, self.n))

    def operands(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        """The prepared operands and the product that gives the einsum's output from them."""
        sizes = {c: a.shape[i] for i, c in enumerate(self.a_letters)}
        sizes.update({c: b.shape[i] for i, c in enumerate(self.b_letters)})
        return self.prepare_a(a), self.prepare_b(b), functools.partial(self.product, sizes=sizes)

    def product(self, a: torch.Tensor, b: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
        """The einsum's output from the prepared operands; ``sizes``: every row and column letter's size."""
        out = torch.matmul(a, b)
        lead = tuple(out.shape[:-2])
        out = out.reshape(lead + tuple(sizes[c] for c in self.m + self.n))
        order = self.batch + self.m + self.n
        return out.permute([order.index(c) for c in self.out_letters])


def _grouped(x: torch.Tensor, letters: str, batch: str, groups: tuple[str, str]) -> torch.Tensor:
    if x.dim() != len(letters):
        raise ValueError(f"einsum operand '{letters}' has {x.dim()} dimensions")
    order = batch + groups[0] + groups[1]
    x = x.permute([letters.index(c) for c in order])
    lead = tuple(x.shape[:len(batch)])
    sizes = [1, 1]
    for g, group in enumerate(groups):
        for c in group:
            sizes[g] *= x.shape[order.index(c)]
    return x.reshape(lead + tuple(sizes))


def einsum_as_matmul(equation: str) -> Optional[EinsumAsMatMul]:
    """The plan of a two-operand ``equation`` (spaces allowed), or None where it is no plain batched product.

    >>> plan = einsum_as_matmul("b h i d, b h j d -> b h i j")
    >>> plan.batch, plan.m, plan.n, plan.k
    ('bh', 'i', 'j', 'd')
    >>> q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
    >>> a, b, product = plan.operands(q, k)
    >>> a.shape, b.shape
    (torch.Size([2, 3, 5, 4]), torch.Size([2, 3, 4, 6]))
    >>> torch.allclose(product(a, b), torch.einsum("bhid,bhjd->bhij", q, k), atol=1e-6)
    True
    >>> einsum_as_matmul("...ij,...jk->...ik") is None, einsum_as_matmul("ii,ij->j") is None
    (True, True)
    """
    text = equation.replace(" ", "")
    if "..." in text or text.count("->") != 1:
        return None
    inputs, out = text.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) or not t.isalpha() for t in (a, b)) or (out and not out.isalpha()) \
            or len(set(out)) != len(out) or not set(out) <= set(a) | set(b):
        return None
    batch = "".join(c for c in a if c in b and c in out)
    m = "".join(c for c in a if c not in b and c in out)
    n = "".join(c for c in b if c not in a and c in out)
    k = "".join(c for c in a if c in b and c not in out)
    if len(batch) + len(m) + len(k) != len(a) or len(batch) + len(n) + len(k) != len(b):
        return None   # a letter summed inside one operand
    return EinsumAsMatMul(a, b, out, batch, m, n, k)
