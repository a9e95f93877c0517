"""Mixed precision under a bit budget (calib/bit_budget.py, ``2dq-calibrate --bit-budget``).

Tiny spandrel SwinIR x4 (random weights) on real calibration patches: the budget holds for both averages as
defined (recomputed here from the model), the allocation is deterministic and follows sensitivity, the
artifact restores the chosen widths, and the mixed model's QDQ export lints clean and runs in ONNX Runtime
as the fake-quant model computes.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calib.artifact import load_artifact, load_quantized_model
from calib.bit_budget import BitBudget, Sensitivity, allocate_bits, solve
from calib.cli import main
from toolchain.quant import QuantConfig, float_mode, grid, quantize_model, quantizers
from toolchain.tolerances import CODE_ATOL, ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ..tiny_models import make_loud, save_checkpoint, tiny_swinir

#: fc1 weights of the four blocks: equal shapes, so equal costs; block 1 of group 0 is made sensitive
FC1 = "layers.{}.residual_group.blocks.{}.mlp.fc1.weight"
SENSITIVE = FC1.format(0, 1)
WIDTHS = (2, 3, 4, 5, 6, 8)
#: tile of the export test (tiny SwinIR: windows of 8, 2x2 of them)
TILE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these tests run beside other jobs on a small machine, where more threads thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _allocate(model: torch.nn.Module, lr: torch.Tensor, text: str, widths: str = "2,3,4,5,6,8"):
    """The allocation on 2 of the patches, coarse histograms (1024 bins; 8192 by default): seconds."""
    return allocate_bits(model, lr, BitBudget.parse(text, widths), patches=2, batch=2, bins=1024, progress=False)


def _quantized(seed: int = 0, sensitive: bool = False, bits: int = 4) -> torch.nn.Module:
    model = tiny_swinir(scale=4, seed=seed)
    if sensitive:  # one weight 30x the tensor's largest: its per-tensor grid must be coarse or clip it
        with torch.no_grad():
            weight = model.get_submodule(SENSITIVE.rpartition(".")[0]).weight
            weight[0, 0] = 30 * weight.abs().max()
    return quantize_model(model, QuantConfig(w_bits=bits, a_bits=bits))


def _averages(model: torch.nn.Module, widths: dict[str, int], patch: torch.Tensor) -> dict[str, float]:
    """The budget's averages recomputed from the model: bits per weight parameter, and bits per activation
    element of one forward of ``patch`` ``(1, 3, p, p)`` (counted with forward pre-hooks)."""
    elements: dict[str, int] = {}
    hooks = [q.register_forward_pre_hook(lambda m, args: elements.__setitem__(m.name, elements.get(m.name, 0)
                                                                              + args[0].numel()))
             for q in quantizers(model).values()]
    try:
        with float_mode(model), torch.no_grad():
            model(patch)
    finally:
        for hook in hooks:
            hook.remove()
    found = quantizers(model)
    out = {}
    for kind in ("weight", "activation"):
        names = [n for n, q in found.items() if q.kind == kind]
        out[kind] = sum(widths[n] * elements[n] for n in names) / sum(elements[n] for n in names)
    return out


@pytest.mark.parametrize("text, widths", [("4", "2,3,4,5,6,8"), ("3.5", "2,3,4,5,6,8"), ("5,3", "3,4,5,6")])
def test_the_budget_holds_for_both_averages(calib_lr, text, widths):
    model = _quantized()
    budget = BitBudget.parse(text, widths)
    allocation = _allocate(model, calib_lr, text, widths)
    measured = _averages(model, allocation.widths, calib_lr[:1])
    for kind in ("weight", "activation"):
        assert measured[kind] == pytest.approx(allocation.average_bits(kind), rel=1e-12), kind
        assert measured[kind] <= budget.of(kind) + 1e-9, (kind, measured)
        assert measured[kind] >= budget.of(kind) - 1.0, (kind, measured)  # the budget is spent, not ignored
    assert set(allocation.widths.values()) <= set(budget.widths)
    assert len(set(allocation.widths.values())) > 1  # mixed, not a uniform width
    assert {q.bits for q in quantizers(model).values()} == {4}  # the model is left as it was
    assert not any(q.initialized for q in quantizers(model).values())


def test_the_allocation_is_deterministic(calib_lr):
    first, second = _allocate(_quantized(), calib_lr, "4"), _allocate(_quantized(), calib_lr, "4")
    assert first.widths == second.widths
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())


def test_a_sensitive_quantizer_gets_more_bits(calib_lr):
    """One fc1 weight with an outlier: its measured output error rises about 30x, and the allocation gives it
    more bits than any of the other three fc1 weights (same cost) and more than it had unmodified."""
    plain, loud = _allocate(_quantized(), calib_lr, "4"), _allocate(_quantized(sensitive=True), calib_lr, "4")
    peers = [FC1.format(g, b) for g in (0, 1) for b in (0, 1) if FC1.format(g, b) != SENSITIVE]
    assert loud.sensitivities[SENSITIVE].output > 10 * plain.sensitivities[SENSITIVE].output
    assert loud.widths[SENSITIVE] > max(loud.widths[p] for p in peers), loud.widths
    assert loud.widths[SENSITIVE] > plain.widths[SENSITIVE]


def _item(name: str, cost: float, scale: float) -> Sensitivity:
    """A quantizer whose local error quarters with every bit (a uniform grid's noise power)."""
    local = {b: 4.0 ** -b for b in range(2, 9)}
    return Sensitivity(name, "weight", "weight", cost, 4, local, scale * local[4])


def test_solve_weighs_error_against_cost():
    """Equal errors: the cheap quantizer takes the bits; equal costs: the sensitive one does."""
    cheap, dear = _item("cheap", 1.0, 1.0), _item("dear", 10.0, 1.0)
    widths, uniform = solve([cheap, dear], 4.5, WIDTHS)
    assert widths == {"cheap": 8, "dear": 4} and not uniform  # 8 + 40 <= 4.5 * 11; dear at 5 would not fit
    calm, touchy = _item("calm", 1.0, 1.0), _item("touchy", 1.0, 256.0)
    widths, _ = solve([calm, touchy], 4.0, WIDTHS)
    assert widths == {"calm": 2, "touchy": 6}  # error 4^-2 + 256 * 4^-6 beats 2 * 4^-4 and 4^-3 + 256 * 4^-5
    widths, _ = solve([calm, touchy], 4.0, (4,))
    assert widths == {"calm": 4, "touchy": 4}


@pytest.mark.parametrize("seed", range(4))
def test_solve_finds_the_best_allocation(seed):
    """Against brute force over every combination of 5 quantizers x 6 widths: random costs over three orders
    of magnitude, random sensitivities, local errors that fall 3-5x per bit."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(5):
        local = {b: float(rng.uniform(3, 5) ** -b) for b in range(2, 9)}
        items.append(Sensitivity(f"q{i}", "activation", "attn_probs", float(10 ** rng.uniform(0, 3)), 4, local,
                                 float(rng.uniform(0.1, 10) * local[4])))
    budget = float(rng.uniform(3, 5))
    total = sum(s.cost for s in items)
    best = min((sum(s.error(b) for s, b in zip(items, combo)), combo)
               for combo in itertools.product(WIDTHS, repeat=len(items))
               if sum(s.cost * b for s, b in zip(items, combo)) <= budget * total)
    widths, _ = solve(items, budget, WIDTHS)
    assert sum(s.cost * widths[s.name] for s in items) <= budget * total * (1 + 1e-9)
    assert sum(s.error(widths[s.name]) for s in items) == pytest.approx(best[0], rel=1e-9), (widths, best)


@pytest.mark.parametrize("text, widths", [("abc", None), ("1.5", None), ("4,5,6", None), ("4", "1,4"),
                                          ("4", "3,x")])
def test_bad_budgets_are_refused(text, widths):
    with pytest.raises(ValueError, match="BITS|narrowest|integers|bits must"):
        BitBudget.parse(text, *(() if widths is None else (widths,)))


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def loud_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SwinIR x4 whose linears do real work (quantization shows in its output)."""
    return save_checkpoint(make_loud(tiny_swinir(scale=4, seed=0)),
                           tmp_path_factory.mktemp("budget") / "loud_x4.safetensors")


@pytest.fixture(scope="module")
def budget_artifact(loud_checkpoint: Path, calib_images: Path) -> Path:
    """``2dq-calibrate --bits 4 --bit-budget 3.5`` (DOBI) on the loud tiny model."""
    out = loud_checkpoint.parent / "budget.safetensors"
    code = main(["--weights", str(loud_checkpoint), "--calib-images", str(calib_images), "--patches", "4",
                 "--patch-size", "16", "--batch", "2", "--bits", "4", "--bit-budget", "3.5",
                 "--bit-budget-patches", "2", "--bins", "1024", "--out", str(out), "--no-progress", "-q"])
    assert code == 0
    return out


def test_the_artifact_restores_the_chosen_widths(budget_artifact, loud_checkpoint, calib_lr):
    meta = load_artifact(budget_artifact).meta
    record = meta["method_options"]["bit_budget"]
    assert record["budget"] == {"weight": 3.5, "activation": 3.5}
    assert record["average_bits"]["weight"] <= 3.5 and record["average_bits"]["activation"] <= 3.5
    assert meta["quant_config"]["bits_overrides"]  # the widths travel as the config's exact-name overrides
    model = load_quantized_model(loud_checkpoint, budget_artifact)
    assert {name: q.bits for name, q in quantizers(model).items()} == record["widths"]
    assert len(set(record["widths"].values())) > 1
    averages = _averages(model, record["widths"], calib_lr[:1])
    assert averages["weight"] == pytest.approx(record["average_bits"]["weight"], abs=1e-4)
    assert averages["activation"] == pytest.approx(record["average_bits"]["activation"], abs=1e-4)


def test_the_mixed_export_lints_clean_and_ort_matches(budget_artifact, loud_checkpoint, tmp_path):
    from engines.ort_engine import OrtTileRunner, build_ort_engine
    from export.lint import lint_model
    from export.onnx_export import ExportOptions, export_onnx
    from toolchain.metrics import output_difference

    from ..engines.test_ort_engine import onnx_codes, quantizer_inputs

    graph = tmp_path / "mixed.onnx"
    export_onnx(loud_checkpoint, budget_artifact, graph, ExportOptions(tile=TILE))
    proto = onnx.load(str(graph))
    assert lint_model(proto) == []
    model = load_quantized_model(loud_checkpoint, budget_artifact)
    tiles = torch.rand(4, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
    found = quantizers(model)
    for name, x in quantizer_inputs(model, tiles).items():  # every quantizer exports its own width's grid
        q = found[name]
        expected = grid.integer_codes(x, q.lower, q.upper, q.bits, q.symmetric).numpy()
        assert np.abs(onnx_codes(proto, name, x).astype(int) - expected).max() <= CODE_ATOL, (name, q.bits)
    engine = tmp_path / "mixed.ort.onnx"
    build_ort_engine(graph, engine, threads=1)
    with torch.no_grad():
        reference = model(tiles)
        with float_mode(model):
            float_out = model(tiles)
    agree = output_difference(OrtTileRunner(engine, threads=1)(tiles), reference)
    assert agree.psnr >= ORT_MIN_PSNR and agree.identical_pixels >= ORT_MIN_IDENTICAL, agree
    assert output_difference(float_out, reference).psnr < ORT_MIN_PSNR  # quantization shows: the check can fail


@pytest.mark.parametrize("extra, message", [
    (["--bit-budget", "four"], "--bit-budget: expected BITS"),
    (["--bit-budget", "1"], "--bit-budget: .*narrowest"),
    (["--bit-budget", "4", "--bit-budget-widths", "4,9"], "--bit-budget-widths: bits must"),
    (["--bit-budget", "4", "--bit-budget-patches", "0"], "--bit-budget-patches must be positive"),
    (["--bit-budget", "4", "--bits-override", "layers.1.*=8"], "--bit-budget .* --bits-override"),
    (["--bit-budget", "4", "--target", "trt-int4"], "--bit-budget: not with --target trt-int4"),
    (["--bit-budget", "4", "--bit-budget-on", "transformed"], "--bit-budget-on transformed: .*no transform"),
])
def test_bad_options_are_usage_errors(capsys, tmp_path, loud_checkpoint, calib_images, extra, message):
    code, err = _cli(capsys, "--weights", str(loud_checkpoint), "--calib-images", str(calib_images),
                     "--out", str(tmp_path / "x.safetensors"), "--no-progress", "-q", *extra)
    assert code == 2, err
    assert re.search(message, err), err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_default_artifact_name_says_budget():
    """Without --out a budget run never overwrites the uniform run's default artifact."""
    from calib.cli import _check_args, build_parser, quant_config_from_args

    args = build_parser().parse_args(["--bit-budget", "3.5,4"])
    _check_args(args, quant_config_from_args(args))
    assert Path(args.out).name == "dat_light_x4_w4a4_budget3.5-4.safetensors"


def test_a_budget_at_the_narrowest_width_is_the_uniform_model_without_its_pass(loud_checkpoint, calib_images,
                                                                                tmp_path, capsys, monkeypatch):
    """``--bit-budget 2`` leaves no quantizer anything to trade (none can go below 2 bits): the command says so and
    writes the uniform W2A2 artifact, bounds byte for byte, without measuring a sensitivity."""
    import calib.cli

    common = ["--weights", str(loud_checkpoint), "--calib-images", str(calib_images), "--patches", "4",
              "--patch-size", "16", "--batch", "2", "--no-progress"]
    assert _cli(capsys, *common, "--bits", "2", "--out", str(tmp_path / "uniform.safetensors"))[0] == 0
    monkeypatch.setattr(calib.cli, "allocate_bits", lambda *a, **k: pytest.fail("the sensitivity pass ran"))
    code, err = _cli(capsys, *common, "--bits", "4", "--bit-budget", "2", "--out", str(tmp_path / "b.safetensors"))
    assert code == 0 and "narrowest allowed width" in err, err
    uniform, budget = load_artifact(tmp_path / "uniform.safetensors"), load_artifact(tmp_path / "b.safetensors")
    assert budget.quant_config == QuantConfig(w_bits=2, a_bits=2)
    assert budget.bounds.keys() == uniform.bounds.keys()
    assert all(torch.equal(budget.bounds[k], uniform.bounds[k]) for k in uniform.bounds)


def test_the_sensitivities_can_be_measured_on_the_transformed_model(loud_checkpoint, calib_images, tmp_path, capsys):
    """``--bit-budget-on transformed``: the sensitivities see the smoothed and rotated tensors the calibrated model
    quantizes, so another allocation comes out than ``plain``'s (the default: the model without them); the sidecar
    says which, and each artifact restores the widths chosen for it."""
    common = ["--weights", str(loud_checkpoint), "--calib-images", str(calib_images), "--patches", "4",
              "--patch-size", "16", "--batch", "2", "--bits", "4", "--bit-budget", "3.5", "--bit-budget-patches", "2",
              "--bins", "1024", "--smooth", "all", "--rotate", "inputs", "--no-progress", "-q"]
    records = {}
    for on in ("plain", "transformed"):
        out = tmp_path / f"{on}.safetensors"
        assert _cli(capsys, *common, "--bit-budget-on", on, "--out", str(out))[0] == 0
        records[on] = load_artifact(out).meta["method_options"]["bit_budget"]
        assert records[on]["measured_on"] == on
        model = load_quantized_model(loud_checkpoint, out)
        assert {name: q.bits for name, q in quantizers(model).items()} == records[on]["widths"]
    assert records["plain"]["widths"] != records["transformed"]["widths"]
    plain, transformed = (records[on]["predicted_output_mse"]["base"] for on in ("plain", "transformed"))
    assert plain != transformed
