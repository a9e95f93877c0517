"""Clean-up passes that turn the exporter's graph into the final QDQ graph.

Run in this order by :func:`simplify`:

1. name every node after the module it came from, ``<module path>/<op type>`` (read from the
   exporter's ``pkg.torch.onnx.name_scopes`` metadata; the export view's root ``model.`` is
   dropped), so Q/DQ nodes are ``<quantizer name>/QuantizeLinear`` and lint messages name layers;
   then drop node metadata and doc strings (source stack traces: noise, and they would make the
   bytes depend on where the code lives);
2. onnxscript's optimizer: constant folding (the attention masks and relative position biases of
   the fixed tile, all shape arithmetic), its rewrite rules, dead-node removal, CSE, initializer
   deduplication. Quantize/DequantizeLinear are never folded, so the integer weights stay integer.
   The rules leave out ``SlicesSplit`` (two Slices of one tensor -> one Split): its matcher scans the
   whole graph for every Slice node, which took 140 of NGswin x2's 184 s of export on this machine
   and rewrote nothing there or on DAT-light (the graphs are byte-identical with and without it;
   :func:`optimize`);
3. remove ``Pad`` nodes whose pads are all zero (a tile that is already a multiple of the window),
   and ``Expand`` nodes whose only consumers broadcast anyway (``F.normalize`` expands the norm to
   the tensor's shape before dividing; with a dynamic batch that shape is computed at run time, so
   this also removes the last shape arithmetic);
4. write the codes of blocked ``DequantizeLinear`` nodes (trt-int4 weights) as INT4 initializers;
5. name the dynamic batch dimension ``batch``, sort topologically, give every value and node a
   stable unique name.

:func:`count_ops` summarises a graph by op type.
"""
from __future__ import annotations

import ast
import collections
import logging
import re
from typing import Optional

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
BATCH_DIM = "batch"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
BROADCASTING_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
#: largest constant folded (elements): the shifted-window mask of a 64x64 tile, (1, 64, 1, 64, 64), fits
FOLD_SIZE_LIMIT = 1 << 20


def count_ops(graph: ir.Graph) -> dict[str, int]:
    """``{op_type: count}`` over the top-level nodes of ``graph``, most frequent first."""
    counts = collections.Counter(node.op_type for node in graph)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def simplify(model: ir.Model, static_batch: Optional[int] = None) -> ir.Model:
    """Apply the passes of the module docstring to ``model`` in place and return it.

    ``static_batch``: the graph was traced for this many tiles per call (else its batch is dynamic)."""
    name_nodes_by_module(model.graph)
    common_passes.ClearMetadataAndDocStringPass()(model)
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    quiet = _DropMessages("Skipping constant folding for op LayerNormalization with multiple outputs")
    folding_log.addFilter(quiet)  # one line per LayerNorm of the model, about nothing we can act on
    try:
        optimize(model)
    finally:
        folding_log.removeFilter(quiet)
    removed = remove_zero_pads(model.graph) + remove_broadcast_expands(model.graph)
    drop_default_qdq_attributes(model.graph)
    packed = pack_int4_weights(model.graph)
    name_batch_dim(model.graph, static_batch)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    common_passes.NameFixPass()(model)
    log.debug("simplify: %d zero pads / redundant expands removed, %d weights packed as int4", removed, packed)
    return model


#: onnxscript rewrite rules left out of :func:`optimize` (module docstring, step 2)
SKIPPED_RULES = ("SlicesSplit",)


def optimize(model: ir.Model, iterations: int = 2) -> None:
    """onnxscript's ``optimize_ir`` (folding with Q/DQ kept, rewrites, clean-up) without :data:`SKIPPED_RULES`.

    The pass sequence is ``optimize_ir``'s; where this onnxscript names its pieces differently, ``optimize_ir``
    itself runs (every default rule: slower, the same graph on the models measured).
    """
    try:
        from onnxscript.optimizer._constant_folding import FoldConstantsPass
        from onnxscript.rewriter import _DEFAULT_REWRITE_RULES, RewritePass
    except ImportError:
        log.debug("onnxscript without the pieces of optimize_ir: running it whole")
        onnxscript.optimizer.optimize_ir(model, should_fold=_never_fold_qdq, input_size_limit=FOLD_SIZE_LIMIT,
                                         output_size_limit=FOLD_SIZE_LIMIT)
        return
    rules = [rule for rule in _DEFAULT_REWRITE_RULES if getattr(rule, "name", None) not in SKIPPED_RULES]
    fold_and_rewrite = ir.passes.PassManager(
        [FoldConstantsPass(shape_inference=True, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT,
                           should_fold=_never_fold_qdq),
         RewritePass(rules),
         common_passes.RemoveUnusedNodesPass(),
         common_passes.RemoveUnusedFunctionsPass(),
         common_passes.RemoveUnusedOpsetsPass()],
        steps=iterations, early_stop=True)
    ir.passes.Sequential(
        common_passes.InlinePass(),
        fold_and_rewrite,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def name_nodes_by_module(graph: ir.Graph, root: str = "model.") -> None:
    """Rename nodes ``<module path>/<op type>`` (``_1``, ``_2``... for repeats) from the exporter's scopes.

    Nodes without scope metadata keep their names.
    """
    seen: collections.Counter = collections.Counter()
    for node in graph:
        scopes = node.metadata_props.get(NAME_SCOPES)
        if not scopes:
            continue
        try:
            path = [scope for scope in ast.literal_eval(scopes)[:-1] if scope][-1:]
        except (ValueError, SyntaxError):
            continue
        module = _clean_scope(path[0]).removeprefix(root) if path and path[0] != root.rstrip(".") else ""
        base = f"{module}/{node.op_type}" if module else node.op_type
        node.name = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1


def _clean_scope(scope: str) -> str:
    """A module path as the model names it: routed modules (:mod:`toolchain.quant.routing`) have an
    instance ``forward``, which the exporter reaches as ``__dict__['_modules']['x'].forward.__self__``."""
    scope = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", scope)
    return scope.replace(".forward.__self__", "")


def _never_fold_qdq(node: ir.Node) -> bool | None:
    return False if node.op_type in QDQ_OPS and node.domain == "" else None


def remove_zero_pads(graph: ir.Graph) -> int:
    """Bypass and delete ``Pad`` nodes whose ``pads`` input is a constant of zeros; returns how many."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Pad" or node.domain != "" or len(node.inputs) < 2:
            continue
        pads = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        output = node.outputs[0]
        if pads is None or np.any(pads.numpy() != 0) or output.is_graph_output():
            continue
        output.replace_all_uses_with(node.inputs[0])
        graph.remove(node, safe=True)
        removed += 1
    return removed


def remove_broadcast_expands(graph: ir.Graph) -> int:
    """Bypass ``Expand`` nodes whose every consumer is a binary broadcasting op whose other operand
    already has the expanded shape (the result is the same without the expand); returns how many."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Expand" or node.domain != "":
            continue
        output = node.outputs[0]
        uses = list(output.uses())
        if not uses or output.is_graph_output() or output.shape is None:
            continue
        if all(use.node.op_type in BROADCASTING_OPS and len(use.node.inputs) == 2
               and use.node.inputs[1 - use.idx] is not None and use.node.inputs[1 - use.idx].shape is not None
               and list(use.node.inputs[1 - use.idx].shape) == list(output.shape) for use in uses):
            output.replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            removed += 1
    return removed


def drop_default_qdq_attributes(graph: ir.Graph) -> None:
    """Remove Q/DQ attributes that only restate defaults: ``saturate`` (float8 only), ``output_dtype`` 0,
    ``block_size`` 0, and ``axis`` where the scale is a scalar (per tensor)."""
    for node in graph:
        if node.op_type not in QDQ_OPS or node.domain != "":
            continue
        attributes = node.attributes
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        per_tensor = scale is not None and scale.shape is not None and len(scale.shape) == 0
        for name in ("saturate", "output_dtype", "block_size", "axis"):
            if name not in attributes:
                continue
            value = attributes[name].as_int()
            if (name == "saturate" or (name in ("output_dtype", "block_size") and value == 0)
                    or (name == "axis" and per_tensor)):
                attributes.pop(name)


def pack_int4_weights(graph: ir.Graph) -> int:
    """Re-type the int8 codes and zero points of blocked DequantizeLinear nodes as INT4; returns how many.

    The export view writes trt-int4 weights as int8 codes in -8..7 (torch has no int4 dtype); the
    blocked ``DequantizeLinear`` (``block_size`` attribute) marks them.
    """
    packed = 0
    for node in graph:
        if node.op_type != "DequantizeLinear" or not node.attributes.get_int("block_size", 0):
            continue
        for value in node.inputs[0::2]:  # codes and zero point; the scale stays float
            if value is not None and value.dtype == ir.DataType.INT4:
                continue  # an initializer shared with another blocked node, already packed
            if value is None or value.const_value is None:
                raise ValueError(f"{node.name}: blocked DequantizeLinear input {value} is not an initializer")
            array = value.const_value.numpy()
            if array.dtype != np.int8 or array.min(initial=0) < -8 or array.max(initial=0) > 7:
                raise ValueError(f"{node.name}: {value.name} does not hold int8 codes in the int4 range -8..7")
            value.const_value = ir.tensor(array.astype(ml_dtypes.int4), name=value.name)
            value.dtype = ir.DataType.INT4
        packed += 1
    return packed


def name_batch_dim(graph: ir.Graph, static_batch: Optional[int] = None) -> None:
    """Call the first dimension of the graph's inputs and outputs ``batch`` (it is symbolic), or check
    that it is ``static_batch``."""
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None or len(value.shape) == 0:
            continue
        dims = list(value.shape)
        if static_batch is not None:
            if dims[0] != static_batch:
                raise ValueError(f"graph {value.name} has batch {dims[0]}; expected the static batch {static_batch}")
            continue
        if isinstance(dims[0], int):
            raise ValueError(f"graph {value.name} has a fixed batch size {dims[0]}; expected a dynamic batch")
        dims[0] = ir.SymbolicDim(BATCH_DIM)
        value.shape = ir.Shape(dims)
