"""Dynamic-batch tracing of spandrel's window code: ``int(windows.shape[0] / ...)`` stays symbolic."""
from __future__ import annotations

import builtins

import pytest
import torch
from spandrel.architectures.SwinIR.__arch import SwinIR as swinir_code
from torch import nn
from torch._dynamo.exc import UserError

from export.exact_sizes import exact_size_ints


class Windows(nn.Module):
    """spandrel's SwinIR window split and merge: ``(N, 16, 16, C)`` -> the same, through 8x8 windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = swinir_code.window_partition(x, 8)  # (4N, 8, 8, C)
        return swinir_code.window_reverse(windows * 2, 8, 16, 16)  # N = int(4N / 4.0)


class Swinir(nn.Module):
    """Holds a spandrel SwinIR block, so that spandrel's SwinIR module is among the shadowed ones."""

    def __init__(self) -> None:
        super().__init__()
        self.block = swinir_code.Mlp(4, 4)
        self.windows = Windows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.windows(x)


class Fraction(nn.Module):
    """A size that is not an integer expression of the batch: ``int(N / 2.5)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[: int(x.shape[0] / 2.5)]


def export(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=64)
    with exact_size_ints(module):
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)


def test_window_reverse_keeps_the_batch_dynamic():
    program = export(Swinir(), torch.rand(2, 16, 16, 3))
    for batch in (1, 3, 5):
        x = torch.rand(batch, 16, 16, 3, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(program.module()(x), Swinir()(x), rtol=0, atol=0)
    sizes = [node.args[1] for node in program.graph.nodes if node.target == torch.ops.aten.view.default]
    assert sizes and all(2 not in size[:1] for size in sizes)  # no view starts with the example's batch


def test_inexact_size_is_a_constraint_violation():
    with pytest.raises(UserError, match=r"int\(\) of the size expression"):
        export(Fraction(), torch.rand(5, 3))


def test_the_shadow_is_scoped_and_transparent():
    with exact_size_ints(Swinir()):
        assert swinir_code.int is not builtins.int
        assert (swinir_code.int("7"), swinir_code.int(3.9), swinir_code.int("ff", 16)) == (7, 3, 255)
        assert swinir_code.int(torch.tensor(4.0)) == 4
    assert "int" not in vars(swinir_code) and "int" not in globals()
