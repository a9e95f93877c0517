"""Integer-code agreement per quantizer between an ORT engine and the PyTorch fake-quant model.

When an engine's output disagrees with the reference, this tells where: every activation
quantizer's int8 codes, as the engine computes them (the output of its ``QuantizeLinear`` node,
exposed as an extra graph output) and as the fake-quant model computes them
(:func:`toolchain.quant.grid.integer_codes` of the tensor the quantizer sees), on the same tiles.
Given the same float input the two agree exactly (the tests check it); differences come from the
float layers in between (accumulation order, LayerNorm, softmax, GELU), which move a value across
a rounding boundary, after which later layers see different codes.

Quantizer calls map to engine nodes by name: the export names a quantizer's node
``<quantizer>/QuantizeLinear``, and ``_1``, ``_2``... for its second, third call in a forward pass
(a module run twice, such as NGswin's N-gram attention for both directions).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from toolchain.quant import grid, quantizers

from .ort_engine import DISABLED_OPTIMIZERS, session_options


@dataclass(frozen=True)
class CodeAgreement:
    """Codes of one quantizer call: share identical, largest difference (in steps), element count."""

    node: str
    identical: float
    max_difference: int
    values: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_codes(model: nn.Module, tiles: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"<quantizer>/QuantizeLinear[_k]": codes}`` of every activation quantizer call of ``model(tiles)``."""
    codes: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    hooks = []
    for name, quantizer in quantizers(model).items():
        if quantizer.kind != "activation" or not quantizer.enabled:
            continue

        def record(module, args, name=name) -> None:
            index = calls.get(name, 0)
            calls[name] = index + 1
            node = f"{name}/QuantizeLinear" + (f"_{index}" if index else "")
            codes[node] = grid.integer_codes(args[0], module.lower, module.upper, module.bits, module.symmetric).numpy()

        hooks.append(quantizer.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(tiles)
    finally:
        for hook in hooks:
            hook.remove()
    return codes


def engine_codes(engine_path: str | os.PathLike, nodes: list[str], tiles: torch.Tensor,
                 threads: int | None = None, graph: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Codes (int16, zero point removed) of the named ``QuantizeLinear`` nodes of an ORT engine run on
    ``tiles``. ORT may have rewritten an int8 ``QuantizeLinear`` as uint8 with zero point 128 (its
    preferred activation type on x86); subtracting the node's zero point gives the codes back. ``graph``: the
    engine file already loaded (its outputs are extended in place)."""
    import onnxruntime as ort

    model = onnx.load(str(engine_path)) if graph is None else graph
    by_name = {node.name: node for node in model.graph.node}
    missing = [name for name in nodes if name not in by_name]
    if missing:
        raise ValueError(f"{engine_path}: no QuantizeLinear nodes named {missing[:3]} ({len(missing)} in all)")
    outputs = {by_name[name].output[0]: name for name in nodes}
    known = {o.name for o in model.graph.output}
    for tensor in outputs:
        if tensor not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    # the engine is already optimized: load it as it is, so that the nodes stay as saved
    session = ort.InferenceSession(model.SerializeToString(), session_options("basic", threads),
                                   providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))
    static = session.get_inputs()[0].shape[0]
    if isinstance(static, int) and tiles.shape[0] != static:
        raise ValueError(f"{engine_path}: a static-batch engine of {static} tiles per call; give {static} tiles, "
                         f"not {tiles.shape[0]}")
    constants = {t.name: t for t in model.graph.initializer}
    wanted = list(outputs)
    values = session.run(wanted, {"input": np.ascontiguousarray(tiles.numpy(), dtype=np.float32)})
    codes = {}
    for tensor, value in zip(wanted, values):
        node = by_name[outputs[tensor]]
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = onnx.numpy_helper.to_array(constants[zero_name]).astype(np.int16) if zero_name else 0
        codes[outputs[tensor]] = value.astype(np.int16) - zero
    return codes


def code_agreement(engine_path: str | os.PathLike, model: nn.Module, tiles: torch.Tensor,
                   threads: int | None = None) -> list[CodeAgreement]:
    """Per quantizer call, in execution order: how often the engine's codes equal the reference's.

    >>> import tempfile, calib
    >>> from export import export_onnx
    >>> from toolchain.models.examples import tiny_swinir
    >>> tiles = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(tiny_swinir(), forward_loop=lambda m: m(tiles))
    >>> folder = tempfile.TemporaryDirectory()
    >>> onnx_path = os.path.join(folder.name, "w4a4.onnx")
    >>> _ = export_onnx(qmodel, onnx_path, tile=16)
    >>> rows = code_agreement(onnx_path, qmodel, tiles)
    >>> len(rows), rows[0].node
    (8, 'layers.0.residual_group.blocks.0.attn.qkv.input/QuantizeLinear')
    >>> all(row.max_difference <= 1 for row in rows)   # equal codes, or one step apart at a rounding boundary
    True
    >>> folder.cleanup()
    """
    expected = reference_codes(model, tiles)
    graph = onnx.load(str(engine_path))
    twins = _merged_twins(engine_path, expected, graph)
    got = engine_codes(engine_path, [node for node in expected if node not in twins], tiles, threads, graph)
    rows = []
    for node, ref in expected.items():
        value = got[twins.get(node, node)]
        if value.shape != ref.shape:
            raise ValueError(f"{node}: engine codes {value.shape}, reference {ref.shape}")
        difference = np.abs(value - ref.astype(np.int16))
        rows.append(CodeAgreement(node, float(np.mean(difference == 0)), int(difference.max(initial=0)), int(ref.size)))
    return rows


def _merged_twins(engine_path: str | os.PathLike, expected: dict[str, np.ndarray],
                  graph: onnx.ModelProto | None = None) -> dict[str, str]:
    """Quantizer calls the graph has no node for -> the node that computes their codes. Two quantizers of one tensor
    with the same grid (RGT's k and v linears read one input; calibrated alike, their bounds are equal) are one
    ``QuantizeLinear`` once the exporter merges common subexpressions: the node left has the same codes in the
    reference. A call with no such twin is an error naming it. ``graph``: the engine file already loaded."""
    present = {node.name for node in (onnx.load(str(engine_path)) if graph is None else graph).graph.node}
    twins, missing = {}, []
    for node, codes in expected.items():
        if node in present:
            continue
        twin = next((other for other, values in expected.items()
                     if other in present and values.shape == codes.shape and np.array_equal(values, codes)), None)
        if twin is None:
            missing.append(node)
        else:
            twins[node] = twin
    if missing:
        raise ValueError(f"{engine_path}: no QuantizeLinear nodes named {missing[:3]} ({len(missing)} in all)")
    return twins
