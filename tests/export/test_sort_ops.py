"""export.sort_ops: a stable torch.sort exports as TopK and orders equal values as PyTorch does; an unstable one is
refused (ATD's token grouping, tests/test_families.py, runs through both sides of this)."""
from __future__ import annotations

import io
import contextlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.sort_ops import sort_translations


class Grouping(nn.Module):
    """Sorts each row's rounded values (many ties) and gathers the input in that order, as ATD groups tokens."""

    def __init__(self, stable: bool, descending: bool = False) -> None:
        super().__init__()
        self.stable, self.descending = stable, descending

    def forward(self, x):
        _, order = torch.sort((x * 3).round(), dim=-1, stable=self.stable, descending=self.descending)
        return torch.gather(x, -1, order)


def _export(module: nn.Module) -> bytes:
    program = torch.export.export(module, (torch.rand(2, 64),), strict=False)
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(program, opset_version=21, optimize=False,
                                         custom_translation_table=sort_translations(21))
    return onnx_program.model_proto.SerializeToString()


@pytest.mark.parametrize("descending", [False, True])
def test_stable_sort_exports_as_topk_with_the_same_order(descending: bool) -> None:
    module = Grouping(stable=True, descending=descending)
    graph = _export(module)
    assert b"TopK" in graph
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    x = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(out, module(x).numpy())   # the same permutation, ties included


def test_unstable_sort_is_refused() -> None:
    with pytest.raises(Exception, match="unstable torch.sort"):
        _export(Grouping(stable=False))


def test_float_export_of_a_sorting_model_says_why_first(tmp_path) -> None:
    """The float ATD sorts unstably (not routed): 2dq-export --float refuses it, the reason leading the message."""
    from export.onnx_export import ExportOptions, export_float_onnx

    from ..tiny_models import save_checkpoint, tiny_atd

    checkpoint = save_checkpoint(tiny_atd(), tmp_path / "atd.safetensors")
    with pytest.raises(RuntimeError, match=r"failed at tile 32: an unstable torch.sort \(stable=False\) has no ONNX"):
        export_float_onnx(checkpoint, tmp_path / "atd.onnx", ExportOptions(tile=32))
    assert not (tmp_path / "atd.onnx").exists()
