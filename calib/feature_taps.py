"""Where DQC's feature term looks: the outputs of the model's repeated top-level stages, found on the tree.

2DQuant distils the outputs of SwinIR-light's four residual groups. The same idea, with no
per-architecture code: walk the module tree breadth-first from the root, treating containers
(``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict`` of exactly those classes) as transparent, and
stop at the first depth where one model-defined class (not a ``torch.nn`` building block, nor the
``toolchain.quant`` module that replaced one) occurs at least twice: those modules are the taps. SwinIR /
HAT / SRFormer: the residual groups (``layers.0`` .. ``layers.3``); NGswin: its encoder stages and decoder
(``encoder_layer1`` .. ``decoder_layer1``); DAT-light, whose one residual group holds 18 blocks: the 18
blocks. A pattern (fnmatch on module paths, e.g. ``'layers.0.blocks.*[05]'``) replaces the rule.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Optional

from torch import nn

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def feature_modules(model: nn.Module, pattern: str = "",
                    holds: Optional[Callable[[nn.Module], Any]] = None) -> list[tuple[str, nn.Module]]:
    """``[(path, module), ...]`` whose outputs DQC's feature term compares, in module order.

    ``holds``: only a class some of whose repeated modules it finds truthy counts (block reconstruction asks for blocks
    that hold quantizers: DITN repeats four convolution-only SALs beside its two attention ITLs).
    Raises ``ValueError`` when ``pattern`` matches no module or the rule finds no repeated stage.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ModuleList([_Stage(), _Stage()]), nn.Conv2d(8, 3, 3))
    >>> [path for path, _ in feature_modules(net)]
    ['1.0', '1.1']
    """
    if pattern:
        found = [(path, m) for path, m in model.named_modules() if path and fnmatch.fnmatchcase(path, pattern)]
        if not found:
            names = [path for path, _ in model.named_children()][:4]
            raise ValueError(f"feature tap pattern {pattern!r} matches no module of {type(model).__name__} "
                             f"(top-level modules: {names})")
        return found
    level = _expand([("", model)])
    while level:
        counts: dict[type, int] = {}
        for _, module in level:
            if not _is_builtin(module):
                counts[type(module)] = counts.get(type(module), 0) + 1
        repeated = [cls for cls, n in counts.items() if n >= 2
                    and (holds is None or any(holds(m) for _, m in level if type(m) is cls))]
        if repeated:
            best = max(repeated, key=lambda cls: counts[cls])
            return [(path, m) for path, m in level if type(m) is best]
        level = _expand([(f"{path}.{name}" if path else name, child)
                         for path, module in level for name, child in module.named_children()])
    raise ValueError(f"{type(model).__name__} has no repeated stage to distil features from; "
                     "give a feature tap pattern (DQC --feature-taps)")


def _expand(level: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Replace containers by their children (recursively), keeping order; the root by its children."""
    out: list[tuple[str, nn.Module]] = []
    for path, module in level:
        if path == "" or type(module) in _CONTAINERS:
            out.extend(_expand([(f"{path}.{name}" if path else name, child) for name, child in module.named_children()]))
        else:
            out.append((path, module))
    return out


def _is_builtin(module: nn.Module) -> bool:
    """A ``torch.nn`` building block, or our quantized stand-in for one (``QuantLinear``, ``Quantizer``, ...)."""
    return type(module).__module__.startswith(("torch.", "toolchain.quant."))


class _Stage(nn.Module):
    """(doctest only) a model-defined stage."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.body(x)
