"""Polygraphy cross-check command (engines/trt/verify.py), validated by the installed Polygraphy's own
``polygraphy run`` argument parser (no TensorRT needed to parse; running it needs TensorRT and a GPU)."""

from __future__ import annotations

import pytest

from engines.trt.verify import polygraphy_compare_command


def parse_with_polygraphy(cmd):
    from polygraphy.tools.run import Run

    assert cmd[:2] == ["polygraphy", "run"]
    return Run().setup_parser().parse_args(cmd[2:])


def test_strongly_typed_command_parses_with_polygraphy():
    cmd = polygraphy_compare_command(
        "m.onnx", tile=64, batch=2, max_batch=8, atol=0.01, workspace_mb=2048, save_engine="m.plan"
    )
    assert cmd == [
        "polygraphy",
        "run",
        "m.onnx",
        "--trt",
        "--onnxrt",
        "--input-shapes",
        "input:[2,3,64,64]",
        "--trt-min-shapes",
        "input:[1,3,64,64]",
        "--trt-opt-shapes",
        "input:[2,3,64,64]",
        "--trt-max-shapes",
        "input:[8,3,64,64]",
        "--val-range",
        "input:[0,1]",
        "--seed",
        "0",
        "--iterations",
        "1",
        "--strongly-typed",
        "--pool-limit",
        "workspace:2048M",
        "--save-engine",
        "m.plan",
        "--check-error-stat",
        "median",
        "--atol",
        "0.01",
        "--rtol",
        "0",
    ]
    args = parse_with_polygraphy(cmd)
    assert args.strongly_typed and args.model_file == "m.onnx"


def test_flag_path_and_psnr_commands_parse_with_polygraphy():
    weak = polygraphy_compare_command(
        "m.onnx", tile=32, strongly_typed=False, builder_flags=("INT8", "FP16"), psnr_threshold_db=50
    )
    assert "--int8" in weak and "--fp16" in weak and "--strongly-typed" not in weak
    assert weak[-4:] == ["--compare", "psnr", "--psnr-threshold", "50"]
    args = parse_with_polygraphy(weak)
    assert args.int8 and args.fp16 and not args.strongly_typed


def test_strongly_typed_command_takes_no_precision_flags():
    with pytest.raises(ValueError, match="no precision flags"):
        polygraphy_compare_command("m.onnx", tile=64, builder_flags=("INT8",))
