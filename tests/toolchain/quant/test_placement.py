"""Placement by one traced forward: which linears and products become sites, their names and roles.

Hand-written modules pin down each rule (names from owner and call order, roles from data flow,
constant linears and constant products left alone, every spelling of a product); the tiny spandrel
models (DAT, HAT, SRFormer) check float exactness with the quantizers off and a real effect with them
on; the real DAT-light x4 checks the counts on a released checkpoint.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from toolchain import load_model
from toolchain.models import example_input
from toolchain.quant import (QuantConfig, QuantLinear, QuantMatMul, float_mode, grid, quantize_model, quantizers,
                             set_quant_enabled)
from toolchain.quant.placement import find_placement

from ...tiny_models import tiny_dat, tiny_hat, tiny_srformer

WINDOW = 4  # tokens per window of the toy attention
DIM, HEADS = 8, 2


def tokens(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, WINDOW, DIM, generator=torch.Generator().manual_seed(seed))


def token_loop(batch: torch.Tensor):
    """A calibration forward loop over token batches (``batch_forward_loop`` takes images)."""
    return lambda model: model(batch)


class BiasedAttention(nn.Module):
    """Window attention with a DAT-style position-bias MLP over fixed relative coordinates, and a product
    of the context with a Parameter before the projection (a constant product, issued first)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.eye(DIM) + 0.1 * torch.randn(DIM, DIM))
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        offsets = torch.arange(WINDOW, dtype=torch.float32)
        self.register_buffer("coords", torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).view(-1, 2))
        self.pos = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, HEADS))
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens_, dim = x.shape
        x = x @ self.mix  # call 0: activation @ parameter, not a site
        q, k, v = self.qkv(x).view(batch, tokens_, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (dim // HEADS) ** -0.5  # call 1, scaled after
        bias = self.pos(self.coords).permute(1, 0).reshape(HEADS, tokens_, tokens_)  # image-independent
        probs = self.drop((scores + bias).softmax(dim=-1))[..., :, :]  # through dropout and slicing
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens_, dim)  # call 2
        return self.proj(out)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = BiasedAttention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block().eval()


def test_sites_are_named_by_owner_and_call_order():
    placement = find_placement(block(), tokens())
    assert [(s.path, s.role_a, s.role_b, s.op) for s in placement.matmuls] == [
        ("attn.matmul.1", "attn_q", "attn_k", "matmul"), ("attn.matmul.2", "attn_probs", "attn_v", "matmul")]
    assert placement.calls == {"attn": 3} and placement.constant_matmuls == 1
    model = quantize_model(block(), QuantConfig(), example=tokens())
    assert [n for n in quantizers(model) if ".matmul." in n] == [
        "attn.matmul.1.a", "attn.matmul.1.b", "attn.matmul.2.a", "attn.matmul.2.b"]
    assert list(model.attn.matmul) == ["1", "2"] and all(isinstance(m, QuantMatMul) for m in model.attn.matmul.values())


def test_roles_come_from_the_data_flow():
    placement = find_placement(block(), tokens())
    assert [(s.path, s.selection, s.input_role) for s in placement.layers] == [
        ("attn.qkv", "linear", "linear_input"), ("attn.proj", "linear", "linear_input"),
        ("mlp.0", "linear", "linear_input"), ("mlp.2", "linear", "mlp_hidden")]
    model = quantize_model(block(), QuantConfig(), example=tokens())
    roles = {n: q.role for n, q in quantizers(model).items()}
    assert roles["attn.matmul.2.a"] == "attn_probs" and roles["mlp.2.input"] == "mlp_hidden"
    # what the quantizers see: the softmax output, and the GELU output (bounded below by about -0.17)
    seen: dict[str, torch.Tensor] = {}
    for quantizer in quantizers(model).values():
        quantizer.observer = lambda q, t: seen.setdefault(q.name, t.detach().clone())
    with torch.no_grad():
        model(tokens(1))
    torch.testing.assert_close(seen["attn.matmul.2.a"].sum(-1), torch.ones(2, HEADS, WINDOW))
    assert seen["attn.matmul.2.a"].min() >= 0 and seen["mlp.2.input"].min() >= -0.17 > seen["mlp.0.input"].min()


def test_a_product_whose_output_reaches_a_softmax_is_the_score_even_with_names_that_say_otherwise():
    class Misnamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Linear(DIM, 2 * DIM)  # a "second MLP layer" by name, on the block input
            self.gelu_out = nn.Linear(DIM, DIM)  # after no GELU at all

        def forward(self, x):
            value, key = self.fc2(x).chunk(2, dim=-1)
            weights = F.softmax(torch.einsum("bnd,bmd->bnm", x, key), dim=-1)
            return self.gelu_out(torch.bmm(weights, value))

    placement = find_placement(Misnamed(), tokens())
    assert [(s.path, s.role_a, s.role_b, s.op) for s in placement.matmuls] == [
        ("matmul.0", "attn_q", "attn_k", "einsum:bnd,bmd->bnm"), ("matmul.1", "attn_probs", "attn_v", "bmm")]
    assert [(s.path, s.input_role) for s in placement.layers] == [("fc2", "linear_input"), ("gelu_out", "linear_input")]


def test_linears_fed_only_by_constants_are_not_placed():
    fp = block()
    placement = find_placement(fp, tokens())
    assert placement.constant_layers == ("attn.pos.0", "attn.pos.2")
    model = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=2, a_bits=2), example=tokens())
    assert type(model.attn.pos[0]) is nn.Linear and type(model.attn.pos[2]) is nn.Linear
    assert isinstance(model.attn.qkv, QuantLinear) and not any(".pos." in n for n in quantizers(model))
    calibrate_minmax(model, token_loop(tokens(2, batch=4)))
    biases = []
    hook = model.attn.pos.register_forward_hook(lambda m, args, out: biases.append(out))
    with torch.no_grad():
        quantized = model(tokens(3))
        reference = fp.attn.pos(fp.attn.coords)
    hook.remove()
    assert torch.equal(biases[0], reference)  # the bias is the float one even in a 2-bit model
    with torch.no_grad():
        assert not torch.equal(quantized, fp(tokens(3)))


def test_products_with_a_parameter_are_constants_not_sites():
    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(DIM, DIM))
            self.register_buffer("basis", torch.randn(DIM, DIM))

        def forward(self, x):
            y = torch.matmul(x, self.weight)  # activation @ parameter
            z = torch.einsum("ij,bnj->bni", self.basis, y)  # buffer @ activation
            return torch.bmm(self.weight.expand(x.shape[0], -1, -1), z.transpose(1, 2))  # parameter @ activation

    placement = find_placement(Projection(), tokens())
    assert placement.matmuls == () and placement.constant_matmuls == 3 and placement.calls == {"": 3}
    with pytest.raises(ValueError, match="quantize='matmul' finds no product of two image-dependent tensors"):
        quantize_model(Projection(), QuantConfig(quantize=("matmul",)), example=tokens())


class Spelled(nn.Module):
    """Scores and context written with einsum (operands as arguments or as a list) or bmm."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.op == "einsum":
            probs = torch.einsum("bnd,bmd->bnm", q, k).softmax(-1)
            return torch.einsum("bnm,bmd->bnd", probs, v)
        if self.op == "einsum_list":
            probs = torch.einsum("bnd,bmd->bnm", [q, k]).softmax(-1)
            return torch.einsum("bnm,bmd->bnd", [probs, v])
        probs = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        return probs.bmm(v)


@pytest.mark.parametrize("op", ["einsum", "einsum_list", "bmm"])
def test_einsum_and_bmm_sites_reproduce_the_float_model(op):
    torch.manual_seed(0)
    fp = Spelled(op)
    model = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("matmul",)), example=tokens())
    sites = list(model.matmul.values())
    assert [q.role for q in quantizers(model).values()] == ["attn_q", "attn_k", "attn_probs", "attn_v"]
    assert [s.op for s in sites] == (["bmm", "bmm"] if op == "bmm" else ["einsum:bnd,bmd->bnm", "einsum:bnm,bmd->bnd"])
    x = tokens(1)
    with torch.no_grad():
        reference = fp(x)
        with float_mode(model):
            assert torch.equal(model(x), reference)
        calibrate_minmax(model, token_loop(tokens(2, batch=4)))
        calls = []
        hook = sites[1].register_forward_hook(lambda m, args, out: calls.append((args, out)))
        quantized = model(x)
        hook.remove()
    ((a, b), out), = calls
    fq = [grid.fake_quantize(t, q.lower, q.upper, q.bits)
          for t, q in ((a, sites[1].a_quantizer), (b, sites[1].b_quantizer))]
    expected = torch.einsum("bnm,bmd->bnd", *fq) if "einsum" in op else torch.bmm(*fq)
    assert torch.equal(out, quantized) and torch.equal(out, expected)
    assert not torch.equal(quantized, reference)


def test_placement_leaves_the_model_as_it_was():
    fp = block()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    with torch.no_grad():
        reference = fp(tokens(1))
    find_placement(fp, tokens())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in fp.modules())
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    with torch.no_grad():
        assert torch.equal(fp(tokens(1)), reference)


def test_a_module_called_with_different_numbers_of_products_is_refused():
    class Repeat(nn.Module):
        def forward(self, x, times: int):
            for _ in range(times):
                x = x @ x.transpose(-2, -1) / x.shape[-1]
            return x

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.repeat = Repeat()

        def forward(self, x):
            return self.repeat(x, 1) + self.repeat(x, 2)

    with pytest.raises(ValueError, match="repeat issued 1 and then 2 matmul calls"):
        find_placement(Twice(), torch.rand(1, 4, 4))


def test_a_failing_forward_is_reported_with_the_example_shape():
    with pytest.raises(ValueError, match=r"float forward of Block on an input of shape \(2, 4, 5\) failed"):
        find_placement(block(), torch.rand(2, 4, 5))


# --- tiny spandrel models -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", [tiny_dat, tiny_hat, tiny_srformer], ids=["DAT", "HAT", "SRFormer"])
def test_tiny_models_are_exact_when_disabled_and_quantized_when_calibrated(build, calibration_images):
    fp = build()
    model = quantize_model(copy.deepcopy(fp), QuantConfig(quantize=("linear", "matmul", "conv"), w_bits=4, a_bits=4))
    found = quantizers(model)
    products = {q.role for n, q in found.items() if ".matmul." in n}
    assert products == {"attn_q", "attn_k", "attn_probs", "attn_v"}  # every product in the attention pattern
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))  # not the example's size
    with torch.no_grad():
        reference = fp(x)
        set_quant_enabled(model, False)
        assert torch.equal(model(x), reference)
        set_quant_enabled(model, True)
        calibrate_minmax(model, batch_forward_loop(calibration_images, batch_size=2, progress=False))
        assert all(q.initialized for q in found.values())
        quantized = model(x)
        assert quantized.shape == reference.shape and torch.isfinite(quantized).all()
        assert (quantized - reference).abs().max() > 1e-3  # 4 bits everywhere: a visible change
        with float_mode(model):
            assert torch.equal(model(x), reference)


# --- the released DAT-light x4 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dat_light(shared_dir):
    path = shared_dir / "models" / "DAT-light" / "DAT_light_x4.pth"
    if not path.is_file():
        pytest.skip(f"DAT-light x4 weights not found at {path}")
    model = load_model(path)
    # a 32x32 example fills every window of the 8x32 split (the counts do not depend on the size)
    example = example_input(model, size=32)
    placement = find_placement(model, example)
    return model, placement, quantize_model(model, QuantConfig(), example=example)


@pytest.mark.slow
def test_dat_light_placement_counts(dat_light):
    _, placement, _ = dat_light
    assert sum(s.selection == "linear" for s in placement.layers) == 72
    assert len(placement.matmuls) == 54 and placement.constant_matmuls == 0
    assert sum((s.role_a, s.role_b) == ("attn_q", "attn_k") for s in placement.matmuls) == 27
    assert sum((s.role_a, s.role_b) == ("attn_probs", "attn_v") for s in placement.matmuls) == 27
    # the position-bias MLPs (DynamicPosBias over fixed relative coordinates) are constants of the model
    assert len(placement.constant_layers) == 72
    assert all(".attn.attns." in p and ".pos." in p for p in placement.constant_layers)


@pytest.mark.slow
def test_dat_light_quantizers(dat_light):
    _, _, model = dat_light
    found = quantizers(model)
    assert len(found) == 252 == 2 * 72 + 2 * 54
    roles = [q.role for q in found.values()]
    assert roles.count("attn_q") == roles.count("attn_probs") == 27 and roles.count("weight") == 72
    assert sum(type(m) is nn.Linear for m in model.modules()) == 72  # the constant linears stay float
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 72
    assert sum(isinstance(m, QuantMatMul) for m in model.modules()) == 54
