"""Run-time routing of a model's own matmul calls to its quantizer sites (:mod:`toolchain.quant.routing`).

Checks that each routed module counts its own calls (nested ones included), that a module whose
number of calls changes at run time is refused with a clear error, that copies run their own
quantizers, that :func:`opaque` keeps foreign products out of the count, and that unrouting restores
the class's forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from calib.baselines import calibrate_minmax
from toolchain.quant import QuantConfig, float_mode, quantize_model, quantizers
from toolchain.quant.placement import find_placement
from toolchain.quant.routing import ROUTER_ATTRIBUTE, SiteRouter, is_routed, opaque, route, unroute

N = 4


def square(seed: int = 0, batch: int = 2, size: int = N) -> torch.Tensor:
    return torch.randn(batch, size, size, generator=torch.Generator().manual_seed(seed))


class Inner(nn.Module):
    """Two products of its own: ``x @ x^T`` (torch.matmul), then ``(x x^T) @ (x + 1)`` (bmm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.matmul(x, x.transpose(-2, -1))
        return torch.bmm(s, x + 1)


class Outer(nn.Module):
    """A product, then the inner module's two, then a product of its own again (einsum)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x @ (2 * x)
        y = self.inner(a)
        return torch.einsum("bij,bjk->bik", y, x)


def record(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every quantizer's input during one forward (observers: the forward itself stays the float one)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for quantizer in quantizers(model).values():
        quantizer.observer = lambda q, t: seen.setdefault(q.name, []).append(t.detach().clone())
    try:
        with torch.no_grad():
            model(x)
    finally:
        for quantizer in quantizers(model).values():
            quantizer.observer = None
    return seen


def router_of(model: nn.Module) -> SiteRouter:
    (router,) = {id(m.__dict__[ROUTER_ATTRIBUTE]): m.__dict__[ROUTER_ATTRIBUTE] for m in model.modules()
                 if ROUTER_ATTRIBUTE in m.__dict__}.values()
    return router


def test_nested_routed_modules_count_their_own_calls():
    placement = find_placement(Outer(), square())
    assert placement.calls == {"": 2, "inner": 2}
    assert [(s.path, s.op) for s in placement.matmuls] == [
        ("matmul.0", "matmul"), ("matmul.1", "einsum:bij,bjk->bik"), ("inner.matmul.0", "matmul"),
        ("inner.matmul.1", "bmm")]
    model = quantize_model(Outer(), QuantConfig(quantize=("matmul",)), example=square())
    x = square(1)
    seen = record(model, x)
    a = x @ (2 * x)
    s = a @ a.transpose(-2, -1)
    y = torch.bmm(s, a + 1)
    expected = {"matmul.0.a": x, "matmul.0.b": 2 * x, "inner.matmul.0.a": a, "inner.matmul.0.b": a.transpose(-2, -1),
                "inner.matmul.1.a": s, "inner.matmul.1.b": a + 1, "matmul.1.a": y, "matmul.1.b": x}
    assert seen.keys() == expected.keys()
    for name, tensor in expected.items():
        assert len(seen[name]) == 1 and torch.equal(seen[name][0], tensor), name
    assert router_of(model).frames == []  # nothing left between forwards


def test_each_site_quantizes_its_own_call():
    fp = Outer()
    model = quantize_model(Outer(), QuantConfig(quantize=("matmul",), a_bits=3), example=square())
    calibrate_minmax(model, lambda m: m(square(2, batch=4)))
    x = square(3)
    with torch.no_grad():
        quantized = model(x)
        with float_mode(model):
            assert torch.equal(model(x), fp(x))
        for name, quantizer in quantizers(model).items():  # each quantizer changes the output on its own
            others = {n: q.enabled for n, q in quantizers(model).items()}
            for other in quantizers(model).values():
                other.enabled = other is quantizer
            assert not torch.equal(model(x), fp(x)), name
            for n, q in quantizers(model).items():
                q.enabled = others[n]
        assert torch.equal(model(x), quantized)


def test_a_module_whose_number_of_calls_changes_at_run_time_is_refused():
    class PowerOfGram(nn.Module):
        """One product per 4 tokens: the call count depends on the input size."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(x.shape[-1] // 4):
                x = x @ x.transpose(-2, -1) / x.shape[-1]
            return x

    model = quantize_model(PowerOfGram(), QuantConfig(quantize=("matmul",)), example=square(size=4))
    with float_mode(model):
        model(square(1, size=4))
        with pytest.raises(RuntimeError, match=r"<root> \(PowerOfGram\) makes more than the 1 matmul calls "
                                               r"placement saw in one forward.*place the quantizers with an input"):
            model(square(1, size=8))
        assert router_of(model).frames == []  # the failed forward left no frame behind
        model(square(2, size=4))  # and the model still runs at the placed size


def test_a_deepcopy_runs_its_own_quantizers():
    model = quantize_model(Outer(), QuantConfig(quantize=("matmul",)), example=square())
    calibrate_minmax(model, lambda m: m(square(2, batch=4)))
    twin = copy.deepcopy(model)
    assert router_of(twin) is not router_of(model)
    assert twin.inner.forward.__self__ is twin.inner and model.inner.forward.__self__ is model.inner
    x = square(3)
    with torch.no_grad():
        before = model(x)
        assert torch.equal(twin(x), before)
        lower, upper = quantizers(twin)["inner.matmul.1.a"].lower, quantizers(twin)["inner.matmul.1.a"].upper
        quantizers(twin)["inner.matmul.1.a"].set_bounds(lower * 0.25, upper * 0.25)
        used = []
        for quantizer in quantizers(model).values():  # the original's quantizers must not run for the copy
            quantizer.observer = lambda q, t: used.append(q.name)
        changed = twin(x)
        assert used == []
        for quantizer in quantizers(model).values():
            quantizer.observer = None
        assert not torch.equal(changed, before)
        assert torch.equal(model(x), before)


class Toy(nn.Module):
    """qkv linear, score and context products, all in one module."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(N, 3 * N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class ManualLinear(nn.Module):
    """A linear written as ``x @ W^T + b``, added after placement; ``shielded`` runs it under ``opaque()``."""

    def __init__(self, linear: nn.Linear, shielded: bool) -> None:
        super().__init__()
        self.weight, self.bias, self.shielded = linear.weight, linear.bias, shielded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shielded:
            with opaque():
                return x @ self.weight.t() + self.bias
        return x @ self.weight.t() + self.bias


def test_products_of_modules_added_after_placement_stay_out_of_the_count_under_opaque():
    torch.manual_seed(0)
    model = quantize_model(Toy(), QuantConfig(quantize=("matmul",)), example=square())
    calibrate_minmax(model, lambda m: m(square(2, batch=4)))
    x = square(3)
    with torch.no_grad():
        reference = model(x)
        linear = model.qkv
        model.qkv = ManualLinear(linear, shielded=False)  # its product would be counted as the owner's call 0
        with pytest.raises(RuntimeError, match="makes more than the 2 matmul calls"):
            model(x)
        model.qkv = ManualLinear(linear, shielded=True)
        seen = record(model, x)
        assert set(seen) == {"matmul.0.a", "matmul.0.b", "matmul.1.a", "matmul.1.b"}
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-6)
    assert router_of(model).frames == []


def test_route_and_unroute():
    fp = Toy()
    model = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("matmul",), a_bits=2), example=square())
    calibrate_minmax(model, lambda m: m(square(2, batch=4)))
    x = square(3)
    assert is_routed(model) and "forward" in model.__dict__ and not is_routed(fp)
    with torch.no_grad():
        assert not torch.equal(model(x), fp(x))
        with pytest.raises(ValueError, match="already routed"):
            route(model, {"": 2})
        unroute(model)
        assert not is_routed(model) and "forward" not in model.__dict__ and ROUTER_ATTRIBUTE not in model.__dict__
        assert torch.equal(model(x), fp(x))  # the sites are still there, but nothing calls them
        router = route(model, {"": 2})
        assert isinstance(router, SiteRouter) and router_of(model) is router
        assert not torch.equal(model(x), fp(x))


def test_a_module_with_an_instance_forward_cannot_be_routed():
    toy = Toy()
    toy.forward = toy.forward  # an instance attribute, as another wrapper would leave it
    with pytest.raises(ValueError, match=r"<root> \(Toy\) has an instance forward already"):
        route(toy, {"": 2})
