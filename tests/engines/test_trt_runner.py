"""TensorRT tile runner (engines/trt/runner.py).

Without TensorRT: batch splitting, dtype and device handling, the errors before TensorRT is touched,
and the tiny QDQ model used below (checked against ONNX Runtime and a PyTorch fake-quant reference).
Tests marked ``tensorrt`` build a real INT8 plan from that model and compare it with ONNX Runtime;
they need the tensorrt package and a CUDA GPU and skip otherwise.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.trt.runner import TrtTileRunner, cuda_index, pick_buffers, split_batches, torch_dtype
from engines.trt.sidecar import sidecar_path
from toolchain.tolerances import TRT_MAX_ABS_ERROR

from ..export.conftest import hand_metadata

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TRT = pytest.mark.skipif(
    not HAVE_TENSORRT or not torch.cuda.is_available(), reason="needs the tensorrt package and a CUDA GPU"
)
ACT_STEP = 1.0 / 127  # symmetric 8-bit activation grid over [-128 s, 127 s]
WEIGHT_STEP = 0.01


@pytest.mark.parametrize(
    "count, max_batch, expected",
    [
        (0, 4, []),
        (3, 4, [(0, 3)]),
        (8, 4, [(0, 4), (4, 8)]),
        (5, 2, [(0, 2), (2, 4), (4, 5)]),
        (3, 1, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_split_batches(count, max_batch, expected):
    assert split_batches(count, max_batch) == expected


def test_split_batches_refuses_nonsense():
    with pytest.raises(ValueError, match="max_batch"):
        split_batches(4, 0)
    with pytest.raises(ValueError, match="count"):
        split_batches(-1, 4)


def test_engine_dtypes_and_devices():
    assert torch_dtype("FLOAT") is torch.float32 and torch_dtype("HALF") is torch.float16
    with pytest.raises(ValueError, match="INT8 is not supported"):
        torch_dtype("INT8")
    assert cuda_index("cuda:1") == 1 and cuda_index(2) == 2
    with pytest.raises(ValueError, match="CUDA device, got device 'cpu'"):
        cuda_index("cpu")


def test_buffer_backend_choice():
    assert pick_buffers("auto", True) == "pycuda" and pick_buffers("auto", False) == "torch"
    assert pick_buffers("torch", True) == "torch"
    with pytest.raises(ImportError, match="pycuda is not installed"):
        pick_buffers("pycuda", False)
    with pytest.raises(ValueError, match="buffers must be"):
        pick_buffers("numpy", True)


def test_missing_plan_or_sidecar_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="TensorRT plan not found"):
        TrtTileRunner(tmp_path / "none.plan")
    (tmp_path / "m.plan").write_bytes(b"plan")
    with pytest.raises(FileNotFoundError, match=r"m\.plan\.json not found"):
        TrtTileRunner(tmp_path / "m.plan")


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the missing-package message cannot be seen")
def test_runner_without_tensorrt_says_how_to_install_it(tmp_path):
    from engines.trt.builder import TensorRTUnavailable

    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    sidecar_path(plan).write_text(
        json.dumps(
            {
                "format": "2dq-trt-plan",
                "version": 1,
                "plan_sha256": "0",
                "onnx": {},
                "tensorrt_version": "10.13.0",
                "gpu": {},
                "precision": "int8",
                "tile": 16,
                "scale": 2,
                "input": {},
                "output": {},
                "profile": {},
            }
        )
    )
    with pytest.raises(TensorRTUnavailable, match=r"pip install '2dq\[trt\]'"):
        TrtTileRunner(plan)


def write_qdq_sr(path, *, tile=16, scale=2, seed=0):
    """Tiny explicitly quantized SR net, as the trt-int8 export writes quantizers (ARCHITECTURE section 2):
    Clip -> QuantizeLinear(s, 0:int8) -> DequantizeLinear on the input, int8 weights -> DequantizeLinear,
    Conv 3x3 (3 -> 3 s^2) with a float bias, DepthToSpace(s): (N, 3, T, T) -> (N, 3, sT, sT)."""
    rng = np.random.default_rng(seed)
    out_ch = 3 * scale * scale
    inits = [
        numpy_helper.from_array(np.array(-128 * ACT_STEP, np.float32), "clip_lo"),
        numpy_helper.from_array(np.array(127 * ACT_STEP, np.float32), "clip_hi"),
        numpy_helper.from_array(np.array(ACT_STEP, np.float32), "act_step"),
        numpy_helper.from_array(np.array(WEIGHT_STEP, np.float32), "w_step"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(rng.integers(-127, 128, (out_ch, 3, 3, 3)).astype(np.int8), "w_codes"),
        numpy_helper.from_array(rng.normal(0, 0.1, out_ch).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Clip", ["input", "clip_lo", "clip_hi"], ["x_clip"], name="input_quantizer/Clip"),
        helper.make_node(
            "QuantizeLinear", ["x_clip", "act_step", "zero"], ["x_q"], name="input_quantizer/QuantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear", ["x_q", "act_step", "zero"], ["x_dq"], name="input_quantizer/DequantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear", ["w_codes", "w_step", "zero"], ["w_dq"], name="weight_quantizer/DequantizeLinear"
        ),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["feat"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("DepthToSpace", ["feat"], ["output"], blocksize=scale, mode="CRD", name="upsample"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_qdq_sr",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, tile, tile])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, scale * tile, scale * tile])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, hand_metadata(tile=tile, scale=scale, opset=13).to_props())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def ort_run(onnx_path, tiles: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["output"], {"input": tiles.numpy()})[0])


def test_tiny_qdq_model_is_the_fake_quant_network(tmp_path):
    """The fixture itself: ONNX Runtime on the QDQ graph equals the PyTorch fake-quant computation."""
    path = write_qdq_sr(tmp_path / "m.onnx")
    tiles = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2
    model = onnx.load(str(path))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    x_hat = torch.clamp(torch.round(tiles / ACT_STEP), -128, 127) * ACT_STEP
    weight = inits["w_codes"].float() * WEIGHT_STEP
    expected = torch.nn.functional.pixel_shuffle(torch.nn.functional.conv2d(x_hat, weight, inits["bias"], padding=1), 2)
    torch.testing.assert_close(ort_run(path, tiles), expected, atol=1e-5, rtol=0)


@pytest.mark.tensorrt
@NEEDS_TRT
def test_int8_plan_matches_onnx_runtime_and_splits_batches(tmp_path):
    from engines.trt.builder import TrtBuildOptions, build_engine
    from engines.trt.sidecar import read_sidecar
    from toolchain.files import sha256_file

    onnx_path = write_qdq_sr(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    result = build_engine(onnx_path, tmp_path / "m.plan", TrtBuildOptions(max_batch=2, timing_cache=str(cache)))
    assert result.plan.is_file() and cache.is_file() and result.sidecar == tmp_path / "m.plan.json"
    record = read_sidecar(result.plan)
    assert record["onnx"]["sha256"] == sha256_file(onnx_path) and record["precision"] == "int8"
    assert record["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 2}
    tiles = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with TrtTileRunner(result.plan, onnx_path=onnx_path) as run:
        assert (run.tile, run.scale, run.multiple, run.max_batch) == (16, 2, 1, 2)
        out = run(tiles)  # 5 tiles through a max-batch-2 profile: three engine calls
    reference = ort_run(onnx_path, tiles)
    assert out.shape == reference.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert (out - reference).abs().max().item() <= TRT_MAX_ABS_ERROR


@pytest.mark.tensorrt
@NEEDS_TRT
def test_plan_is_refused_for_another_onnx_and_upscales_like_onnx_runtime(tmp_path):
    from engines.trt.builder import TrtBuildOptions, build_engine
    from engines.trt.sidecar import PlanMismatchError
    from toolchain.backends import TiledUpscaler
    from toolchain.inference import TileSpec, tiled_upscale

    onnx_path, other = write_qdq_sr(tmp_path / "m.onnx"), write_qdq_sr(tmp_path / "other.onnx", seed=1)
    plan = build_engine(onnx_path, tmp_path / "m.plan", TrtBuildOptions(max_batch=4)).plan
    with pytest.raises(PlanMismatchError, match="the given ONNX has"):
        TrtTileRunner(plan, onnx_path=other)
    image = np.random.default_rng(3).random((20, 27, 3), dtype=np.float32)
    with TrtTileRunner(plan) as run:
        sr = TiledUpscaler(run, overlap=4, batch=3).upscale(image)
    lr = torch.from_numpy(image).permute(2, 0, 1)[None]
    reference = tiled_upscale(lambda t: ort_run(onnx_path, t), lr, 2, TileSpec(16, 4, 3), 1)[0].permute(1, 2, 0).numpy()
    assert sr.shape == (40, 54, 3)
    assert np.abs(sr - reference).max() <= TRT_MAX_ABS_ERROR
