"""The compiled quantizer kernels (toolchain/quant/compiled.py, grid.py) against the eager math they replace.

The test suite runs every kernel eagerly (``TWODQ_COMPILE=0``, tests/conftest.py: compiling costs seconds per
kernel and process, and the tests' models are small); the tests here turn compiling on and check that the
compiled path was really taken, that the fake quantizer's values are the eager ones bit for bit (per tensor, per
channel, ties at half steps, in training and in inference), and that its gradients are too (the gradient of the
input exactly, the bounds' sums up to their order of summation).
"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from toolchain.quant import compiled, grid

BIG = grid.COMPILED_MIN_NUMEL


def test_small_inputs_and_the_switch_stay_eager(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "1")
    kernel = compiled.CompiledKernel(lambda x: x + 1, min_numel=100)
    assert kernel(torch.zeros(99)).sum() == 99 and kernel._compiled is None    # below the size: never compiled
    monkeypatch.setenv(compiled.ENV, "0")
    assert not kernel.uses_compiled(torch.zeros(100))
    assert kernel(torch.zeros(100)).sum() == 100 and kernel._compiled is None  # switched off
    monkeypatch.setenv(compiled.ENV, "1")
    assert kernel.uses_compiled(torch.zeros(100))


def test_a_failing_compiler_falls_back_once_and_logs_it(monkeypatch, caplog):
    """Where ``torch.compile`` fails (no C++ compiler), the eager function answers, the failure is logged once
    and compiling is not tried again."""
    tries = []

    def broken(fn, **kwargs):
        tries.append(fn)
        raise RuntimeError("no working C++ compiler found\nmore lines")

    monkeypatch.setenv(compiled.ENV, "1")
    monkeypatch.setattr(torch, "compile", broken)
    kernel = compiled.CompiledKernel(lambda x: x * 3, min_numel=1)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        assert kernel(torch.ones(2)).tolist() == [3.0, 3.0]
        assert kernel(torch.ones(2)).tolist() == [3.0, 3.0]
    assert len(tries) == 1 and kernel.failure == "RuntimeError: no working C++ compiler found"
    assert len([r for r in caplog.records if "compiling" in r.getMessage()]) == 1
    assert not kernel.uses_compiled(torch.ones(2))


@pytest.mark.parametrize("fails", [False, True], ids=["runs", "raises"])
def test_function_modes_are_off_inside_a_kernel_and_back_after(fails, monkeypatch):
    """A kernel runs without the router's ``TorchFunctionMode`` (torch.compile guards on the mode stack: one more
    variant per stack) and the modes are back after it, also when the kernel raises."""
    seen = []

    class Counting(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def probe(x):
        inside.append(torch._C._len_torch_function_stack())
        if fails:
            raise ValueError("kernel failed")
        return x + 1

    inside: list[int] = []
    monkeypatch.setenv(compiled.ENV, "1")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)   # the wrapper's own logic, no compiler needed
    kernel = compiled.CompiledKernel(probe, min_numel=1)
    with Counting() as mode:
        before = torch._C._len_torch_function_stack()
        if fails:   # the compiled call raises, the eager retry (inside the mode again) raises too
            with pytest.raises(ValueError, match="kernel failed"):
                kernel(torch.ones(2))
        else:
            assert kernel(torch.ones(2)).tolist() == [2.0, 2.0]
        assert torch._C._len_torch_function_stack() == before == 1
        assert torch.overrides._get_current_function_mode() is mode
    assert inside == ([0, 1] if fails else [0])
    assert not [f for f in seen if getattr(f, "__name__", "") in ("__add__", "add")]   # the mode saw no kernel op


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile on CPU needs a C++ compiler (none on PATH)")


def _cases():
    """(x, lower, upper, bits): attention-like probabilities on an unsigned grid, signed activations with every
    value a tie at a half step, per-channel bounds on the last axis."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 64, 64, 64, generator=g) * 3, -1)
    step = torch.tensor(0.0371)
    halves = (torch.randint(-9, 9, (BIG,), generator=g).float() + 0.5) * step
    channels = torch.randn(16, 4096, 8, generator=g) * torch.linspace(0.1, 5, 8)
    return [(probs, torch.tensor(0.0), torch.tensor(0.4), 4),
            (halves, -8 * step, 7 * step, 4),
            (channels, -torch.linspace(0.2, 9, 8), torch.linspace(0.1, 6, 8), 3)]


@needs_compiler
@pytest.mark.parametrize("case", range(3), ids=["probabilities", "ties", "per-channel"])
def test_compiled_quantizer_equals_eager(case, monkeypatch):
    x, lower, upper, bits = _cases()[case]
    assert x.numel() >= BIG

    incoming = torch.linspace(-1, 1, x.numel()).reshape(x.shape)

    def run(switch: str):
        monkeypatch.setenv(compiled.ENV, switch)
        xs, lo, up = (t.clone().requires_grad_(True) for t in (x, lower, upper))
        out = grid.fake_quantize(xs, lo, up, bits)
        out.backward(incoming)
        with torch.inference_mode():
            inference = grid.fake_quantize(x, lower, upper, bits)
        return out.detach(), inference, xs.grad, lo.grad, up.grad

    eager = run("0")
    fused = run("1")
    for kernel in (grid._CLIP_ROUND_SCALE, grid._STE_GRADIENTS):   # the compiled path was taken
        assert kernel.failure is None and kernel._compiled is not None
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])   # values: bit for bit
    assert torch.equal(fused[1], eager[0])                                         # training = inference
    assert torch.equal(fused[2], eager[2])                                         # input gradient: exact
    for a, b in zip(fused[3:], eager[3:]):   # bounds: float32 sums of the same terms in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(incoming.abs().sum()))
    assert eager[3].abs().sum() > 0 and eager[4].abs().sum() > 0


@needs_compiler
def test_compiled_gradients_catch_a_wrong_kernel(monkeypatch):
    """Negative control: a compiled kernel that splits a tie the other way (all of it to the input at the low
    end) gives another input gradient, which the comparison above would catch."""
    def wrong(grad, x, step, low, high):
        through = grad * (x >= low) * (x <= high)
        t = torch.clamp(x, low, high).div(step)
        return (through, (grad * torch.round(t).sub(t)).sum_to_size(step.shape), (grad - through).sum_to_size(low.shape),
                torch.zeros_like(high))

    monkeypatch.setenv(compiled.ENV, "1")
    x = torch.zeros(BIG)                      # every element on the low clip value
    args = (torch.ones(BIG), x, torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0))
    right = compiled.CompiledKernel(grid.straight_through_gradients, min_numel=1)(*args)[0]
    bad = compiled.CompiledKernel(wrong, min_numel=1)(*args)[0]
    assert torch.equal(right, torch.full((BIG,), 0.5)) and not torch.equal(bad, right)
