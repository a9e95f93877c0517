"""``2dq-build-engine --verify --backend trt`` without TensorRT: the plan is checked against ``--onnx``,
and the floor follows the export's float dtype (from its metadata, copied into the plan's sidecar),
not the build precision. Sidecars are made by the real build path's functions from real exports."""
from __future__ import annotations

import importlib.util

import pytest

from engines.cli_build import THRESHOLDS, _runner, build_parser, plan_float_dtype
from engines.trt.builder import TensorRTUnavailable, build_mode
from engines.trt.sidecar import GpuInfo, PlanMismatchError, make_sidecar, read_onnx_info, write_sidecar
from toolchain.files import sha256_file

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
#: TensorRT versions on either side of strong typing (10.12): builder flags vs strongly typed networks
WEAK, STRONG = "10.8.0.43", "10.13.0.35"


def sidecar_of(onnx_path, trt_version: str, precision: str) -> dict:
    """The sidecar ``build_engine`` writes for ``onnx_path`` (everything but the plan itself)."""
    info = read_onnx_info(onnx_path)
    return make_sidecar(info, plan_sha256="0" * 64, tensorrt_version=trt_version, gpu=GpuInfo("NVIDIA H200", "9.0"),
                        precision=precision, build_mode=build_mode(trt_version, precision, info.float_dtype).to_dict(),
                        build_options={"precision": precision}, tile=info.tile, scale=info.scale,
                        profile={"min_batch": 1, "opt_batch": 4, "max_batch": 4},
                        io_dtypes={"input": info.input_dtype, "output": info.output_dtype})


def verify_args(onnx_path, plan):
    return build_parser().parse_args(["--backend", "trt", "--onnx", str(onnx_path), "--out", str(plan), "--verify"])


def test_an_int8_plan_of_an_fp16_export_is_held_to_the_fp16_floor(built):
    fp16, fp32 = built(float_dtype="fp16", w_bits=4, a_bits=4), built(float_dtype="fp32", w_bits=4, a_bits=4)
    record = sidecar_of(fp16.onnx, STRONG, "int8")
    assert record["float_dtype"] == "fp16" and record["build_mode"]["builder_flags"] == []
    assert plan_float_dtype(record, fp16.onnx) == "fp16"  # was "fp32": guessed from precision int8
    assert THRESHOLDS[("trt", plan_float_dtype(record, fp16.onnx))][0] == 45.0
    assert plan_float_dtype(sidecar_of(fp32.onnx, STRONG, "int8"), fp32.onnx) == "fp32"
    # a sidecar written before it carried the export's dtype: read from the ONNX the plan came from
    old = {k: v for k, v in record.items() if k != "float_dtype"}
    assert plan_float_dtype(old, fp16.onnx) == "fp16"


def test_weak_typing_with_the_fp16_flag_is_held_to_the_fp16_floor(built):
    fp32 = built(float_dtype="fp32", w_bits=4, a_bits=4)
    assert plan_float_dtype(sidecar_of(fp32.onnx, WEAK, "int8"), fp32.onnx) == "fp32"  # flags INT8 only
    fp16_flag = sidecar_of(fp32.onnx, WEAK, "fp16")
    assert fp16_flag["float_dtype"] == "fp32" and "FP16" in fp16_flag["build_mode"]["builder_flags"]
    assert plan_float_dtype(fp16_flag, fp32.onnx) == "fp16"


def test_verify_refuses_a_plan_built_from_another_onnx(built, tmp_path):
    """``_runner`` hands ``--onnx`` to the TensorRT runner, which compares it with the plan's sidecar
    before it needs TensorRT (without ``onnx_path`` the hash check never ran)."""
    source, other = built(float_dtype="fp32", w_bits=4, a_bits=4), built(float_dtype="fp16", w_bits=4, a_bits=4)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not read before the ONNX check")
    write_sidecar(plan, sidecar_of(source.onnx, STRONG, "int8"))
    with pytest.raises(PlanMismatchError, match=f"model.plan: .*the given ONNX has {sha256_file(other.onnx)}"):
        _runner(verify_args(other.onnx, plan))


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here: the runner would go on to load the plan")
def test_verify_with_the_plans_own_onnx_gets_past_the_check(built, tmp_path):
    source = built(float_dtype="fp32", w_bits=4, a_bits=4)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not read before the ONNX check")
    write_sidecar(plan, sidecar_of(source.onnx, STRONG, "int8"))
    with pytest.raises(TensorRTUnavailable):
        _runner(verify_args(source.onnx, plan))
