"""Attaching quantizers: names, roles, shapes, selection, bounds I/O and float-mode exactness.

Runs on toy transformer blocks written with plain ``@`` / ``torch.matmul`` / ``bmm`` / ``einsum`` and on
tiny real models (spandrel's SwinIR from ``tests/tiny_models.py``, NGswin with a few channels), all
placed by tracing (:mod:`toolchain.quant.placement`). Bounds come from a small min/max pass through
the observer interface (``minmax_bounds``).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load, save
from torch import nn
from torch.nn import functional as F

from toolchain.loading import load_state_dict_model
from toolchain.models import ngswin
from toolchain.quant import (QuantConfig, QuantConv2d, QuantLinear, QuantMatMul, Quantizer, bound_parameters,
                             bounds_state, float_mode, grid, load_bounds, quantize_model, quantizers,
                             set_quant_enabled)

from ...tiny_models import tiny_swinir as _tiny_swinir

TINY_NGSWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2), dec_depth=2, dec_num_heads=2, window_size=4,
                   ngrams=(2, 2, 2))
# per block, in module order; the role of each quantizer
BLOCK_QUANTIZERS = {
    "attn.qkv.input": "linear_input", "attn.qkv.weight": "weight",
    "attn.proj.input": "linear_input", "attn.proj.weight": "weight",
    "attn.matmul.0.a": "attn_q", "attn.matmul.0.b": "attn_k",
    "attn.matmul.1.a": "attn_probs", "attn.matmul.1.b": "attn_v",
    "mlp.fc1.input": "linear_input", "mlp.fc1.weight": "weight",
    "mlp.fc2.input": "mlp_hidden", "mlp.fc2.weight": "weight",
}


def tiny_swinir(scale: int = 2) -> nn.Module:
    return _tiny_swinir(scale, seed=scale)


def tiny_ngswin() -> nn.Module:
    torch.manual_seed(0)
    return load_state_dict_model(ngswin.NGswin(scale=2, **TINY_NGSWIN).state_dict(), "tiny NGswin")


def lr_batch(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def product(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``(B, H, N, K) x (B, H, K, M)`` written the way ``op`` says."""
    if op == "@":
        return a @ b
    if op == "matmul":
        return torch.matmul(a, b)
    if op == "bmm":
        return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:-1], b.shape[-1])
    return torch.einsum("bhnk,bhkm->bhnm", a, b)


class ToyAttention(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, op: str = "@") -> None:
        super().__init__()
        self.heads = heads
        self.op = op
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        probs = self.softmax(product(self.op, q * q.shape[-1] ** -0.5, k.transpose(-2, -1)))
        return self.proj(product(self.op, probs, v).transpose(1, 2).reshape(batch, tokens, dim))


class ToyBlock(nn.Module):
    """Pre-norm transformer block on ``(B, N, 8)`` tokens."""

    def __init__(self, op: str = "@") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(8)
        self.attn = ToyAttention(op=op)
        self.norm2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed))


def minmax_bounds(model: nn.Module, *inputs: torch.Tensor) -> None:
    """Set every quantizer's bounds to the min/max it sees (per output channel for such weights)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(quantizer: Quantizer, x: torch.Tensor) -> None:
        x = x.detach()
        if quantizer.bounds_shape:  # per output channel: reduce every axis but the first
            axes = tuple(range(1, x.dim()))
            low, high = x.amin(dim=axes, keepdim=True), x.amax(dim=axes, keepdim=True)
        else:
            low, high = x.min(), x.max()
        if quantizer.name in seen:
            low, high = torch.minimum(low, seen[quantizer.name][0]), torch.maximum(high, seen[quantizer.name][1])
        seen[quantizer.name] = (low, high)

    found = quantizers(model)
    for quantizer in found.values():
        quantizer.observer = observe
    with torch.no_grad():
        for x in inputs:
            model(x)
    for name, quantizer in found.items():
        quantizer.observer = None
        quantizer.set_bounds(*seen[name])


def test_tiny_swinir_names_count_and_roles_are_as_specified():
    model = quantize_model(tiny_swinir(), QuantConfig())
    found = quantizers(model)
    expected = [f"layers.{group}.residual_group.blocks.{block}.{suffix}"
                for group in range(2) for block in range(2) for suffix in BLOCK_QUANTIZERS]
    assert list(found) == expected  # 12 per block, in a stable order
    assert len(found) == 12 * 4
    for name, quantizer in found.items():
        suffix = name.split(".blocks.")[1].split(".", 1)[1]
        assert quantizer.role == BLOCK_QUANTIZERS[suffix]
        assert quantizer.kind == ("weight" if suffix.endswith(".weight") else "activation")
        assert quantizer.bits == 4 and quantizer.enabled and not quantizer.initialized
    attn = model.get_submodule("layers.0.residual_group.blocks.0.attn")
    assert isinstance(attn.matmul, nn.ModuleDict) and list(attn.matmul) == ["0", "1"]
    assert all(isinstance(m, QuantMatMul) and m.op == "matmul" for m in attn.matmul.values())
    assert list(quantizers(quantize_model(tiny_swinir(), QuantConfig()))) == expected  # same names again


def record_operands(model: nn.Module, x: torch.Tensor, module_type: type) -> tuple[dict, dict, torch.Tensor]:
    """Run with every quantizer observing: (operands by quantizer name, outputs of ``module_type`` by path, y)."""
    operands: dict[str, list[torch.Tensor]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    for quantizer in quantizers(model).values():
        quantizer.observer = lambda q, t: operands.setdefault(q.name, []).append(t.detach().clone())
    hooks = [module.register_forward_hook(
        lambda mod, args, out, path=path: outputs.setdefault(path, []).append(out.detach().clone()))
        for path, module in model.named_modules() if isinstance(module, module_type)]
    with torch.no_grad():
        y = model(x)
    for hook in hooks:
        hook.remove()
    for quantizer in quantizers(model).values():
        quantizer.observer = None
    return operands, outputs, y


def owner_path(quantizer_name: str) -> str:
    """The module whose code the quantized tensor comes from: a matmul's owner, or a layer's parent."""
    if ".matmul." in quantizer_name:
        return quantizer_name.rsplit(".matmul.", 1)[0]
    return quantizer_name.rsplit(".", 2)[0]


def sibling_path(model: nn.Module, quantizer_name: str, module_type: type) -> str:
    """Path of the ``module_type`` child of the owner of the quantizer."""
    owner = owner_path(quantizer_name)
    (child,) = [n for n, m in model.get_submodule(owner).named_children() if isinstance(m, module_type)]
    return f"{owner}.{child}"


def test_roles_follow_the_data_flow_in_swinir():
    fp = tiny_swinir()
    model = quantize_model(copy.deepcopy(fp), QuantConfig())
    x = lr_batch()
    operands, softmax_out, y = record_operands(model, x, nn.Softmax)
    with torch.no_grad():
        assert torch.equal(y, fp(x))  # observers return their input untouched
    _, gelu_out, _ = record_operands(model, x, nn.GELU)
    checked = {"attn_probs": 0, "mlp_hidden": 0, "attn_q": 0, "weight": 0}
    for name, quantizer in quantizers(model).items():
        seen = operands[name]
        if quantizer.role == "attn_probs":
            calls = softmax_out[sibling_path(model, name, nn.Softmax)]
            assert len(seen) == len(calls) and all(map(torch.equal, seen, calls))
        if quantizer.role == "mlp_hidden":
            calls = gelu_out[sibling_path(model, name, nn.GELU)]
            assert len(seen) == len(calls) and all(map(torch.equal, seen, calls))
        if quantizer.role == "attn_q":
            q, k = seen[0], operands[name[:-1] + "b"][0]
            assert q.shape[-1] == k.shape[-2] == 12 // 2 and q.shape[-2] == k.shape[-1] == 64  # (.., N, d) @ (.., d, N)
        if quantizer.role == "weight":
            layer = model.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(seen[0], layer.weight)
        checked[quantizer.role] = checked.get(quantizer.role, 0) + 1
    assert checked["attn_probs"] == checked["mlp_hidden"] == checked["attn_q"] == 4 and checked["weight"] == 16


def test_roles_follow_the_data_flow_in_ngswin_cosine_attention():
    fp = tiny_ngswin()
    model = quantize_model(copy.deepcopy(fp), QuantConfig(), example=lr_batch(size=16))
    x = lr_batch(1, size=16)
    operands, softmax_out, y = record_operands(model, x, nn.Softmax)
    with torch.no_grad():
        assert torch.equal(y, fp(x))
    roles = [q.role for q in quantizers(model).values()]
    assert roles.count("attn_probs") == roles.count("attn_q") == roles.count("attn_v") > 0
    for name, quantizer in quantizers(model).items():
        if quantizer.role == "attn_probs":
            calls = softmax_out[sibling_path(model, name, nn.Softmax)]
            assert len(calls) == len(operands[name]) and all(map(torch.equal, operands[name], calls))
        if quantizer.role in ("attn_q", "attn_k"):  # cosine attention: unit vectors are the operands
            norms = operands[name][0].norm(dim=-1 if quantizer.role == "attn_q" else -2)
            torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("scale", [2, 4])
def test_float_mode_is_exactly_the_float_model(scale):
    fp = tiny_swinir(scale)
    model = quantize_model(copy.deepcopy(fp), QuantConfig(weight_granularity="per-channel"))
    x = lr_batch(scale)
    with torch.no_grad():
        reference = fp(x)
        with float_mode(model):  # no bounds needed
            assert torch.equal(model(x), reference)
        minmax_bounds(model, x)
        quantized = model(x)
        assert not torch.equal(quantized, reference)
        with float_mode(model):
            assert torch.equal(model(x), reference)
        assert torch.equal(model(x), quantized)  # flags restored on exit
        set_quant_enabled(model, False)
        assert torch.equal(model(x), reference)


def test_running_quantized_before_bounds_are_set_raises():
    model = quantize_model(tiny_swinir(), QuantConfig())
    with pytest.raises(RuntimeError, match="layers.0.residual_group.blocks.0.attn.qkv.input has no bounds"):
        model(lr_batch())


def test_quantized_layers_compute_the_grid_arithmetic():
    torch.manual_seed(0)
    block = quantize_model(ToyBlock(), QuantConfig(w_bits=3, a_bits=5), example=tokens())
    x = tokens(1)
    minmax_bounds(block, x)
    found = quantizers(block)
    assert [found[n].role for n in ("mlp.0.input", "mlp.2.input", "attn.matmul.0.a", "attn.matmul.1.a")] == \
        ["linear_input", "mlp_hidden", "attn_q", "attn_probs"]
    fc1 = block.mlp[0]
    assert isinstance(fc1, QuantLinear) and isinstance(block.attn.matmul["1"], QuantMatMul)
    h = torch.randn(3, 8)
    qi, qw = fc1.input_quantizer, fc1.weight_quantizer
    expected = F.linear(grid.fake_quantize(h, qi.lower, qi.upper, 5), grid.fake_quantize(fc1.weight, qw.lower,
                                                                                         qw.upper, 3), fc1.bias)
    assert torch.equal(fc1(h), expected)
    a, b = torch.rand(2, 4, 4), torch.randn(2, 4, 3)
    mm = block.attn.matmul["1"]
    expected = (grid.fake_quantize(a, mm.a_quantizer.lower, mm.a_quantizer.upper, 5)
                @ grid.fake_quantize(b, mm.b_quantizer.lower, mm.b_quantizer.upper, 5))
    assert torch.equal(mm(a, b), expected)
    # in the model's own quantized forward, the routed call is that arithmetic on the model's operands
    calls, probs, proj_inputs = [], [], []
    hooks = [mm.register_forward_hook(lambda m, args, out: calls.append((args, out))),
             block.attn.softmax.register_forward_hook(lambda m, args, out: probs.append(out)),
             block.attn.proj.register_forward_hook(lambda m, args, out: proj_inputs.append(args[0]))]
    with torch.no_grad():
        block(x)
    for hook in hooks:
        hook.remove()
    ((a, b), context), = calls
    assert torch.equal(a, probs[0])
    assert torch.equal(context, grid.fake_quantize(a, mm.a_quantizer.lower, mm.a_quantizer.upper, 5)
                       @ grid.fake_quantize(b, mm.b_quantizer.lower, mm.b_quantizer.upper, 5))
    assert torch.equal(proj_inputs[0], context.transpose(1, 2).reshape(2, 5, 8))


@pytest.mark.parametrize("op", ["matmul", "bmm", "einsum"])
def test_every_spelling_of_the_product_is_placed_alike(op):
    """``torch.matmul``, ``bmm`` and ``einsum`` give the names and roles of ``@``, and the same numbers."""
    torch.manual_seed(0)
    reference = quantize_model(ToyBlock("@"), QuantConfig(), example=tokens())
    torch.manual_seed(0)
    fp = ToyBlock(op)
    model = quantize_model(copy.deepcopy(fp), QuantConfig(), example=tokens())
    assert {n: q.role for n, q in quantizers(model).items()} == {n: q.role for n, q in quantizers(reference).items()}
    expected_op = {"matmul": "matmul", "bmm": "bmm", "einsum": "einsum:bhnk,bhkm->bhnm"}[op]
    assert [m.op for m in model.attn.matmul.values()] == [expected_op] * 2
    x = tokens(2)
    with torch.no_grad():
        with float_mode(model):
            assert torch.equal(model(x), fp(x))
        minmax_bounds(model, x)
        minmax_bounds(reference, x)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
        assert not torch.equal(model(x), fp(x))


def test_weight_bound_shapes_and_symmetry():
    model = quantize_model(tiny_swinir(), QuantConfig(weight_granularity="per-channel", target="trt-int4", a_bits=8))
    for name, quantizer in quantizers(model).items():
        if quantizer.kind == "weight":
            out_channels = model.get_submodule(name.rsplit(".", 1)[0]).weight.shape[0]
            assert quantizer.bounds_shape == (out_channels, 1) and quantizer.symmetric
        else:
            assert quantizer.bounds_shape == () and quantizer.symmetric  # 8 bits: symmetric grid
    model = quantize_model(tiny_swinir(), QuantConfig(weight_granularity="per-channel"))
    minmax_bounds(model, lr_batch())
    fc1 = model.get_submodule("layers.1.residual_group.blocks.1.mlp.fc1")
    quantizer = fc1.weight_quantizer
    assert not quantizer.symmetric
    per_row = torch.stack([grid.fake_quantize(row, lo, hi, 4) for row, lo, hi in
                           zip(fc1.weight, quantizer.lower[:, 0], quantizer.upper[:, 0])])
    assert torch.equal(quantizer(fc1.weight), per_row)


def test_conv_option_quantizes_every_conv():
    fp = tiny_swinir(4)
    conv_paths = [path for path, module in fp.named_modules() if type(module) is nn.Conv2d]
    assert conv_paths == ["conv_first", "layers.0.conv", "layers.1.conv", "conv_after_body", "upsample.0"]
    model = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("conv",), weight_granularity="per-channel"))
    found = quantizers(model)
    assert list(found) == [f"{path}.{end}" for path in conv_paths for end in ("input", "weight")]
    for path in conv_paths:
        conv = model.get_submodule(path)
        assert isinstance(conv, QuantConv2d)
        assert found[f"{path}.input"].role == "conv_input"
        assert found[f"{path}.weight"].bounds_shape == (conv.out_channels, 1, 1, 1)
    x = lr_batch()
    with torch.no_grad(), float_mode(model):
        assert torch.equal(model(x), fp(x))
    minmax_bounds(model, x)
    with torch.no_grad():
        assert not torch.equal(model(x), fp(x))
    everything = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("linear", "matmul", "conv")))
    assert len(quantizers(everything)) == 48 + 2 * len(conv_paths)


def test_include_and_exclude_filter_by_name():
    attn_only = quantize_model(tiny_swinir(), QuantConfig(include=("*.attn.*",)))
    assert len(quantizers(attn_only)) == 8 * 4
    assert all(".attn." in name for name in quantizers(attn_only))
    model = quantize_model(tiny_swinir(), QuantConfig(exclude=("*.matmul.1.a", "*.mlp.fc2.*")))
    found = quantizers(model)
    assert len(found) == 9 * 4 and not any(n.endswith("matmul.1.a") or ".fc2." in n for n in found)
    block = model.get_submodule("layers.0.residual_group.blocks.1")
    assert block.attn.matmul["1"].a_quantizer is None and block.attn.matmul["1"].b_quantizer is not None
    assert type(block.mlp.fc2) is nn.Linear  # nothing left to quantize: the layer stays as it was
    minmax_bounds(model, lr_batch())
    with torch.no_grad():
        model(lr_batch(1))
    only_scores = quantize_model(tiny_swinir(), QuantConfig(quantize=("matmul",), include=("*.matmul.0.*",)))
    block = only_scores.get_submodule("layers.0.residual_group.blocks.0")
    assert list(block.attn.matmul) == ["0"] and len(quantizers(only_scores)) == 2 * 4  # call 1 runs unrouted
    minmax_bounds(only_scores, lr_batch())
    with torch.no_grad():
        only_scores(lr_batch(1))


def test_bounds_state_round_trip_and_strict_loading():
    fp = tiny_swinir()
    source = quantize_model(copy.deepcopy(fp), QuantConfig(weight_granularity="per-channel"))
    with pytest.raises(ValueError, match="no bounds yet"):
        bounds_state(source)
    minmax_bounds(source, lr_batch())
    state = load(save(bounds_state(source)))  # survives safetensors
    assert set(state) == {f"{n}.{end}" for n in quantizers(source) for end in ("lower", "upper")}

    target = quantize_model(copy.deepcopy(fp), QuantConfig(weight_granularity="per-channel"))
    name = "layers.1.residual_group.blocks.0.attn.qkv.weight"
    broken = [
        ({k: v for k, v in state.items() if k != f"{name}.lower"}, "missing"),
        ({**state, "layers.9.x.input.lower": torch.tensor(0.0)}, "unexpected"),
        ({**state, f"{name}.lower": torch.zeros(())}, "shape"),
        ({**state, f"{name}.upper": state[f"{name}.lower"] - 1}, "upper must exceed"),
        ({**state, f"{name}.upper": torch.full_like(state[f"{name}.upper"], float("nan"))}, "not finite"),
    ]
    for tensors, message in broken:
        with pytest.raises(ValueError, match=message):
            load_bounds(target, tensors)
        assert not any(q.initialized for q in quantizers(target).values())  # all or nothing
    load_bounds(target, state)
    x = lr_batch(3)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert all(torch.equal(state[k], v) for k, v in bounds_state(target).items())


def test_wrapping_keeps_the_original_state_dict_keys_and_tensors():
    fp = tiny_swinir()
    original = fp.state_dict()
    model = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("linear", "matmul", "conv")))
    wrapped = model.state_dict()
    assert set(original) <= set(wrapped)
    assert all(torch.equal(original[k], wrapped[k]) for k in original)
    extra = set(wrapped) - set(original)
    assert extra and all(k.endswith(("_quantizer.lower", "_quantizer.upper")) for k in extra)
    # the layer shares the float model's Parameter objects (nothing copied)
    plain = tiny_swinir()
    linear = plain.layers[0].residual_group.blocks[0].attn.qkv
    quantize_model(plain, QuantConfig())
    assert plain.layers[0].residual_group.blocks[0].attn.qkv.weight is linear.weight
    # bounds restored through load_state_dict count as set
    minmax_bounds(model, lr_batch())
    restored = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("linear", "matmul", "conv")))
    restored.load_state_dict(model.state_dict())
    assert all(q.initialized for q in quantizers(restored).values())


def test_bound_parameters_are_the_new_parameters_and_train():
    model = tiny_swinir()
    before = {id(p) for p in model.parameters()}
    quantize_model(model, QuantConfig())
    bounds = bound_parameters(model)
    assert len(bounds) == 2 * 48
    bound_ids = {id(p) for p in bounds}
    assert before.isdisjoint(bound_ids) and {id(p) for p in model.parameters()} == before | bound_ids
    minmax_bounds(model, lr_batch())
    model(lr_batch(1)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bounds)
    assert sum(p.grad.abs().sum() for p in bounds) > 0


def test_a_model_is_quantized_once():
    model = quantize_model(ToyBlock(), QuantConfig(), example=tokens())
    with pytest.raises(ValueError, match="already carries quantizers"):
        quantize_model(model, QuantConfig(), example=tokens())


def test_a_bare_module_needs_an_example():
    with pytest.raises(TypeError, match="example|load_model"):
        quantize_model(ToyBlock(), QuantConfig())


def test_matmuls_outside_the_attention_pattern_get_generic_roles(caplog):
    class Product(nn.Module):
        """A Gram matrix of the image's rows, then a linear: a product with no softmax around it."""

        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(4, 4)

        def forward(self, x):
            return self.out(x @ x.transpose(-2, -1))

    with caplog.at_level(logging.WARNING, logger="toolchain.quant"):
        model = quantize_model(Product(), QuantConfig(), example=torch.rand(1, 4, 4))
    assert {n: q.role for n, q in quantizers(model).items()} == {
        "out.input": "linear_input", "out.weight": "weight", "matmul.0.a": "matmul_a", "matmul.0.b": "matmul_b"}
    assert "generic roles" in caplog.text and "matmul.0" in caplog.text


def test_quantizer_checks_bounds_and_keeps_observers_out_of_the_model():
    quantizer = Quantizer("x.input", "activation", 2, "linear_input")
    with pytest.raises(ValueError, match="shape"):
        quantizer.set_bounds(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="upper bound must exceed"):
        quantizer.set_bounds(1.0, 1.0)
    with pytest.raises(ValueError, match="role"):
        Quantizer("x.input", "activation", 4, "attention")
    quantizer.observer = nn.Identity()  # a module used as a callback is still not a submodule
    assert set(quantizer.state_dict()) == {"lower", "upper"}
    quantizer.observer = None
    quantizer.set_bounds(-1.0, 2.0)
    assert torch.equal(quantizer(torch.tensor([-5.0, 0.26, 5.0])), torch.tensor([-1.0, 0.0, 2.0]))


def test_trt_int4_target_is_weight_only():
    model = quantize_model(tiny_swinir(), QuantConfig(w_bits=4, a_bits=4, target="trt-int4"))
    found = quantizers(model)
    assert found and all(q.kind == "weight" and q.symmetric for q in found.values())
    assert len(found) == 4 * 4  # qkv, proj, fc1, fc2 weights in each of the 4 blocks


def test_roles_of_ngswin_linears_come_from_their_inputs_not_their_names():
    """NGswin's SCDP bottleneck (depthwise conv, GELU, point-wise linear) is on the data path: its linear
    reads a GELU output (``mlp_hidden``, one-sided) exactly as the MLPs' fc2 do; fc1 reads the block's
    features (``linear_input``)."""
    model = quantize_model(tiny_ngswin(), QuantConfig(), example=lr_batch(size=16))
    found = quantizers(model)
    assert found["bottleneck.pointwise.input"].role == "mlp_hidden"
    fc2 = [q for n, q in found.items() if n.endswith("ffn.fc2.input")]
    fc1 = [q for n, q in found.items() if n.endswith("ffn.fc1.input")]
    assert fc2 and len(fc2) == len(fc1) and all(q.role == "mlp_hidden" for q in fc2)
    assert all(q.role == "linear_input" for q in fc1)
    operands, _, _ = record_operands(model, lr_batch(1, size=16), nn.Softmax)
    assert operands["bottleneck.pointwise.input"][0].min() >= -0.17  # GELU's minimum is about -0.17


def test_bits_overrides_give_mixed_precision_and_must_match():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.rand(1, 4)
    model = quantize_model(copy.deepcopy(mlp), QuantConfig(quantize=("linear",), bits_overrides=("2.*=8",)), x)
    found = quantizers(model)
    assert {name: (q.bits, q.symmetric) for name, q in found.items()} == {
        "0.input": (4, False), "0.weight": (4, False), "2.input": (8, True), "2.weight": (8, True)}
    # an 8-bit default with a 4-bit override: the overridden weight grid is asymmetric again
    model = quantize_model(copy.deepcopy(mlp), QuantConfig(quantize=("linear",), w_bits=8, a_bits=8,
                                                           bits_overrides=("0.weight=4",)), x)
    assert (quantizers(model)["0.weight"].bits, quantizers(model)["0.weight"].symmetric) == (4, False)
    with pytest.raises(ValueError, match="bits_overrides pattern 'attn.\\*' matches no quantizer"):
        quantize_model(copy.deepcopy(mlp), QuantConfig(quantize=("linear",), bits_overrides=("attn.*=8",)), x)
    with pytest.raises(ValueError, match="matches no quantizer kept"):  # excluded quantizers do not count
        quantize_model(copy.deepcopy(mlp), QuantConfig(quantize=("linear",), exclude=("2.*",),
                                                       bits_overrides=("2.*=8",)), x)
