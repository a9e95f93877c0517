"""The fold base (calib/transforms/fold.py): baking writes folds into plain tensors and refuses what it does not own."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from calib.transforms.fold import FoldParametrization, _fold_modules, _original, bake_transforms


class _Scale(FoldParametrization):
    """A fold: the tensor times a learnable factor it owns."""

    def __init__(self) -> None:
        super().__init__()
        self._share("factor", nn.Parameter(torch.tensor(2.0)), owner=True)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.factor


class _Foreign(nn.Module):
    """Not a fold: someone else's parametrization."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + 1


def test_bake_writes_folds_into_plain_tensors_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    x = torch.randn(5, 4)
    weight = model[0].weight.detach().clone()
    parametrize.register_parametrization(model[0], "weight", _Scale())
    parametrize.register_parametrization(model[1], "bias", _Scale())
    assert torch.equal(_original(model[0], "weight"), weight)
    assert [type(p) for p in _fold_modules(model[0], "weight")] == [_Scale]
    with torch.no_grad():
        folded = model(x)
        assert bake_transforms(model) is model
        assert torch.equal(model(x), folded)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # no factor left
    assert torch.equal(model[0].weight, weight * 2)


def test_bake_refuses_a_tensor_with_a_foreign_parametrization():
    linear = nn.Linear(2, 2)
    parametrize.register_parametrization(linear, "weight", _Scale())
    parametrize.register_parametrization(linear, "weight", _Foreign())
    with pytest.raises(ValueError, match="foreign parametrizations"):
        bake_transforms(linear)
    assert parametrize.is_parametrized(linear, "weight")  # left as it was
    other = nn.Linear(2, 2)
    parametrize.register_parametrization(other, "weight", _Foreign())
    bake_transforms(other)  # a tensor with no fold is not ours: kept
    assert parametrize.is_parametrized(other, "weight")
