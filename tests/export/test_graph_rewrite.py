"""The optimizer step of :func:`export.graph_rewrite.simplify`: onnxscript's ``optimize_ir`` less one slow rule."""
from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
import pytest
import torch

from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from export.export_view import build_export_view
from export.graph_rewrite import FOLD_SIZE_LIMIT, _never_fold_qdq, optimize
from export.onnx_export import ExportOptions, _trace
from toolchain.quant import QuantConfig, quantize_model

from ..tiny_models import tiny_dat, tiny_swinir


@pytest.mark.parametrize("build, tile", [(tiny_swinir, 16), (tiny_dat, 64)], ids=["swinir", "dat"])
def test_optimize_writes_the_graph_optimize_ir_writes(build, tile: int) -> None:
    """Leaving ``SlicesSplit`` out (and composing optimize_ir's passes ourselves) changes no byte of the graph."""
    model = quantize_model(build(scale=2), QuantConfig())
    calibrate_minmax(model, batch_forward_loop(torch.rand(2, 3, tile, tile, generator=torch.Generator().manual_seed(0)),
                                               batch_size=2, progress=False))
    traced, _ = _trace(build_export_view(model, torch.float32, 0), ExportOptions(tile=tile), torch.float32)
    ours = ir.serde.deserialize_model(ir.serde.serialize_model(traced))
    theirs = ir.serde.deserialize_model(ir.serde.serialize_model(traced))
    optimize(ours)
    onnxscript.optimizer.optimize_ir(theirs, should_fold=_never_fold_qdq, input_size_limit=FOLD_SIZE_LIMIT,
                                     output_size_limit=FOLD_SIZE_LIMIT)
    assert ours.graph.num_nodes() < traced.graph.num_nodes()   # it did fold and rewrite
    assert ir.serde.serialize_model(ours).SerializeToString() == ir.serde.serialize_model(theirs).SerializeToString()
