"""Transforms through the whole pipeline (calib/transforms/pipeline.py): :class:`TransformsConfig` and its command-line
options, ``2dq-calibrate --smooth/--shifts`` -> artifact -> DQC -> export -> ORT."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

from calib.artifact import TRANSFORMS_PREFIX, load_artifact, load_quantized_model
from calib.dqc import DQCConfig, distill, trainable_state
from calib.observers import batch_forward_loop
from calib.dobi import calibrate_dobi
from calib.transforms.pipeline import (
    TransformsConfig,
    add_transform_arguments,
    attach_transforms,
    transforms_config_from_args,
)
from calib.transforms.registry import transform_parameters
from calib.transforms.shift import add_shifts, find_shift_sites, init_shifts
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant
from toolchain.cli.common import UsageError
from toolchain.metrics import output_difference
from toolchain.quant import QuantConfig, quantize_model
from toolchain.tolerances import ORT_MIN_PSNR

from ...engine_controls import assert_codes_agree, assert_codes_fail_on_broken_engines, float_export, perturbed_engine
from ...tiny_models import tiny_swinir
from ..test_cli_calibrate import base_args, run



def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return output_difference(a, b).psnr


def _ort_psnr(ort, onnx_path, model: torch.nn.Module) -> float:
    """PSNR of ONNX Runtime's output on two seeded tiles against the fake-quant model's."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        return _psnr(got, model(x))


@pytest.fixture(scope="module")
def float_engine(tmp_path_factory) -> Path:
    """The negative control of the ORT checks: the float engine of ``tiny_checkpoint``'s SwinIR x4 (every quantizer
    disabled, through the exporter; the transforms are identities in float). The float graphs of these artifacts
    clear :func:`_ort_psnr`'s floor (measured 72.7-75.3 dB; one scale one step off: 86.8-90.6 dB), so the
    per-quantizer codes of :func:`_ort_codes_agree` decide."""
    from engines.ort_engine import build_ort_engine
    from export.onnx_export import ExportOptions, Provenance

    folder = tmp_path_factory.mktemp("float")
    model = quantize_model(tiny_swinir(scale=4, seed=0), QuantConfig())
    graph = float_export(model, folder / "float.onnx", ExportOptions(tile=16),
                         Provenance("0" * 64, "0" * 64, QuantConfig().to_dict()))
    build_ort_engine(graph, folder / "float.ort.onnx", threads=2)
    return folder / "float.ort.onnx"


def _ort_codes_agree(onnx_path: Path, model: torch.nn.Module, float_engine: Path, folder: Path) -> None:
    """On the tiles of :func:`_ort_psnr`, ONNX Runtime's integer codes of every quantizer equal the fake-quant
    model's; that check fails the float engine and ``onnx_path`` with one scale one step wider."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert_codes_agree(onnx_path, model, x)
    assert_codes_fail_on_broken_engines(float_engine, perturbed_engine(onnx_path, model, x, folder), model, x)


def test_cli_writes_transforms_and_the_loaded_model_is_baked(tmp_path, capsys, tiny_checkpoint, calib_images):
    out = tmp_path / "all.safetensors"
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--smooth", "all", "--shifts",
                          "--granularity", "per-channel")
    assert code == 0, stdout
    artifact = load_artifact(out)
    spec = artifact.meta["transforms"]
    kinds = {g["kind"] for g in spec["smoothing"]}
    assert kinds == {"norm", "value", "input"}  # SwinIR: norm1/norm2 folds, v folds, fc2 (after GELU) explicit
    assert {s["kind"] for s in spec["shifts"]} >= {"norm_output", "attn_value"}
    options = artifact.meta["method_options"]["transforms"]
    assert options["smoothing"]["groups"]["norm"] == 8  # 4 blocks x (norm1, norm2)
    assert options["smoothing"]["alpha"] == 0.5
    folds = [k for k in artifact.bounds if k.startswith(TRANSFORMS_PREFIX)]
    assert len(folds) == len(spec["smoothing"]) + len(spec["shifts"])
    assert artifact.meta["quantizers"] * 2 == len(artifact.bounds) - len(folds)

    model = load_quantized_model(tiny_checkpoint, out)
    assert transform_parameters(model) == []  # baked: plain tensors only
    multipliers = [n for n, m in model.named_modules() if getattr(m, "input_multiplier", None) is not None]
    assert multipliers and all(n.endswith("fc2") for n in multipliers)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_unknown_smoothing_kind_is_a_usage_error(tmp_path, capsys, tiny_checkpoint, calib_images):
    code, _, err = run(capsys, *base_args(tiny_checkpoint, calib_images, tmp_path / "x.safetensors"),
                       "--smooth", "norm,rows")
    assert code == 2 and "--smooth" in err and "rows" in err


def dobi_then_2dquant(tmp_path, capsys, checkpoint, images, options: list[str]):
    """``2dq-calibrate`` with ``options``, DOBI only and then 2DQuant (3 DQC steps); both artifacts loaded."""
    dobi_out, full_out = tmp_path / "dobi.safetensors", tmp_path / "2dq.safetensors"
    assert run(capsys, *base_args(checkpoint, images, dobi_out), *options)[0] == 0
    dqc = ["--method", "2dquant", "--dqc-iters", "3", "--dqc-batch", "2", "--dqc-patch-size", "16", "--val-every", "0",
           "--val-patches", "2", "--checkpoint-every", "0", "--dqc-lr", "0.003"]
    code, stdout, _ = run(capsys, *base_args(checkpoint, images, full_out), *options, *dqc)
    assert code == 0, stdout
    return load_artifact(dobi_out), load_artifact(full_out), full_out


def test_2dquant_trains_factors_and_offsets_with_the_bounds(tmp_path, capsys, tiny_checkpoint, calib_images):
    before, after, _ = dobi_then_2dquant(tmp_path, capsys, tiny_checkpoint, calib_images,
                                         ["--smooth", "folded", "--shifts"])
    before, after = before.bounds, after.bounds
    folds = [k for k in before if k.startswith(TRANSFORMS_PREFIX)]
    assert folds and set(folds) == {k for k in after if k.startswith(TRANSFORMS_PREFIX)}
    assert any(not torch.equal(before[k], after[k]) for k in folds if "log_scale" in k)
    assert any(not torch.equal(before[k], after[k]) for k in folds if "offset" in k)


def test_dqc_resume_state_carries_the_transforms():
    model = quantize_model(tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2]), QuantConfig())
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loop = batch_forward_loop(x, progress=False)
    sites = find_shift_sites(model, x[:1])
    add_smoothing(model, find_smoothing_groups(model, x[:1], kinds=("norm", "value", "input")))
    init_smoothquant(model, loop)
    add_shifts(model, sites)
    calibrate_dobi(model, loop, candidates=10, bins=256)
    init_shifts(model)
    start = trainable_state(model)
    assert any(k.startswith("transforms/smoothing.") for k in start) and any(k.startswith("transforms/shift.")
                                                                             for k in start)
    distill(model, list(x), DQCConfig(iters=2, batch=2, val_every=0, checkpoint_every=0), progress=False)
    end = trainable_state(model)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("transforms/"))


def test_input_smoothing_exports_a_mul_and_ort_matches_the_reference(tmp_path, capsys, tiny_checkpoint,
                                                                     calib_images, float_engine):
    ort = pytest.importorskip("onnxruntime")
    from export.onnx_export import ExportOptions, export_onnx

    out = tmp_path / "all.safetensors"
    assert run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--smooth", "all", "--shifts")[0] == 0
    onnx_path = tmp_path / "all.onnx"
    result = export_onnx(tiny_checkpoint, out, onnx_path, ExportOptions(tile=16))
    assert not result.violations
    graph = onnx.load(str(onnx_path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    # every quantized fc2 input: Mul (the smoothing) -> ... -> QuantizeLinear, with no other float op between
    fc2_inputs = [n for n in graph.node if n.op_type == "QuantizeLinear" and "fc2" in n.name and "input" in n.name]
    assert fc2_inputs

    def upstream_ops(node, depth=3):
        ops, current = [], node
        for _ in range(depth):
            current = producers.get(current.input[0])
            if current is None:
                break
            ops.append(current.op_type)
        return ops

    assert all("Mul" in upstream_ops(q) for q in fc2_inputs)
    model = load_quantized_model(tiny_checkpoint, out)
    assert _ort_psnr(ort, onnx_path, model) >= ORT_MIN_PSNR
    _ort_codes_agree(onnx_path, model, float_engine, tmp_path)


def test_input_shifts_need_input_smoothing(tmp_path, capsys, tiny_checkpoint, calib_images):
    code, _, err = run(capsys, *base_args(tiny_checkpoint, calib_images, tmp_path / "x.safetensors"),
                       "--smooth", "folded", "--input-shifts")
    assert code == 2 and "--input-shifts" in err


def test_input_shifts_train_export_a_sub_and_ort_matches(tmp_path, capsys, tiny_checkpoint, calib_images,
                                                         float_engine):
    ort = pytest.importorskip("onnxruntime")
    from export.onnx_export import ExportOptions, export_onnx

    before, after, full_out = dobi_then_2dquant(tmp_path, capsys, tiny_checkpoint, calib_images,
                                                ["--smooth", "input", "--input-shifts"])
    assert after.meta["method_options"]["transforms"]["input_shifts"] == 4  # fc2 of the 4 blocks
    offsets = [k for k in after.bounds if k.startswith(TRANSFORMS_PREFIX + "input_shift.")]
    assert len(offsets) == 4 and all(before.bounds[k].abs().sum() > 0 for k in offsets)  # midpoints, not 0
    assert any(not torch.equal(before.bounds[k], after.bounds[k]) for k in offsets)  # DQC moved them

    onnx_path = tmp_path / "shifted.onnx"
    assert not export_onnx(tiny_checkpoint, full_out, onnx_path, ExportOptions(tile=16)).violations
    graph = onnx.load(str(onnx_path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    fc2_inputs = [n for n in graph.node if n.op_type == "QuantizeLinear" and "fc2" in n.name and "input" in n.name]
    chains = []
    for node in fc2_inputs:
        ops, current = [], node
        while (current := producers.get(current.input[0])) is not None and len(ops) < 3:
            ops.append(current.op_type)
        chains.append(ops)
    assert len(chains) == 4 and all("Sub" in ops and "Mul" in ops for ops in chains), chains
    model = load_quantized_model(tiny_checkpoint, full_out)
    assert _ort_psnr(ort, onnx_path, model) >= ORT_MIN_PSNR
    _ort_codes_agree(onnx_path, model, float_engine, tmp_path)


def test_gptq_with_every_transform_exports_and_ort_matches(tmp_path, capsys, tiny_checkpoint, calib_images,
                                                           float_engine):
    """DOBI + every transform + ``--gptq``: refined weights in the artifact, lint-clean graph, ORT exact."""
    ort = pytest.importorskip("onnxruntime")
    from export.onnx_export import ExportOptions, export_onnx
    from toolchain.quant import QuantLinear

    every = ["--granularity", "per-channel", "--smooth", "all", "--shifts", "--input-shifts"]
    plain_out, out = tmp_path / "plain.safetensors", tmp_path / "gptq.safetensors"
    assert run(capsys, *base_args(tiny_checkpoint, calib_images, plain_out), *every)[0] == 0
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), *every, "--gptq")
    assert code == 0, stdout
    plain, after = load_artifact(plain_out), load_artifact(out)
    facts = after.meta["method_options"]["gptq"]
    assert facts["linears"] == 16 and facts["order"] == "act"  # qkv, proj, fc1, fc2 of 4 blocks
    assert facts["mean_relative_error"]["gptq"] < facts["mean_relative_error"]["round_to_nearest"]
    refined = [k for k in after.bounds if k.startswith("weights/")]
    assert after.meta["refined_weights"] == len(refined) == 16  # the float weights under the folds
    # the same bounds and folds as without GPTQ: it only chooses among each grid's points
    assert all(torch.equal(plain.bounds[k], v) for k, v in after.bounds.items() if not k.startswith("weights/"))
    assert len(plain.bounds) == len(after.bounds) - len(refined)

    model = load_quantized_model(tiny_checkpoint, out)
    for module in model.modules():
        if isinstance(module, QuantLinear):  # the baked weights are GPTQ's grid points
            step = module.weight_quantizer.step_and_zero_point()[0]
            assert ((module.weight - module.weight_quantizer(module.weight)).abs() <= 1e-5 * step).all()
    onnx_path = tmp_path / "gptq.onnx"
    assert not export_onnx(tiny_checkpoint, out, onnx_path, ExportOptions(tile=16)).violations
    assert _ort_psnr(ort, onnx_path, model) >= ORT_MIN_PSNR
    _ort_codes_agree(onnx_path, model, float_engine, tmp_path)


def test_reconstructed_affines_with_every_transform_export_and_ort_matches(tmp_path, capsys, tiny_checkpoint,
                                                                          calib_images, float_engine):
    """``--reconstruct --reconstruct-affine`` under every fold: the trained biases and LayerNorm affines are in the
    artifact by their checkpoint names, differ from the checkpoint's, and the exported graph computes them exactly."""
    ort = pytest.importorskip("onnxruntime")
    from export.onnx_export import ExportOptions, export_onnx
    from toolchain import load_model

    out = tmp_path / "affine.safetensors"
    code, stdout, _ = run(capsys, *base_args(tiny_checkpoint, calib_images, out), "--granularity", "per-channel",
                          "--smooth", "all", "--shifts", "--reconstruct", "--reconstruct-iters", "10",
                          "--reconstruct-affine", "--affine-lr", "1e-4")
    assert code == 0, stdout
    artifact = load_artifact(out)
    refined = {k[len("weights/"):]: v for k, v in artifact.bounds.items() if k.startswith("weights/")}
    assert any(k.endswith("norm1.weight") for k in refined) and any(k.endswith("qkv.bias") for k in refined)
    checkpoint = dict(load_model(tiny_checkpoint).named_parameters())
    assert all(not torch.equal(checkpoint[k], v) for k, v in refined.items())
    assert artifact.meta["method_options"]["reconstruct"]["config"]["affine"] is True
    model = load_quantized_model(tiny_checkpoint, out)
    onnx_path = tmp_path / "affine.onnx"
    assert not export_onnx(tiny_checkpoint, out, onnx_path, ExportOptions(tile=16)).violations
    assert _ort_psnr(ort, onnx_path, model) >= ORT_MIN_PSNR
    _ort_codes_agree(onnx_path, model, float_engine, tmp_path)


@pytest.mark.parametrize("options, message", [(["--gptq-damp", "0"], "--gptq-damp"),
                                              (["--method", "2dquant"], "does not go with --method 2dquant")])
def test_gptq_usage_errors(tmp_path, capsys, tiny_checkpoint, calib_images, options, message):
    code, _, err = run(capsys, *base_args(tiny_checkpoint, calib_images, tmp_path / "x.safetensors"),
                       "--gptq", *options)
    assert code == 2 and message in err


@pytest.mark.parametrize("fields, message", [
    (dict(smooth=("norm", "rows")), "--smooth: unknown kind 'rows'"),
    (dict(smooth="norm"), "--smooth: a sequence of kinds"),
    (dict(smooth=("norm",), alpha=1.5), r"--smooth-alpha must be in \[0, 1\], got 1.5"),
    (dict(smooth=("norm",), alpha=float("nan")), "--smooth-alpha"),
    (dict(alpha=-0.1), "--smooth-alpha"),
    (dict(smooth=("norm", "value"), input_shifts=True), "--input-shifts applies to the linears of explicit input"),
])
def test_transforms_config_names_the_bad_option(fields, message):
    with pytest.raises(ValueError, match=message):
        TransformsConfig(**fields)


def test_transforms_config_is_frozen_and_normalized():
    config = TransformsConfig(smooth=["input", "norm", "input"], alpha=0.25, input_shifts=True)
    assert config.smooth == ("input", "norm") and config.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.5
    assert not TransformsConfig().enabled and TransformsConfig(shifts=True).enabled


def test_the_command_line_maps_to_the_config_in_one_place():
    parser = argparse.ArgumentParser()
    add_transform_arguments(parser.add_argument_group("transforms"))
    assert transforms_config_from_args(parser.parse_args([])) == TransformsConfig()
    args = parser.parse_args(["--smooth", "folded,input", "--smooth-alpha", "0.7", "--shifts", "--input-shifts"])
    assert transforms_config_from_args(args) == TransformsConfig(("norm", "value", "input"), 0.7, True, True)
    for argv, message in ((["--smooth", "norm,rows"], "rows"), (["--smooth", "norm", "--smooth-alpha", "2"],
                                                                 "--smooth-alpha"),
                          (["--input-shifts"], "--input-shifts")):
        with pytest.raises(UsageError, match=message):  # exit code 2 in 2dq-calibrate
            transforms_config_from_args(parser.parse_args(argv))


def test_attach_transforms_takes_a_config_and_adds_nothing_by_default():
    model = quantize_model(tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2]), QuantConfig())
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loop = batch_forward_loop(lr, progress=False)
    with pytest.raises(TypeError, match="TransformsConfig"):
        attach_transforms(model, lr, loop, argparse.Namespace(smooth="all", smooth_alpha=0.5, shifts=True,
                                                              input_shifts=False))
    assert attach_transforms(model, lr, loop, TransformsConfig()) == {} and transform_parameters(model) == []
    facts = attach_transforms(model, lr, loop, TransformsConfig(smooth=("input",), input_shifts=True))
    assert facts == {"smoothing": {"alpha": 0.5, "groups": {"input": 2}}, "input_shifts": 2}  # fc2 of 2 blocks
    assert len(transform_parameters(model)) == 4
