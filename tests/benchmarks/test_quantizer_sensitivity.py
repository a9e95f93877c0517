"""The quantizer-sensitivity benchmark on a tiny SwinIR: its groups partition the quantizers, "all"
is the deployed model, a group holding every quantizer alone equals "all", and the flags come back."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from toolchain.metrics import psnr
from toolchain.quant import QuantConfig, float_mode, quantize_model, quantizers

from ..tiny_models import tiny_swinir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quantizer_sensitivity as sensitivity  # noqa: E402


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2], window_size=4)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    lr = torch.rand(3, 3, 8, 8)
    calibrate_minmax(model, batch_forward_loop(lr, progress=False))
    return model, lr


def test_groups_partition_the_quantizers_and_all_is_the_deployed_model():
    model, lr = _model()
    found = quantizers(model)
    rows = sensitivity.measure(model, lr, batch=2, progress=False)
    assert all(q.enabled for q in quantizers(model).values())  # flags restored
    with torch.no_grad():   # in the benchmark's batches of 2: a batch of 3 adds in another order on some CPUs
        quantized = torch.cat([model(chunk) for chunk in lr.split(2)]).clamp(0, 1)
        with float_mode(model):
            reference = torch.cat([model(chunk) for chunk in lr.split(2)]).clamp(0, 1)
    (all_on,) = [r for r in rows if r["mode"] == "all"]
    assert all_on["psnr"] == round(psnr(quantized, reference, data_range=1.0), 3)
    assert all_on["quantizers"] == len(found)
    for grouping in sensitivity.GROUPINGS:
        alone = [r for r in rows if r["grouping"] == grouping and r["mode"] == "alone"]
        assert sum(r["quantizers"] for r in alone) == len(found), grouping
        but = {r["group"]: r["quantizers"] for r in rows if r["grouping"] == grouping and r["mode"] == "all but"}
        assert but == {r["group"]: r["quantizers"] for r in alone}
    roles = {r["group"]: r for r in rows if r["grouping"] == "role" and r["mode"] == "alone"}
    assert set(roles) == {q.role for q in found.values()}
    stages = [r for r in rows if r["grouping"] == "stage" and r["mode"] == "alone"]
    (stage,) = stages  # one residual group holds every quantizer: alone is all, all-but is the float model
    assert stage["group"] == "layers.0" and stage["psnr"] == all_on["psnr"]
    (empty,) = [r for r in rows if r["grouping"] == "stage" and r["mode"] == "all but"]
    assert empty["psnr"] == float("inf")
    blocks = {r["group"] for r in rows if r["grouping"] == "block" and r["mode"] == "alone"}
    assert blocks == {"layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1"}
    assert "| role | weight |" in sensitivity.markdown({"artifacts": {"tiny": {"artifact": "x", "rows": rows}}})


def test_group_of_names():
    assert sensitivity.group_of("layers.0.residual_group.blocks.1.attn.qkv.input", "linear_input", "site") == "qkv.input"
    assert sensitivity.group_of("layers.0.residual_group.blocks.1.attn.matmul.0.a", "attn_q", "stage") == "layers.0"
    assert sensitivity.group_of("layers.0.residual_group.blocks.1.attn.matmul.0.a", "attn_q", "site") == "attn.matmul.0.a"
    assert sensitivity.group_of("encoder_layer1.blocks.0.mlp.fc1.input", "linear_input", "stage") == "encoder_layer1"
    assert sensitivity.group_of("x.fc2.weight", "weight", "role") == "weight"
    # DAT's spatial products (two halves of the heads) and its channel products are different sites
    assert sensitivity.group_of("layers.0.blocks.0.attn.attns.1.matmul.1.a", "attn_probs", "site") == "attns.matmul.1.a"
    assert sensitivity.group_of("layers.0.blocks.1.attn.matmul.1.a", "attn_probs", "site") == "attn.matmul.1.a"
    assert sensitivity.group_of("layers.0.blocks.1.attn.matmul.1.a", "attn_probs", "block") == "layers.0.blocks.1"
    assert sensitivity.group_of("conv_first.weight", "weight", "block") == "conv_first"


def test_rows_are_against_the_given_float_output_when_the_weights_are_stored_rounded():
    """An artifact of learned rounding stores its weights rounded: every quantizer off is then not the float model.
    Against the float checkpoint's output the row ``none`` says what the stored weights cost, and ``all`` is the
    deployed model against float; without a reference, ``none`` is the reference itself."""
    model, lr = _model()
    with torch.no_grad():
        with float_mode(model):
            float_out = torch.cat([model(chunk) for chunk in lr.split(2)]).clamp(0, 1)
        for name, q in quantizers(model).items():   # store the weights on their grids, as learned rounding does
            if q.kind == "weight":
                weight = model.get_submodule(name.rpartition(".")[0]).weight
                weight.copy_(q(weight))
        quantized = torch.cat([model(chunk) for chunk in lr.split(2)]).clamp(0, 1)
        with float_mode(model):
            stored = torch.cat([model(chunk) for chunk in lr.split(2)]).clamp(0, 1)
    rows = sensitivity.measure(model, lr, batch=2, progress=False, reference=float_out)
    by_mode = {r["mode"]: r["psnr"] for r in rows if r["mode"] in ("none", "all")}
    assert by_mode["none"] == round(psnr(stored, float_out, data_range=1.0), 3) < float("inf")
    assert by_mode["all"] == round(psnr(quantized, float_out, data_range=1.0), 3)
    default = sensitivity.measure(model, lr, batch=2, progress=False)
    assert [r["psnr"] for r in default if r["mode"] == "none"] == [float("inf")]
    assert "every quantizer off" in sensitivity.markdown({"artifacts": {"t": {"artifact": "x", "rows": rows}}})
