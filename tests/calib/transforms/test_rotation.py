"""Input rotations (calib/transforms/rotation.py, hadamard.py): orthogonal and Hadamard matrices, exact in float,
composition with smoothing and input shifts, refusals, DQC leaves R alone, artifact round trip, GPTQ through the
fold, and the QDQ export (one constant MatMul) on ONNX Runtime against the fake-quant reference, with R replaced
by the identity as the negative control."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calib.artifact import load_artifact, load_quantized_model, save_artifact
from calib.baselines import calibrate_minmax
from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms.fold import bake_transforms
from calib.transforms.hadamard import hadamard_matrix, random_orthogonal, rotation_matrix
from calib.transforms.input_shift import add_input_shifts, init_input_shifts
from calib.transforms.registry import transform_parameters, transforms_spec, transforms_state
from calib.transforms.rotation import (
    add_rotations,
    conflicting_shift_sites,
    find_rotation_sites,
    rotation_sites,
)
from calib.transforms.shift import add_shifts, find_shift_sites
from calib.transforms.smoothing import add_smoothing, find_smoothing_groups, init_smoothquant
from toolchain.quant import QuantConfig, QuantLinear, float_mode, quantize_model
from toolchain.tolerances import FLOAT_FOLD_RTOL, ORT_MIN_IDENTICAL, ORT_MIN_PSNR

from ...tiny_models import make_loud, save_checkpoint, tiny_swinir

TILE = 16


def _tiny(config: QuantConfig = QuantConfig(), loud: bool = False) -> torch.nn.Module:
    """Tiny SwinIR x2 (embed 12: qkv/proj/fc1 read 12 channels, fc2 24), seed 0."""
    model = tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2])
    if loud:
        make_loud(model)
    return quantize_model(model, config)


def _data(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def _range(t: torch.Tensor) -> float:
    return float(t.amax() - t.amin())


@pytest.mark.parametrize("n, construction", [(1, "sylvester"), (2, "sylvester-2"), (12, "paley1-11"),
                                             (16, "sylvester-16"), (24, "sylvester-2xpaley1-11"), (36, "paley2-17"),
                                             (60, "paley1-59"), (120, "sylvester-2xpaley1-59")])
def test_hadamard_matrices_are_hadamard_and_their_rotations_orthogonal(n, construction):
    h, name = hadamard_matrix(n)
    assert name == construction and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    for kind in ("hadamard", "signed-hadamard"):
        r, how = rotation_matrix(n, kind, seed=3)
        assert r.dtype == torch.float32 and construction in how
        torch.testing.assert_close(r @ r.T, torch.eye(n), rtol=0, atol=1e-6)
        torch.testing.assert_close(r.abs(), torch.full((n, n), 1 / math.sqrt(n)), rtol=0, atol=1e-7)
    signed, _ = rotation_matrix(n, "signed-hadamard", seed=3)
    assert torch.equal(signed, rotation_matrix(n, "signed-hadamard", seed=3)[0])  # seeded


def test_random_orthogonal_where_no_hadamard_is_built():
    assert hadamard_matrix(6) is None and hadamard_matrix(52) is None  # 52: Paley II needs the prime power 25
    for n in (6, 12):
        r, how = rotation_matrix(n, "random", seed=5) if n == 12 else rotation_matrix(n)
        assert how.startswith("random")
        torch.testing.assert_close(r @ r.T, torch.eye(n), rtol=0, atol=1e-6)
    assert torch.equal(random_orthogonal(8, 1), random_orthogonal(8, 1))
    assert not torch.allclose(random_orthogonal(8, 1), random_orthogonal(8, 2))
    with pytest.raises(ValueError, match="matrix kind"):
        rotation_matrix(4, "givens")


def test_rotation_leaves_the_float_model_unchanged_and_the_quantizer_sees_x_r():
    model, x = _tiny(), _data()
    with torch.no_grad(), float_mode(model):
        before = model(x)
    sites = find_rotation_sites(model)
    paths = [p for p, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_quantizer is not None]
    assert [s.linear for s in sites] == paths and len(paths) == 8  # qkv, proj, fc1, fc2 of two blocks
    assert {s.construction for s in sites} == {"hadamard(paley1-11)", "hadamard(sylvester-2xpaley1-11)"}
    matrices = add_rotations(model, sites)
    fc2 = model.get_submodule(next(p for p in paths if p.endswith("fc2")))
    seen = {}
    fc2.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    fc2.input_quantizer.register_forward_pre_hook(lambda m, args: seen.__setitem__("q", args[0].detach()))
    with torch.no_grad(), float_mode(model):
        after = model(x)
    assert float((after - before).abs().max()) <= FLOAT_FOLD_RTOL * _range(before)
    r = matrices[next(p for p in paths if p.endswith("fc2"))]
    torch.testing.assert_close(seen["q"], seen["x"] @ r, rtol=0, atol=1e-6)
    assert rotation_sites(model) == sites and transform_parameters(model) == []  # R is fixed: DQC trains nothing
    assert len(transforms_state(model)) == 8 and len(transforms_spec(model)["rotations"]) == 8


def test_rotate_only_selects_by_pattern_and_refuses_nothing_matched():
    model = _tiny()
    assert [s.linear.rsplit(".", 1)[-1] for s in find_rotation_sites(model, only=("*.fc2",))] == ["fc2", "fc2"]
    with pytest.raises(ValueError, match=r"no input-quantized linear matches \['\*.fc9'\]"):
        find_rotation_sites(model, only=("*.fc9",))


def test_rotation_composes_exactly_with_every_smoothing_kind_and_input_shifts():
    """Smoothing (folded and explicit), then rotations, then input shifts with random offsets: float unchanged;
    quantized, the baked model is the parametrized one bit for bit."""
    model, x = _tiny(), _data()
    with torch.no_grad(), float_mode(model):
        before = model(x)
    groups = find_smoothing_groups(model, x[:1], kinds=("norm", "value", "input"))
    add_smoothing(model, groups)
    init_smoothquant(model, batch_forward_loop(x, progress=False))
    add_rotations(model, find_rotation_sites(model, matrix="signed-hadamard", seed=4))
    inputs = [g.producer for g in groups if g.kind == "input"]
    add_input_shifts(model, inputs)
    init_input_shifts(model, batch_forward_loop(x, progress=False))
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[p].register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, args[0].detach()))
             for p in inputs]
    with torch.no_grad(), float_mode(model):
        after = model(x)
    for hook in hooks:
        hook.remove()
    for path in inputs:  # offsets are the channel midpoints of the rotated input x * m @ R
        linear = modules[path]
        with torch.no_grad():
            u = ((seen[path] * linear.input_multiplier) @ linear.input_rotation).reshape(-1, linear.in_features)
            torch.testing.assert_close(linear.input_offset, (u.amin(0) + u.amax(0)) / 2, rtol=0, atol=1e-5)
    assert float((after - before).abs().max()) <= FLOAT_FOLD_RTOL * _range(before)
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)
    with torch.no_grad():
        quantized = model(x)
        bake_transforms(model)
        assert torch.equal(model(x), quantized)
    assert all(isinstance(m.input_rotation, torch.Tensor) for p, m in modules.items() if isinstance(m, QuantLinear)
               and m.input_quantizer is not None)


def test_refusals_name_the_conflicting_transform():
    model, x = _tiny(), _data()
    sites = find_shift_sites(model, x[:1])
    groups = find_smoothing_groups(model, x[:1], kinds=("norm",))
    rotations = find_rotation_sites(model)
    add_rotations(model, rotations)
    with pytest.raises(ValueError, match="already rotated; add smoothing before rotations"):
        add_smoothing(model, groups)
    with pytest.raises(ValueError, match="already rotated"):
        add_rotations(model, rotations[:1])
    dropped = conflicting_shift_sites(model, sites, [r.linear for r in rotations])
    assert {s.kind for s in dropped} == {"norm_output", "attn_value"}
    assert [s.kind for s in sites if s not in dropped] == ["attn_key"] * 2  # k is no linear's input: still exact
    with pytest.raises(ValueError, match="rotated input"):
        add_shifts(model, dropped[:1])
    add_shifts(model, [s for s in sites if s not in dropped])
    shifted_first = _tiny()
    add_shifts(shifted_first, [s for s in sites if s.kind == "norm_output"])
    with pytest.raises(ValueError, match="shifted through its bias"):
        add_rotations(shifted_first, find_rotation_sites(shifted_first))


def test_gptq_writes_through_the_rotation():
    from calib.gptq import refine_weights

    model, x = _tiny(QuantConfig(weight_granularity="per-channel")), _data()
    add_rotations(model, find_rotation_sites(model))
    calibrate_dobi(model, batch_forward_loop(x, progress=False), candidates=10, bins=256)
    results, refined = refine_weights(model, batch_forward_loop(x, progress=False), progress=False)
    assert len(results) == 8 and all(r.gptq_error <= r.rtn_error * 1.0001 for r in results)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.input_rotation is not None:
            step = module.weight_quantizer.step_and_zero_point()[0]
            assert ((module.weight - module.weight_quantizer(module.weight)).abs() <= 1e-4 * step).all()


def _calibrated(folder: Path, loud: bool, bits: int = 4) -> tuple[Path, Path, torch.nn.Module]:
    """Tiny SwinIR x2 checkpoint, rotated and MinMax-calibrated, saved as an artifact."""
    model = tiny_swinir(scale=2, seed=0, depths=[2], num_heads=[2])
    if loud:
        make_loud(model)
    checkpoint = save_checkpoint(model, folder / "tiny_x2.safetensors")
    config = QuantConfig(w_bits=bits, a_bits=bits)
    quantize_model(model, config)
    add_rotations(model, find_rotation_sites(model))
    calibrate_minmax(model, batch_forward_loop(_data(4, 2), batch_size=4, progress=False))
    artifact = save_artifact(folder / "rotated.safetensors", model, checkpoint=checkpoint, quant_config=config,
                             method="minmax")
    return checkpoint, artifact, model


def test_artifact_round_trip_reproduces_the_calibrated_model_bit_for_bit(tmp_path):
    checkpoint, artifact, model = _calibrated(tmp_path, loud=False)
    meta = load_artifact(artifact).meta
    assert [r["linear"] for r in meta["transforms"]["rotations"]] == [s.linear for s in rotation_sites(model)]
    loaded = load_quantized_model(checkpoint, artifact)
    x = _data(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(k.startswith("parametrizations") for k in loaded.state_dict())  # baked: R and W R are plain


@pytest.fixture(scope="module")
def rotated_export(tmp_path_factory):
    """The loud tiny model at W4A4 with every linear input rotated: artifact, QDQ export, ORT engine."""
    from engines.ort_engine import build_ort_engine
    from export.onnx_export import ExportOptions, export_onnx

    folder = tmp_path_factory.mktemp("rotated")
    checkpoint, artifact, _ = _calibrated(folder, loud=True)
    graph = folder / "rotated.onnx"
    result = export_onnx(checkpoint, artifact, graph, ExportOptions(tile=TILE))
    engine = folder / "rotated.ort.onnx"
    build_ort_engine(graph, engine, threads=2)
    return checkpoint, artifact, graph, engine, result


def _rotation_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose second input is a constant square float matrix and whose output feeds the Q/DQ chain."""
    consts = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts
            and consts[n.input[1]].data_type == onnx.TensorProto.FLOAT
            and len(consts[n.input[1]].dims) == 2 and consts[n.input[1]].dims[0] == consts[n.input[1]].dims[1]]


def test_export_has_one_constant_matmul_per_rotated_input_and_lints_clean(rotated_export):
    _, _, graph, _, result = rotated_export
    assert not result.violations
    model = onnx.load(str(graph))
    rotations = _rotation_nodes(model)
    assert len(rotations) == 8
    consumers = {i: n for n in model.graph.node for i in n.input}
    for node in rotations:
        chain, current = [], node
        while (current := consumers.get(current.output[0])) is not None and len(chain) < 3:
            chain.append(current.op_type)
            if current.op_type == "QuantizeLinear":
                break
        assert chain[-1] == "QuantizeLinear" and "MatMul" not in chain, chain  # R sits right before the Q/DQ


def test_ort_matches_the_fake_quant_reference_and_fails_without_the_rotation(rotated_export, tmp_path):
    """Loud W4A4: the engine agrees with the reference; the same graph with every R replaced by the identity
    (the rotated weights kept) does not."""
    from engines.code_agreement import code_agreement
    from engines.ort_engine import OrtTileRunner, build_ort_engine
    from toolchain.metrics import output_difference

    checkpoint, artifact, graph, engine, _ = rotated_export
    reference_model = load_quantized_model(checkpoint, artifact)
    tiles = torch.rand(8, 3, TILE, TILE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = reference_model(tiles)
    agreement = output_difference(OrtTileRunner(engine, threads=2)(tiles), reference)
    assert agreement.psnr >= ORT_MIN_PSNR and agreement.identical_pixels >= ORT_MIN_IDENTICAL, agreement
    rows = code_agreement(engine, reference_model, tiles[:2], threads=2)
    assert rows and all(r.identical >= ORT_MIN_IDENTICAL and r.max_difference <= 1 for r in rows), rows

    model = onnx.load(str(graph))
    consts = {t.name: t for t in model.graph.initializer}
    for node in _rotation_nodes(model):
        matrix = consts[node.input[1]]
        matrix.CopyFrom(numpy_helper.from_array(np.eye(matrix.dims[0], dtype=np.float32), matrix.name))
    unrotated = tmp_path / "identity.onnx"
    onnx.save(model, str(unrotated))
    build_ort_engine(unrotated, tmp_path / "identity.ort.onnx", threads=2)
    broken = output_difference(OrtTileRunner(tmp_path / "identity.ort.onnx", threads=2)(tiles), reference)
    assert broken.psnr < ORT_MIN_PSNR and broken.identical_pixels < ORT_MIN_IDENTICAL, broken


def test_cli_rotates_with_every_transform_and_2dquant_leaves_r_alone(tmp_path, capsys, tiny_checkpoint,
                                                                      calib_images):
    """``2dq-calibrate --rotate all`` (inputs, q/k, v) with smoothing, shifts and input shifts: the shift sites of
    rotated tensors are left out and counted, every R is stored and DQC does not move it."""
    from calib.artifact import TRANSFORMS_PREFIX

    from ..test_cli_calibrate import base_args, run
    from .test_pipeline import dobi_then_2dquant

    options = ["--smooth", "all", "--shifts", "--input-shifts", "--rotate", "all"]
    before, after, full_out = dobi_then_2dquant(tmp_path, capsys, tiny_checkpoint, calib_images, options)
    facts = after.meta["method_options"]["transforms"]
    assert facts["rotation"]["linears"] == 16 and facts["rotation"]["folded"] == {"qk": 4, "value": 4}
    assert facts["rotation"]["shift_sites_dropped"] == 16  # 4 blocks x (norm1, norm2, k, v)
    assert facts["shifts"] == {"norm_output": 0, "attn_value": 0, "attn_key": 0} and facts["input_shifts"] == 4
    matrices = [k for k in after.bounds if k.startswith(TRANSFORMS_PREFIX) and "rotation." in k]
    assert len(matrices) == 24 and all(torch.equal(before.bounds[k], after.bounds[k]) for k in matrices)
    assert any(not torch.equal(before.bounds[k], after.bounds[k]) for k in after.bounds if "log_scale" in k)
    model = load_quantized_model(tiny_checkpoint, full_out)
    assert sum(isinstance(m, QuantLinear) and m.input_rotation is not None for m in model.modules()) == 16
    for argv, message in ((["--rotate", "outputs"], "--rotate: unknown kind 'outputs'"),
                          (["--rotate", "qk", "--rotate-only", "*.fc2"], "--rotate-only selects among rotated"),
                          (["--rotate", "inputs", "--rotate-only", "*.fc9"], "--rotate-only: rotation: no input"),
                          (["--rotate", "inputs", "--rotation-seed", "-1"], "--rotation-seed")):
        code, _, err = run(capsys, *base_args(tiny_checkpoint, calib_images, tmp_path / "bad.safetensors"), *argv)
        assert code == 2 and message in err, (argv, err)
