"""Dynamic-batch tracing of models that compute sizes by float division.

spandrel's window transformers (SwinIR, HAT, DAT, SRFormer, Swin2SR, ...) recover the batch as
``int(windows.shape[0] / (H * W / ws / ws))``. While ``torch.export`` traces with a symbolic batch,
that quotient is a symbolic float, and ``int()`` of a symbolic float takes the example's value:
``torch.export`` then reports a constraint violation, or (pytorch/pytorch#138853) bakes the value in
silently, and the graph reshapes with batch 2 and mixes the tiles of any other batch.

:func:`exact_size_ints` shadows ``int`` in the Python modules that define the model's classes for
the duration of a trace. ``int(x)`` of a symbolic float whose expression is, with its float
divisions read as exact rational ones, an integer expression of the symbolic sizes (``4*s0 / 4.0``
is ``s0``) returns that symbolic integer; any other argument goes to the builtin. A symbolic float
that depends on a symbolic size but is not such an integer raises the constraint violation
``torch.export`` raises for code that fixes a dynamic size (:func:`export.onnx_export.to_onnx` then
exports a static batch), where the builtin would fix the batch silently.
"""
from __future__ import annotations

import builtins
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import sympy
import torch
import torch.utils._sympy.functions as sym_functions
from torch import nn
from torch._dynamo.exc import UserError, UserErrorType


@contextlib.contextmanager
def exact_size_ints(model: nn.Module) -> Iterator[None]:
    """While active, ``int()`` in the modules of ``model``'s classes keeps symbolic sizes symbolic."""
    shadowed = []
    for name in sorted({type(module).__module__ for module in model.modules()}):
        namespace = sys.modules.get(name)
        if namespace is None or "int" in vars(namespace):  # a module with its own ``int``: leave it
            continue
        namespace.int = _size_int
        shadowed.append(namespace)
    try:
        yield
    finally:
        for namespace in shadowed:
            del namespace.int


def _size_int(x: Any = 0, *args: Any) -> Any:
    if not isinstance(x, torch.SymFloat) or args:
        return builtins.int(x, *args)
    node = x.node
    if not node.expr.free_symbols:
        return builtins.int(x)
    exact = _rational(node.expr)
    if exact.is_integer and node.hint is not None:
        return node.shape_env.create_symintnode(exact, hint=builtins.int(node.hint))
    # a constraint violation, as torch.export raises when code fixes a dynamic size (the exporter then
    # traces a static batch); the builtin would fix it silently
    raise UserError(UserErrorType.CONSTRAINT_VIOLATION,
                    f"int() of the size expression {node.expr} (a float that depends on the batch) cannot be traced "
                    "exactly: the graph would only be right at the example's batch size")


def _rational(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with torch's float divisions and conversions as exact rational arithmetic."""
    if isinstance(expr, (sym_functions.FloatTrueDiv, sym_functions.IntTrueDiv)):
        return _rational(expr.args[0]) / _rational(expr.args[1])
    if isinstance(expr, sym_functions.ToFloat):
        return _rational(expr.args[0])
    if isinstance(expr, sympy.Float):
        return sympy.Rational(float(expr)) if float(expr).is_integer() else expr
    if expr.args:
        return expr.func(*[_rational(arg) for arg in expr.args])
    return expr
