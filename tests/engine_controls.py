"""Negative controls of the engine-agreement tests: engines that do not compute the quantized model.

A tiny model with random weights barely changes when quantized, so a whole-model check "the engine
matches fake-quant >= 60 dB" passes a graph with no Q/DQ just as well. An agreement test therefore makes
its check see quantization in one of two ways, and shows the check failing on broken engines:

- the model is loud (:func:`tests.tiny_models.make_loud`): quantization shows in the output, so the
  whole-model floor separates the float graph;
- :func:`assert_codes_agree` compares the exact integer codes of every activation quantizer
  (:mod:`engines.code_agreement`), which a float graph does not have and a one-step scale error changes
  (:func:`assert_codes_fail_on_broken_engines`).

The broken engines: :func:`float_export` (the same model with every quantizer disabled, through the same
exporter: a float graph with the same metadata) and :func:`perturb_one_scale` (one ``QuantizeLinear``'s
scale, and its ``DequantizeLinear``'s, one step wider).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from calib.artifact import load_artifact, load_quantized_model
from engines.code_agreement import CodeAgreement, code_agreement, reference_codes
from engines.ort_engine import build_ort_engine
from export.onnx_export import ExportOptions, Provenance, export_model
from toolchain.files import sha256_file
from toolchain.quant import float_mode, grid, quantizers
from toolchain.tolerances import ORT_MIN_IDENTICAL


def float_export(model: nn.Module, path: str | os.PathLike, options: ExportOptions, provenance: Provenance) -> Path:
    """``model`` with every quantizer disabled, exported to ``path`` as its QDQ export is (no Q/DQ node);
    the quantizers' flags are restored after."""
    with float_mode(model):
        export_model(model, path, options, provenance)
    return Path(path)


def float_export_of(checkpoint: str | os.PathLike, artifact: str | os.PathLike, path: str | os.PathLike,
                    options: ExportOptions) -> Path:
    """:func:`float_export` of the model ``export_onnx(checkpoint, artifact, ...)`` exports, with its provenance."""
    meta = load_artifact(artifact).meta
    provenance = Provenance(meta["checkpoint_sha256"], sha256_file(artifact), meta["quant_config"])
    return float_export(load_quantized_model(checkpoint, artifact), path, options, provenance)


def perturb_one_scale(qdq: str | os.PathLike, out: str | os.PathLike, node_name: str, bits: int) -> Path:
    """``qdq`` with the scale of the ``QuantizeLinear`` named ``node_name`` (and of its ``DequantizeLinear``)
    one step wider: the ``bits``-bit grid then spans one level more than the quantizer's bounds."""
    model = onnx.load(str(qdq))
    nodes = {node.name: node for node in model.graph.node}
    quantize = nodes[node_name]
    scale_name = quantize.input[1]
    value = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == scale_name))
    levels = grid.levels(bits)
    wider = onnx.numpy_helper.from_array((value * (levels + 1) / levels).astype(value.dtype), scale_name + "_perturbed")
    model.graph.initializer.append(wider)
    quantize.input[1] = wider.name
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == quantize.output[0]:
            node.input[1] = wider.name
    onnx.save(model, str(out))
    return Path(out)


def assert_codes_agree(engine: str | os.PathLike, model: nn.Module, tiles: torch.Tensor) -> list[CodeAgreement]:
    """Per activation quantizer call, the engine's integer codes on ``tiles`` equal the fake-quant ``model``'s:
    exactly at the first (same float input), elsewhere up to a float-noise flip of one level now and then."""
    rows = code_agreement(engine, model, tiles, threads=2)
    assert rows and rows[0].identical == 1.0 and rows[0].max_difference == 0, rows[:1]
    assert all(row.identical >= ORT_MIN_IDENTICAL and row.max_difference <= 1 for row in rows), \
        [row for row in rows if row.identical < ORT_MIN_IDENTICAL or row.max_difference > 1]
    return rows


@dataclass(frozen=True)
class Perturbed:
    """A QDQ export with one activation quantizer's scale one step wider, and its ORT engine."""

    graph: Path
    engine: Path
    #: the perturbed ``QuantizeLinear`` (``<quantizer>/QuantizeLinear``) and its quantizer's name
    node: str
    quantizer: str


def perturbed_engine(qdq: str | os.PathLike, model: nn.Module, tiles: torch.Tensor, folder: Path) -> Perturbed:
    """``qdq`` (the export of the fake-quant ``model``) with the scale of the first activation quantizer that
    ``model(tiles)`` calls one step wider, built with ONNX Runtime under ``folder``."""
    node = next(iter(reference_codes(model, tiles)))
    quantizer = node.rsplit("/", 1)[0]
    graph = perturb_one_scale(qdq, folder / "perturbed.onnx", node, quantizers(model)[quantizer].bits)
    engine = folder / "perturbed.ort.onnx"
    build_ort_engine(graph, engine, threads=2)
    return Perturbed(graph, engine, node, quantizer)


def assert_codes_fail_on_broken_engines(float_engine: str | os.PathLike, perturbed: Perturbed, model: nn.Module,
                                        tiles: torch.Tensor) -> None:
    """The check of :func:`assert_codes_agree` fails on both broken engines: the float engine has no codes to
    compare, and the perturbed one disagrees at the perturbed quantizer."""
    with pytest.raises(ValueError, match="no QuantizeLinear nodes"):
        code_agreement(float_engine, model, tiles, threads=2)
    row = next(row for row in code_agreement(perturbed.engine, model, tiles, threads=2) if row.node == perturbed.node)
    assert row.identical < ORT_MIN_IDENTICAL, row
