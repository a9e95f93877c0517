"""Where quantizers go, found on the model by one traced forward: no per-architecture code.

Design. SR transformers write their attention as plain tensor code (``q @ k.transpose(-2, -1)``,
``torch.matmul``, ``einsum``) inside modules that differ in every architecture, so placement cannot
look for module types alone. :func:`find_placement` runs the float model once on an example input
under a :class:`~torch.overrides.TorchFunctionMode` that sees every torch call, plus forward hooks on
every module, and follows the data: each tensor carries a small :class:`Flow` (does it depend on the
image, which product made it, is it a softmax or GELU output). From that trace:

- every ``nn.Linear`` / ``nn.Conv2d`` that is called on image-dependent data is a site; one whose input
  does not depend on the image (DAT's dynamic position-bias MLP over relative coordinates) is a
  constant of the export, not a quantizer;
- every matmul-like call (``@``, which reaches the mode as ``Tensor.matmul``, ``torch.matmul``,
  ``bmm``, ``einsum`` of two operands) whose two operands both depend on the image is a site,
  named by the innermost module that issues it and its call order in that module's forward:
  ``<module path>.matmul.<i>``, quantizers ``.a`` / ``.b``;
- roles come from data flow, never from names: an operand that is a softmax output (through
  reshapes, dropout, slicing) is ``attn_probs`` and its partner ``attn_v``; a product whose output
  reaches a softmax is the score product (``attn_q`` / ``attn_k``); a linear input that is a GELU
  output is ``mlp_hidden``; anything else ``linear_input`` / ``matmul_a`` / ``matmul_b`` /
  ``conv_input``.

Why call interception rather than FX or ``torch.export``: both need the whole forward to be
traceable (SR models branch on input sizes, build masks from Python ints, pad by data-dependent
amounts); interception runs the model's own eager code, so anything that runs, places. The matmul
sites are then served at run time by :mod:`toolchain.quant.routing`, which counts calls the same way.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

#: the calls that multiply two tensors (``a @ b`` reaches a TorchFunctionMode as ``Tensor.matmul``)
MATMUL_FUNCS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                          torch.bmm, torch.Tensor.bmm, torch.einsum})
SOFTMAX_FUNCS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})
GELU_FUNCS = frozenset({F.gelu})
#: calls whose output holds (a subset of) the input's values unchanged: a softmax or GELU output stays one
VALUE_PRESERVING = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "clone", "dropout", "__getitem__", "chunk",
    "split", "unbind", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "to", "float", "detach",
    "narrow", "select", "type", "view_as", "reshape_as", "expand_as", "mT", "t", "roll", "repeat"})
#: the name of the child that holds a module's matmul sites (``<module>.matmul.<i>``)
SITES_ATTRIBUTE = "matmul"


@dataclass(frozen=True)
class Flow:
    """What one traced tensor is: image-dependent, made by which products, a softmax/GELU output."""

    image: bool = False
    #: the matmul calls (``(owner, index)``) upstream of this tensor with no linear/conv/product between
    products: frozenset = frozenset()
    #: "probs" (softmax output), "gelu" (GELU output) or None
    kind: Optional[str] = None


_CONSTANT = Flow()


def _merge(flows: list[Flow]) -> Flow:
    if not flows:
        return _CONSTANT
    products: frozenset = frozenset().union(*(f.products for f in flows))
    return Flow(any(f.image for f in flows), products, None)


@dataclass(frozen=True)
class LayerSite:
    """An ``nn.Linear`` / ``nn.Conv2d`` at ``path`` called on image data; ``input_role`` from data flow."""

    path: str
    selection: str  # "linear" | "conv"
    input_role: str


@dataclass(frozen=True)
class MatMulSite:
    """Call ``index`` of the matmul-like calls of module ``owner``; both operands depend on the image."""

    owner: str
    index: int
    role_a: str
    role_b: str
    op: str  # "matmul" | "bmm" | "einsum:<equation>"

    @property
    def path(self) -> str:
        return f"{self.owner}.{SITES_ATTRIBUTE}.{self.index}" if self.owner else f"{SITES_ATTRIBUTE}.{self.index}"


@dataclass(frozen=True)
class Placement:
    """Everything :func:`find_placement` found, in call order.

    ``calls``: for every module that issued matmul-like calls, how many it issued per forward (the
    run-time router checks the count).
    """

    layers: tuple[LayerSite, ...]
    matmuls: tuple[MatMulSite, ...]
    calls: dict[str, int] = field(default_factory=dict)
    #: linears/convs called only on data that does not depend on the image (exported as constants)
    constant_layers: tuple[str, ...] = ()
    #: matmul calls with at most one image-dependent operand (weights or constants: not sites)
    constant_matmuls: int = 0


class _Recorder(TorchFunctionMode):
    """The traced forward: flows of every tensor, module stack, matmul/softmax/layer events."""

    def __init__(self) -> None:
        super().__init__()
        self.flows: dict[int, tuple[weakref.ref, Flow]] = {}
        self.stack: list[list[Any]] = []  # [path, calls issued in this invocation]
        self.layer_inputs: dict[str, list[Flow]] = {}
        self.matmul_calls: dict[tuple[str, int], list[tuple[Flow, Flow, str]]] = {}
        self.calls: dict[str, int] = {}
        self.scores: set[tuple[str, int]] = set()

    # -- flows ------------------------------------------------------------------------------------
    def flow(self, t: Any) -> Flow:
        entry = self.flows.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return _CONSTANT

    def set_flow(self, t: torch.Tensor, flow: Flow) -> None:
        self.flows[id(t)] = (weakref.ref(t), flow)

    # -- module hooks -----------------------------------------------------------------------------
    def enter(self, path: str, module: nn.Module, args: tuple) -> None:
        self.stack.append([path, 0])
        if type(module) in (nn.Linear, nn.Conv2d) and args and isinstance(args[0], torch.Tensor):
            self.layer_inputs.setdefault(path, []).append(self.flow(args[0]))

    def leave(self, path: str, module: nn.Module, output: Any) -> None:
        frame = self.stack.pop()
        if frame[1]:
            seen = self.calls.get(path)
            if seen is not None and seen != frame[1]:
                raise ValueError(f"placement: {path or '<root>'} issued {seen} and then {frame[1]} matmul calls "
                                 "in one forward; call order cannot name its products")
            self.calls[path] = frame[1]
        if type(module) in (nn.Linear, nn.Conv2d) and isinstance(output, torch.Tensor):
            self.set_flow(output, replace(self.flow(output), products=frozenset(), kind=None))

    # -- torch calls ------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = [self.flow(t) for t in leaves]
        result = func(*args, **kwargs)
        out_leaves = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if func in MATMUL_FUNCS and self.stack:
            flow = self._matmul(func, args, leaves, inputs)
        elif func in SOFTMAX_FUNCS:
            self.scores.update(inputs[0].products if inputs else ())
            flow = replace(_merge(inputs), products=frozenset(), kind="probs")
        elif func in GELU_FUNCS:
            flow = replace(_merge(inputs), products=frozenset(), kind="gelu")
        elif getattr(func, "__name__", "") in VALUE_PRESERVING and len(set(map(id, leaves))) == 1:
            flow = inputs[0]
        else:
            flow = _merge(inputs)
        if getattr(func, "__name__", "") == "__setitem__" and leaves:
            self.set_flow(leaves[0], _merge(inputs))
        for t in out_leaves:
            self.set_flow(t, flow)
        return result

    def _matmul(self, func: Callable, args: tuple, leaves: list, inputs: list[Flow]) -> Flow:
        frame = self.stack[-1]
        key = (frame[0], frame[1])
        frame[1] += 1
        op = _op_name(func, args)
        if len(leaves) == 2:
            self.matmul_calls.setdefault(key, []).append((inputs[0], inputs[1], op))
        return Flow(any(f.image for f in inputs), frozenset({key}), None)


def _op_name(func: Callable, args: tuple) -> str:
    if func is torch.einsum:
        return f"einsum:{args[0]}"
    if func in (torch.bmm, torch.Tensor.bmm):
        return "bmm"
    return "matmul"


def find_placement(model: nn.Module, example: torch.Tensor) -> Placement:
    """Trace one float forward of ``model`` on ``example`` ``(N, C, H, W)`` and return the sites.

    The model must not carry quantizers yet. Raises ``ValueError`` if the forward fails (the message
    names the model and the example's shape).

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    >>> [(s.path, s.input_role) for s in find_placement(model, torch.rand(2, 4)).layers]
    [('0', 'linear_input'), ('2', 'mlp_hidden')]
    """
    recorder = _Recorder()
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, path=path: recorder.enter(path, m, a)))
        handles.append(module.register_forward_hook(
            lambda m, a, out, path=path: recorder.leave(path, m, out)))
    example = example.detach().clone()
    recorder.set_flow(example, Flow(image=True))
    try:
        with torch.no_grad(), recorder:
            model(example)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"placement: the float forward of {type(model).__name__} on an input of shape "
                         f"{tuple(example.shape)} failed: {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    return _placement(model, recorder)


def _placement(model: nn.Module, recorder: _Recorder) -> Placement:
    modules = dict(model.named_modules())
    layers, constants = [], []
    for path, flows in recorder.layer_inputs.items():
        if not any(f.image for f in flows):
            constants.append(path)
            continue
        selection = "linear" if type(modules[path]) is nn.Linear else "conv"
        role = "conv_input" if selection == "conv" else (
            "mlp_hidden" if all(f.kind == "gelu" for f in flows if f.image) else "linear_input")
        layers.append(LayerSite(path, selection, role))
    matmuls, constant_matmuls = [], 0
    for (owner, index), calls in recorder.matmul_calls.items():
        if not all(a.image and b.image for a, b, _ in calls):
            constant_matmuls += 1
            continue
        ops = {op for _, _, op in calls}
        if len(ops) != 1:
            raise ValueError(f"placement: call {index} of {owner or '<root>'} is sometimes {sorted(ops)}")
        a, b, op = calls[0]
        matmuls.append(MatMulSite(owner, index, *_matmul_roles(a, b, (owner, index) in recorder.scores), op))
    order = {path: i for i, path in enumerate(modules)}
    layers.sort(key=lambda s: order[s.path])
    matmuls.sort(key=lambda s: (order[s.owner], s.index))
    for owner in {s.owner for s in matmuls}:
        taken = getattr(modules[owner], SITES_ATTRIBUTE, None)
        if taken is not None:
            raise ValueError(f"placement: {owner or '<root>'} ({type(modules[owner]).__name__}) already has an "
                             f"attribute {SITES_ATTRIBUTE!r}; its matmul sites cannot be named")
    generic = [s.path for s in matmuls if s.role_a == "matmul_a"]
    if generic:  # DOBI picks its search mode by role: say where the attention pattern was not seen
        log.warning("placement: %d products outside the attention pattern (no softmax before or after) get the "
                    "generic roles matmul_a / matmul_b: %s", len(generic), ", ".join(generic[:5]))
    log.info("placement: %d linears, %d convs, %d matmuls (%d constant layers, %d constant products)",
             sum(s.selection == "linear" for s in layers), sum(s.selection == "conv" for s in layers),
             len(matmuls), len(constants), constant_matmuls)
    return Placement(tuple(layers), tuple(matmuls), dict(recorder.calls), tuple(sorted(constants, key=order.get)),
                     constant_matmuls)


def _matmul_roles(a: Flow, b: Flow, is_score: bool) -> tuple[str, str]:
    if a.kind == "probs":
        return "attn_probs", "attn_v"
    if is_score:
        return "attn_q", "attn_k"
    return "matmul_a", "matmul_b"
