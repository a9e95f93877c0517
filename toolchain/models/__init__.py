"""SR transformer architectures known to 2dq.

Each architecture module exposes the same small protocol, used by :func:`toolchain.load_model`:

- ``ARCH``: its name (``"swinir"``, ``"ngswin"``);
- ``matches(state_dict) -> bool``: whether a checkpoint's learnable tensors belong to it;
- ``config_from_state_dict(state_dict) -> dict``: constructor arguments inferred from tensor shapes;
- ``build(**config) -> nn.Module``: the model (float, eval-ready);
- optionally ``STORED_BUFFERS``: key endings that official checkpoints store but the model
  recomputes (the loader drops them instead of calling them unexpected).

Every model built here has ``scale`` (int), ``input_multiple`` (the LR size multiple its evaluation
protocol pads to, by symmetric mirror padding), ``config`` (its JSON-serializable constructor
arguments), ``arch`` (the name above), ``residual_groups()`` (the modules whose outputs DQC distils)
and a forward mapping ``(N, 3, H, W)`` in [0, 1] to ``(N, 3, scale*H, scale*W)``.
"""
from __future__ import annotations

from types import ModuleType


def architectures() -> tuple[ModuleType, ...]:
    """The architecture modules, in the order checkpoints are matched against them."""
    from . import ngswin, swinir

    return (swinir, ngswin)
