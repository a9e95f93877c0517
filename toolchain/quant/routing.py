"""Run-time half of placement: route a model's own matmul calls through their quantizer modules.

Every module that issued matmul-like calls when :func:`toolchain.quant.placement.find_placement`
traced the model gets a forward that pushes a frame (the module, a call counter) on the model's
:class:`SiteRouter` and, for the outermost such module, enters the router as a
:class:`~torch.overrides.TorchFunctionMode`. The router counts the matmul-like calls of the innermost
frame exactly as placement did and hands call ``i`` to the module ``<owner>.matmul.<i>``
(a :class:`~toolchain.quant.modules.QuantMatMul`, or its export replacement) when one is there;
every other call runs unchanged. One router per model, no global state: the frames live on it and
are empty between forwards.

The forward is an instance attribute (``module.forward``) bound to the module, so ``copy.deepcopy``
(teachers, export views) rebinds it to the copy; :func:`unroute` restores the class's forward.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .einsum import einsum_as_matmul
from .placement import MATMUL_FUNCS, SITES_ATTRIBUTE

ROUTER_ATTRIBUTE = "_twodq_router"
PATH_ATTRIBUTE = "_twodq_path"
#: the frame of code whose matmul calls are no routed module's (:func:`opaque`)
BARRIER = ("<barrier>",)


class SiteRouter(TorchFunctionMode):
    """Counts matmul-like calls per routed module invocation and serves the placed sites."""

    def __init__(self, calls: dict[str, int]) -> None:
        super().__init__()
        #: expected matmul-like calls per forward of each routed module (from placement)
        self.calls = dict(calls)
        self.frames: list[list[Any]] = []  # [path, module, calls so far]

    def __deepcopy__(self, memo: dict) -> SiteRouter:
        # frames are empty between forwards; a copy starts with none
        return SiteRouter(self.calls)

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in SORTS:
            return stable_sort(func, args, kwargs)
        if func not in MATMUL_FUNCS or not self.frames:
            return func(*args, **kwargs)
        frame = self.frames[-1]
        if frame is BARRIER:
            return func(*args, **kwargs)
        path, module, index = frame
        frame[2] += 1
        if index >= self.calls.get(path, 0):
            raise RuntimeError(f"{path or '<root>'} ({type(module).__name__}) makes more than the "
                               f"{self.calls.get(path, 0)} matmul calls placement saw in one forward: its control "
                               "flow depends on the input; place the quantizers with an input like this one")
        sites = getattr(module, SITES_ATTRIBUTE, None)
        site = sites[str(index)] if isinstance(sites, nn.ModuleDict) and str(index) in sites else None
        if site is None:
            return func(*args, **kwargs)
        a, b, product = _operands(func, args, kwargs)
        return site(a, b, product=product)


#: sorts that a quantized model runs stable (ATD groups its tokens by a sort over many equal category ids)
SORTS = frozenset({torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort})


def stable_sort(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` (a sort of :data:`SORTS`) with ``stable=True``: equal values keep their order, as in the exported
    graph (ONNX ``TopK`` puts the lower index first), where PyTorch's CPU sort with ``stable=False`` orders them
    as its algorithm happens to.

    >>> x = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0] * 8)
    >>> stable_sort(torch.sort, (x, -1), {"stable": False})[1][:4].tolist()
    [1, 3, 5, 7]
    """
    x, *rest = args
    return func(x, **{**dict(zip(("dim", "descending"), rest)), **kwargs, "stable": True})


def _operands(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    if func is torch.einsum:
        operands = args[1:] if len(args) > 2 else tuple(args[1])
        plan = einsum_as_matmul(args[0])   # a plain batched product runs (and exports) as a MatMul
        if plan is not None:
            return plan.operands(operands[0], operands[1])
        return operands[0], operands[1], functools.partial(torch.einsum, args[0])
    if kwargs:
        raise RuntimeError(f"{func.__name__} with keyword arguments {sorted(kwargs)} cannot be routed")
    product = torch.bmm if func in (torch.bmm, torch.Tensor.bmm) else torch.matmul
    return args[0], args[1], product


def _routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    router: SiteRouter = self.__dict__[ROUTER_ATTRIBUTE]
    depth = len(router.frames)
    router.frames.append([self.__dict__[PATH_ATTRIBUTE], self, 0])
    try:
        if depth == 0:
            with router:
                return type(self).forward(self, *args, **kwargs)
        return type(self).forward(self, *args, **kwargs)
    finally:
        del router.frames[depth:]


@contextlib.contextmanager
def opaque() -> Iterator[None]:
    """Inside the block, matmul-like calls belong to no routed module and pass through uncounted.

    For modules added after placement that compute with ``@`` (the export view writes linears as
    ``MatMul``): their products are not their parent's calls.
    """
    routers = [m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, SiteRouter)]
    for router in routers:
        router.frames.append(BARRIER)
    try:
        yield
    finally:
        for router in routers:
            if router.frames and router.frames[-1] is BARRIER:
                router.frames.pop()


def route(model: nn.Module, calls: dict[str, int]) -> SiteRouter:
    """Give every module of ``calls`` (path -> matmul calls per forward) the routed forward."""
    if any(ROUTER_ATTRIBUTE in m.__dict__ for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already routed")
    router = SiteRouter(calls)
    modules = dict(model.named_modules())
    for path in calls:
        module = modules[path]
        if "forward" in module.__dict__:
            raise ValueError(f"{path or '<root>'} ({type(module).__name__}) has an instance forward already; "
                             "its matmul calls cannot be routed")
        module.__dict__[ROUTER_ATTRIBUTE] = router
        module.__dict__[PATH_ATTRIBUTE] = path
        module.forward = types.MethodType(_routed_forward, module)
    return router


def unroute(model: nn.Module) -> None:
    """Undo :func:`route` (the class's forward again, no router)."""
    for module in model.modules():
        if ROUTER_ATTRIBUTE in module.__dict__:
            del module.__dict__[ROUTER_ATTRIBUTE], module.__dict__[PATH_ATTRIBUTE], module.__dict__["forward"]



def is_routed(model: nn.Module) -> bool:
    return any(ROUTER_ATTRIBUTE in m.__dict__ for m in model.modules())
