"""Element-wise training math run as one compiled kernel where that pays, eager everywhere else.

A quantizer's straight-through backward (:class:`toolchain.quant.grid._ClipRoundScale`) is a chain of a dozen
element-wise operations and three sums over the quantized tensor. Eager PyTorch runs each as its own pass over
memory: on DAT-light's attention probabilities (12.6 million elements per branch for four 64x64 patches) that
chain was most of a block-reconstruction or DQC step on CPU. ``torch.compile`` fuses it into one loop.

:class:`CompiledKernel` wraps a pure tensor function: calls whose first tensor has at least ``min_numel``
elements run the compiled function (compiled on first use; recompiled by PyTorch for a new rank or dtype),
smaller ones the eager function itself, so small models (the tests') never wait for a compiler. Where
compiling is not possible (no C++ compiler on a CPU machine, an unsupported device) the first failure is logged
once and the eager function is used from then on. ``TWODQ_COMPILE=0`` in the environment turns it off.

The compiled function computes the same element-wise values; its sums may add in another order (last-bit
differences in a bound's gradient, none in a tensor's). Only training uses it (the quantizer's values and gradients
inside DQC and block reconstruction, bit-identical values); inference, which evaluation and the engines' reference
share, stays eager. Variants: ``torch.compile`` compiles a kernel again per rank and stride pattern of its inputs
(DAT-light: six of each kernel) up to its limit of 8, then runs new ones eagerly with a warning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["CompiledKernel", "compile_enabled"]

#: environment variable: "0" runs every kernel eagerly
ENV = "TWODQ_COMPILE"


def compile_enabled() -> bool:
    """Whether :class:`CompiledKernel` may compile (``TWODQ_COMPILE`` is not "0")."""
    return os.environ.get(ENV, "1").strip() != "0"


@contextmanager
def _without_function_modes() -> Iterator[None]:
    """No ``TorchFunctionMode`` active inside (the ones active outside are back after, in their order).

    A kernel is pure arithmetic; the mode that routes a quantized model's attention products
    (:class:`toolchain.quant.routing.SiteRouter`) passes its operations through unchanged, but ``torch.compile``
    guards on the mode stack: called inside and outside routed modules, one kernel compiled twice per shape and hit
    dynamo's limit of 8 variants (measured on DAT-light's block reconstruction)."""
    popped = []
    while torch._C._len_torch_function_stack() > 0:
        popped.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


class CompiledKernel:
    """``fn`` compiled with ``torch.compile`` for large inputs, eager for small ones or where compiling fails.

    >>> double = CompiledKernel(lambda x: x * 2, min_numel=1 << 30)   # every call below the size: eager
    >>> double(torch.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    """

    def __init__(self, fn: Callable[..., Any], min_numel: int) -> None:
        self.fn = fn
        self.min_numel = min_numel
        self._compiled: Optional[Callable[..., Any]] = None
        self.failure: Optional[str] = None   # why compiling was given up (then every call is eager)

    def uses_compiled(self, first: torch.Tensor) -> bool:
        """Whether a call whose first tensor is ``first`` runs the compiled function."""
        return first.numel() >= self.min_numel and self.failure is None and compile_enabled()

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if not self.uses_compiled(tensors[0]):
            return self.fn(*tensors)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True)
            with _without_function_modes():
                return self._compiled(*tensors)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function is the same math
            self.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            log.warning("compiling %s failed (%s); running it eagerly from now on (slower, same values)",
                        getattr(self.fn, "__name__", "a kernel"), self.failure)
            return self.fn(*tensors)
