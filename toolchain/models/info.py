"""What the tools need to know of an SR model, read from its spandrel descriptor.

A model loaded by :func:`toolchain.load_model` is spandrel's own ``nn.Module`` (the official
architecture code, untouched) carrying one extra attribute, :data:`INFO_ATTRIBUTE`: a frozen
:class:`ModelInfo` made from the descriptor (architecture id, scale, channels, size requirements,
hyper-parameters). Nothing is set per architecture by hand; a model built in memory gets the same
through :func:`with_info` from its descriptor (``spandrel.ModelLoader().load_from_state_dict``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

INFO_ATTRIBUTE = "sr_info"
#: side of the default placement / detection example (a multiple of every window size used here)
EXAMPLE_SIZE = 64


@dataclass(frozen=True)
class ModelInfo:
    """Scale and input rules of an SR model (from spandrel's ``ImageModelDescriptor``).

    ``multiple_of`` / ``minimum``: LR sides must be multiples of ``multiple_of`` and at least
    ``minimum`` (the evaluator pads by mirror concatenation to satisfy both; a model that pads
    internally, as SwinIR and DAT do, says 1). ``hyperparameters``: what spandrel inferred from the
    checkpoint (JSON-ready), recorded in artifacts so that a mismatched pair is refused.
    """

    arch: str
    scale: int
    input_channels: int = 3
    output_channels: int = 3
    multiple_of: int = 1
    minimum: int = 0
    tags: tuple[str, ...] = ()
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def input_multiple(self) -> int:
        return self.multiple_of

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (artifact sidecars, ONNX metadata)."""
        return json.loads(json.dumps({**asdict(self), "tags": list(self.tags)}, default=str))


def with_info(descriptor: Any) -> nn.Module:
    """``descriptor.model`` (float32, eval mode) carrying the :class:`ModelInfo` of ``descriptor``.

    ``descriptor``: a spandrel ``ImageModelDescriptor``.
    """
    model = descriptor.model
    requirements = descriptor.size_requirements
    hyper = getattr(model, "hyperparameters", {}) or {}
    info = ModelInfo(str(descriptor.architecture.id), int(descriptor.scale), int(descriptor.input_channels),
                     int(descriptor.output_channels), int(requirements.multiple_of), int(requirements.minimum),
                     tuple(str(t) for t in descriptor.tags), json.loads(json.dumps(hyper, default=str)))
    model.__dict__[INFO_ATTRIBUTE] = info
    return model.float().eval()


def info_of(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model from :func:`toolchain.load_model` / :func:`with_info`."""
    info = model.__dict__.get(INFO_ATTRIBUTE)
    if not isinstance(info, ModelInfo):
        raise TypeError(f"{type(model).__name__} carries no SR model description: load it with "
                        "toolchain.load_model(path), or wrap its spandrel descriptor with "
                        "toolchain.models.with_info(descriptor)")
    return info


def example_input(model: nn.Module, size: int = EXAMPLE_SIZE, seed: int = 0) -> torch.Tensor:
    """A seeded ``(1, C, S, S)`` input in [0, 1] that the model does not pad: ``S`` is ``size``
    rounded up to the model's multiple and minimum (placement and transform detection trace it)."""
    info = info_of(model)
    side = max(size, info.minimum)
    side = -(-side // info.multiple_of) * info.multiple_of
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, info.input_channels, side, side, generator=generator).to(device)
