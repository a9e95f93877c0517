"""Two-operand einsums written as permute, reshape and matmul (toolchain/quant/einsum.py)."""
from __future__ import annotations

import pytest
import torch

from toolchain.quant.einsum import einsum_as_matmul


@pytest.mark.parametrize("equation, shapes", [
    ("b h i d, b h j d -> b h i j", [(2, 3, 5, 4), (2, 3, 6, 4)]),        # OmniSR's q k^T
    ("b h i j, b h j d -> b h i d", [(2, 3, 5, 6), (2, 3, 6, 4)]),        # and its probs v
    ("hbwpc,hbwqc->hbwpq", [(2, 3, 4, 5, 6), (2, 3, 4, 7, 6)]),           # SCUNet
    ("bhdn,bhen->bhde", [(2, 3, 4, 9), (2, 3, 5, 9)]),                    # linear attention (contraction last in both)
    ("bnd,bmd->bmn", [(2, 5, 4), (2, 6, 4)]),                             # output axes in another order
    ("bxyk,bkz->bzyx", [(2, 3, 4, 5), (2, 5, 6)]),                        # two row axes, one merged group
    ("ij,jk->ik", [(3, 4), (4, 5)]),                                      # no batch
    ("bij,bj->bi", [(2, 3, 4), (2, 4)]),                                  # no column axis
])
def test_plan_matches_einsum(equation: str, shapes: list) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*shape, generator=generator) for shape in shapes)
    plan = einsum_as_matmul(equation)
    assert plan is not None
    x, y, product = plan.operands(a, b)
    assert x.dim() == y.dim() and x.shape[-1] == y.shape[-2]     # (..., M, K) @ (..., K, N)
    assert torch.allclose(product(x, y), torch.einsum(equation, a, b), atol=1e-5)


@pytest.mark.parametrize("equation", ["...ij,...jk->...ik", "ii,ij->j", "ij,jk,kl->il", "bij,bjk", "bij,bjk->bik,",
                                      "bik,bjk->bi"])
def test_no_plan_for_other_equations(equation: str) -> None:
    """Ellipses, repeated letters, three operands, implicit outputs and letters summed inside one operand keep the
    einsum (the router then runs it as it is)."""
    assert einsum_as_matmul(equation) is None
