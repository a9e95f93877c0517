"""The SR models 2dq quantizes: every architecture spandrel loads, plus NGswin registered beside them.

Models arrive from outside and are read, never re-implemented: :func:`registry` is a copy of
spandrel's ``MAIN_REGISTRY`` (SwinIR, DAT, HAT, Swin2SR, OmniSR, ...) plus ``spandrel_extra_arches``
(SRFormer, ...), extended with :class:`~toolchain.models.ngswin.NGswinArch` through spandrel's own ``ArchSupport`` (spandrel has no
NGswin; its code here follows the official checkpoints' names). What a tool needs to know of a model
(scale, input size rules, channels) comes from the spandrel descriptor (:mod:`.info`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .info import ModelInfo, example_input, info_of, with_info

if TYPE_CHECKING:
    from spandrel import ArchRegistry


@functools.lru_cache(maxsize=1)
def registry() -> ArchRegistry:
    """spandrel's architectures and NGswin (a copy: spandrel's global registry is left as it is).

    spandrel is imported here, not with the package: it brings torchvision and every architecture (about
    1.3 s), which the tools that only run engines (``2dq-upscale --engine``, ``2dq-eval --engine``) never need.
    """
    from spandrel import MAIN_REGISTRY, ArchSupport
    from spandrel_extra_arches import EXTRA_REGISTRY

    from .ngswin import NGswinArch

    extended = MAIN_REGISTRY.copy()
    extended.add(*EXTRA_REGISTRY.architectures("insertion"), ignore_duplicates=True)  # SRFormer, ...
    extended.add(ArchSupport.from_architecture(NGswinArch()))
    return extended


def supported_architectures() -> list[str]:
    """The ids of every architecture :func:`registry` detects, in detection order."""
    return [str(support.architecture.id) for support in registry().architectures("detection")]


__all__ = ["ModelInfo", "example_input", "info_of", "registry", "supported_architectures", "with_info"]
