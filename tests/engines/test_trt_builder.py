"""TensorRT plan building (engines/trt/builder.py).

Without TensorRT: the typing-mode decision per version string, option validation, precision checks
against the ONNX facts, parser-error messages, the CLI options (engines/trt/cli_args.py: flags become a
``TrtBuildOptions`` in one place, a bad flag is a usage error naming it, the library refuses parsed
flags), and the clear error when ``tensorrt`` is missing. The test marked ``tensorrt`` needs TensorRT and a
GPU and skips otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engines.trt.builder import (
    INSTALL_HINT,
    BuildMode,
    EngineBuildError,
    ParserErrorInfo,
    TensorRTUnavailable,
    TrtBuildOptions,
    build_engine,
    build_mode,
    check_precision,
    format_parser_errors,
    parse_trt_version,
    run_trt_build,
    trt_severity_level,
)
from engines.trt.cli_args import add_trt_arguments, trt_options_from_args
from engines.trt.sidecar import OnnxInfo, read_onnx_info
from toolchain.cli.common import UsageError

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.12.0.36", (10, 12, 0)),
        ("10.0.1.6", (10, 0, 1)),
        ("11.0.0", (11, 0, 0)),
        ("10.3", (10, 3, 0)),
        ("10.8.0.43.post1", (10, 8, 0)),
        ("10.13.0b2", (10, 13, 0)),
    ],
)
def test_parse_trt_version(text, expected):
    assert parse_trt_version(text) == expected


def test_unparsable_version_is_an_error():
    with pytest.raises(ValueError, match="cannot parse TensorRT version 'unknown'"):
        parse_trt_version("unknown")


STRONG_10 = BuildMode(True, "STRONGLY_TYPED", ())
STRONG_11 = BuildMode(True, None, ())


@pytest.mark.parametrize(
    "version, precision, float_dtype, expected",
    [
        # weak typing before 10.12: INT8 flag for Q/DQ, FP16 when the float body is fp16
        ("10.0.1.6", "int8", "float32", BuildMode(False, None, ("INT8",))),
        ("10.11.0.33", "int8", "float32", BuildMode(False, None, ("INT8",))),
        ("10.11.0.33", "int8", "float16", BuildMode(False, None, ("INT8", "FP16"))),
        ("10.8.0.43", "int4", "float16", BuildMode(False, None, ("INT8", "FP16"))),
        ("10.8.0.43", "fp16", "float32", BuildMode(False, None, ("FP16",))),
        # strongly typed from 10.12, no precision flags
        ("10.12.0.36", "int8", "float32", STRONG_10),
        ("10.12.0.36", "int8", "float16", STRONG_10),
        ("10.16.1.11", "int4", "float16", STRONG_10),
        ("10.16.1.11", "fp16", "float16", STRONG_10),
        # 11: always strongly typed, the creation flag is deprecated and not passed
        ("11.0.0.114", "int8", "float32", STRONG_11),
        ("11.4.1", "int4", "float16", STRONG_11),
    ],
)
def test_build_mode_per_version(version, precision, float_dtype, expected):
    assert build_mode(version, precision, float_dtype) == expected


def test_build_mode_refusals():
    with pytest.raises(EngineBuildError, match="needs TensorRT >= 10.0"):
        build_mode("8.6.1.6", "int8", "float32")
    with pytest.raises(EngineBuildError, match="export the fp16 float graph"):
        build_mode("10.12.0.36", "fp16", "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_mode("10.12.0.36", "int2", "float32")
    with pytest.raises(ValueError, match="float_dtype"):
        build_mode("10.12.0.36", "int8", "bfloat16")


def test_build_options_defaults_and_profile():
    options = TrtBuildOptions()
    assert options.batch_profile == {"min_batch": 1, "opt_batch": 8, "max_batch": 8}
    assert TrtBuildOptions(max_batch=16, opt_batch=4).batch_profile == {"min_batch": 1, "opt_batch": 4, "max_batch": 16}
    assert json.loads(json.dumps(options.to_dict()))["precision"] == "int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_batch = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"precision": "int16"}, "precision"),
        ({"tile": 0}, "tile"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
        ({"workspace_mb": 0}, "workspace_mb"),
        ({"builder_optimization_level": 6}, "builder_optimization_level"),
    ],
)
def test_build_options_are_validated(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        TrtBuildOptions(**kwargs)


def onnx_info(**changes) -> OnnxInfo:
    base = dict(
        path="m.onnx",
        sha256="0" * 64,
        input_name="input",
        output_name="output",
        input_dtype="float32",
        output_dtype="float32",
        float_dtype="float32",
        tile=64,
        scale=2,
        multiple=8,
        target="trt-int8",
        artifact_sha256=None,
        checkpoint_sha256=None,
        qdq_nodes=120,
        int4_initializers=0,
        nodes=(),
    )
    return OnnxInfo(**{**base, **changes})


def test_check_precision_accepts_matching_exports():
    check_precision(onnx_info(), "int8")
    check_precision(onnx_info(target="trt-int4", int4_initializers=48, float_dtype="float16"), "int4")
    check_precision(onnx_info(target=None, qdq_nodes=0), "fp16")


@pytest.mark.parametrize(
    "info, precision, phrase",
    [
        (onnx_info(qdq_nodes=0, target=None), "int8", "has no Q/DQ nodes"),
        (onnx_info(target="trt-int4", int4_initializers=48), "int8", "exported for target 'trt-int4'"),
        (onnx_info(target=None, int4_initializers=48), "int8", "build it with precision int4"),
        (onnx_info(target=None), "int4", "has no INT4 weights"),
        (onnx_info(target="trt-int8"), "int4", "exported for target 'trt-int8'"),
    ],
)
def test_check_precision_refuses_the_wrong_export(info, precision, phrase):
    with pytest.raises(EngineBuildError, match=phrase):
        check_precision(info, precision)


def test_check_precision_reads_the_exporters_own_files(built, loud_float_engine):
    """The same decisions on real exports read by ``read_onnx_info``: each export builds at its own precision
    and is refused at the other; the float graph (no Q/DQ) is refused at both integer precisions."""
    int8 = read_onnx_info(built(loud=True, w_bits=4, a_bits=4).onnx)
    int4 = read_onnx_info(built(float_dtype="fp16", loud=True, w_bits=4, a_bits=4, target="trt-int4",
                                weight_granularity="per-channel").onnx)
    float_graph = read_onnx_info(loud_float_engine.with_name("float.onnx"))
    assert (int8.target, int8.int4_initializers, int4.target, int4.float_dtype) == ("trt-int8", 0, "trt-int4", "float16")
    assert int4.int4_initializers > 0 and int8.qdq_nodes > 0 and float_graph.qdq_nodes == 0
    check_precision(int8, "int8")
    check_precision(int4, "int4")
    for info, precision, phrase in ((int8, "int4", "exported for target 'trt-int8'"),
                                    (int4, "int8", "exported for target 'trt-int4'"),
                                    (float_graph, "int8", "has no Q/DQ nodes"),
                                    (float_graph, "int4", "exported for target 'trt-int8'")):
        with pytest.raises(EngineBuildError, match=phrase):
            check_precision(info, precision)


def test_parser_errors_name_the_node_op_and_description():
    message = format_parser_errors(
        "m.onnx",
        [
            ParserErrorInfo(12, "/layers.0/attn/Foo", "Foo", "UNSUPPORTED_NODE", "No importer registered for op: Foo"),
            ParserErrorInfo(-1, "", "", "INVALID_GRAPH", "graph has no outputs"),
        ],
    )
    assert message.splitlines() == [
        "TensorRT could not parse m.onnx:",
        "  node 12 '/layers.0/attn/Foo' (Foo): UNSUPPORTED_NODE: No importer registered for op: Foo",
        "  graph: INVALID_GRAPH: graph has no outputs",
    ]


def test_trt_severities_map_to_logging_levels():
    import logging

    assert [trt_severity_level(s) for s in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")] == [
        logging.CRITICAL,
        logging.ERROR,
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
    ]


def test_cli_arguments_become_build_options():
    parser = argparse.ArgumentParser()
    add_trt_arguments(parser)
    args = parser.parse_args(
        [
            "--precision",
            "int4",
            "--tile",
            "64",
            "--max-batch",
            "16",
            "--opt-batch",
            "4",
            "--timing-cache",
            "cache.bin",
            "--workspace-mb",
            "2048",
            "--builder-opt-level",
            "5",
        ]
    )
    assert trt_options_from_args(args) == TrtBuildOptions(
        precision="int4",
        tile=64,
        max_batch=16,
        opt_batch=4,
        timing_cache="cache.bin",
        workspace_mb=2048,
        builder_optimization_level=5,
    )
    assert trt_options_from_args(parser.parse_args([])) == TrtBuildOptions()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tile", "0"], "--tile: tile must be positive, got 0"),
        (["--max-batch", "0"], "--max-batch: max_batch must be >= 1, got 0"),
        (["--max-batch", "4", "--opt-batch", "5"], r"--opt-batch: opt_batch must be in \[1, max_batch=4\], got 5"),
        (["--workspace-mb", "0"], "--workspace-mb: workspace_mb must be positive, got 0"),
        (["--builder-opt-level", "6"], r"--builder-opt-level: builder_optimization_level must be in \[0, 5\], got 6"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(argv, message):
    parser = argparse.ArgumentParser()
    add_trt_arguments(parser)
    with pytest.raises(UsageError, match=message):
        trt_options_from_args(parser.parse_args(argv))


def test_the_build_command_refuses_a_bad_flag_before_building(tmp_path, capsys):
    from engines.cli_build import main

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")  # never read: the flags are checked first
    assert main(["--backend", "trt", "--onnx", str(onnx), "--out", str(tmp_path / "m.plan"), "--max-batch", "0"]) == 2
    assert "--max-batch: max_batch must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "m.plan").exists()


def test_the_library_takes_build_options_not_parsed_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_trt_arguments(parser)
    args = parser.parse_args([])
    with pytest.raises(TypeError, match="options must be a TrtBuildOptions, got Namespace"):
        run_trt_build(args, tmp_path / "m.onnx", tmp_path / "m.plan")
    with pytest.raises(TypeError, match="options must be a TrtBuildOptions, got Namespace"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", args)
    assert not (tmp_path / "m.plan").exists()


def test_modules_import_without_tensorrt_or_pycuda():
    code = (
        "import sys; import engines.trt, engines.trt.builder, engines.trt.cli_args, engines.trt.runner, "
        "engines.trt.sidecar, engines.trt.trtexec, engines.trt.verify, engines.cli_profile; "
        "assert 'tensorrt' not in sys.modules and 'pycuda' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the missing-package message cannot be seen")
def test_build_without_tensorrt_says_how_to_install_it(tmp_path):
    with pytest.raises(TensorRTUnavailable, match=re.escape(f"`{INSTALL_HINT}`")):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", TrtBuildOptions())
    with pytest.raises(TensorRTUnavailable, match=re.escape(f"`{INSTALL_HINT}`")):
        run_trt_build(TrtBuildOptions(), tmp_path / "m.onnx", tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TENSORRT or not _cuda_available(), reason="needs the tensorrt package and a CUDA GPU")
def test_parser_error_names_the_failing_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["input"], ["output"], name="/body/frobnicate", domain="example.custom")
    # fp16 I/O so the fp16 build is valid on strongly typed TensorRT too; the custom op must fail parsing
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT16, ["N", 3, 16, 16])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(EngineBuildError, match=r"/body/frobnicate.*Frobnicate"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan", TrtBuildOptions(precision="fp16", tile=8))
    assert not (tmp_path / "bad.plan").exists()
