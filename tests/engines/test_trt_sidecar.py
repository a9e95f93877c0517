"""Plan sidecar and ONNX facts (engines/trt/sidecar.py): runs without TensorRT or a GPU.

The ONNX files are real (built with onnx.helper: a 1x1 convolution and a DepthToSpace, the shape of
an SR network); the mismatch checks are pure functions over the sidecar dict.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.trt.sidecar import (
    GpuInfo,
    PlanMismatchError,
    check_plan,
    make_sidecar,
    read_onnx_info,
    read_sidecar,
    resolve_tile,
    sidecar_path,
    validate_plan,
    validate_source,
    write_sidecar,
)
from export.metadata import key
from toolchain.files import sha256_file

from ..export.conftest import hand_metadata

ARTIFACT = "a" * 64
CHECKPOINT = "c" * 64


def write_sr_onnx(path, *, tile=8, scale=2, fixed=True, metadata=None, fp16_cast=False):
    """A tiny real SR graph: input (N,3,T,T) -> Conv 1x1 (3 -> 3s^2) -> DepthToSpace(s) -> (N,3,sT,sT).

    ``metadata``: an :class:`ExportMetadata` (written through its ``to_props``) or raw ``{key: value}`` props.
    """
    weight = numpy_helper.from_array(
        np.random.default_rng(0).random((3 * scale * scale, 3, 1, 1), dtype=np.float32), "w"
    )
    nodes = [helper.make_node("Conv", ["input", "w"], ["feat"], name="conv")]
    if fp16_cast:
        nodes += [
            helper.make_node("Cast", ["feat"], ["feat16"], to=TensorProto.FLOAT16, name="to_fp16"),
            helper.make_node("Cast", ["feat16"], ["feat32"], to=TensorProto.FLOAT, name="to_fp32"),
        ]
    nodes.append(
        helper.make_node("DepthToSpace", [nodes[-1].output[0]], ["output"], blocksize=scale, mode="CRD", name="shuffle")
    )
    in_shape = ["N", 3, tile, tile] if fixed else ["N", 3, "H", "W"]
    out_shape = ["N", 3, scale * tile, scale * tile] if fixed else ["N", 3, "sH", "sW"]
    graph = helper.make_graph(
        nodes,
        "sr",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        props = metadata.to_props() if hasattr(metadata, "to_props") else metadata
        helper.set_model_props(model, {k: str(v) for k, v in props.items()})
    onnx.save(model, str(path))
    return path


def test_reads_tile_scale_names_and_hashes_from_metadata_and_dims(tmp_path):
    path = write_sr_onnx(
        tmp_path / "m.onnx",
        tile=8,
        scale=2,
        metadata=hand_metadata(tile=8, scale=2, multiple=4, artifact_sha256=ARTIFACT, checkpoint_sha256=CHECKPOINT),
    )
    info = read_onnx_info(path)
    assert info.export == hand_metadata(tile=8, scale=2, multiple=4)
    assert (info.tile, info.scale, info.multiple, info.target) == (8, 2, 4, "trt-int8")
    assert (info.input_name, info.output_name, info.input_dtype, info.output_dtype) == (
        "input",
        "output",
        "float32",
        "float32",
    )
    assert (info.artifact_sha256, info.checkpoint_sha256) == (ARTIFACT, CHECKPOINT)
    assert info.sha256 == sha256_file(path)
    assert info.float_dtype == "float32" and info.qdq_nodes == 0 and info.int4_initializers == 0
    assert info.nodes == (("conv", "Conv"), ("shuffle", "DepthToSpace"))


def test_falls_back_to_the_input_dims_without_metadata(tmp_path):
    info = read_onnx_info(write_sr_onnx(tmp_path / "m.onnx", tile=16, scale=3))
    assert (info.tile, info.scale, info.multiple) == (16, 3, 1)
    assert info.artifact_sha256 is None and info.target is None


def test_free_size_input_takes_tile_and_scale_from_metadata(tmp_path):
    info = read_onnx_info(write_sr_onnx(tmp_path / "m.onnx", fixed=False, metadata=hand_metadata(tile=8, scale=4)))
    assert (info.tile, info.scale) == (8, 4)
    assert resolve_tile(info, None) == resolve_tile(info, 8) == (8, 4)
    bare = read_onnx_info(write_sr_onnx(tmp_path / "bare.onnx", fixed=False))
    assert (bare.tile, bare.scale, bare.export) == (None, None, None)
    with pytest.raises(ValueError, match="scale is unknown"):
        resolve_tile(bare, 48)


def test_metadata_that_contradicts_the_dims_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="2dq.tile=16 but the input dims say 8"):
        read_onnx_info(write_sr_onnx(tmp_path / "a.onnx", tile=8, metadata=hand_metadata(tile=16)))
    with pytest.raises(ValueError, match="2dq.scale=3 but the I/O dims say 2"):
        read_onnx_info(write_sr_onnx(tmp_path / "b.onnx", scale=2, metadata=hand_metadata(scale=3)))
    with pytest.raises(ValueError, match=r"c\.onnx: metadata 2dq\.tile='eight' is not a positive integer"):
        bad = {**hand_metadata().to_props(), key("tile"): "eight"}
        read_onnx_info(write_sr_onnx(tmp_path / "c.onnx", metadata=bad))
    with pytest.raises(ValueError, match="2dq.float_dtype=fp16 but the graph computes in float32"):
        read_onnx_info(write_sr_onnx(tmp_path / "d.onnx", metadata=hand_metadata(float_dtype="fp16")))
    with pytest.raises(ValueError, match="2dq.batch=4 but the input's batch dim is dynamic"):
        read_onnx_info(write_sr_onnx(tmp_path / "e.onnx", metadata=hand_metadata(batch=4)))


def test_partial_2dq_metadata_is_refused_naming_the_missing_key(tmp_path):
    """A graph with some 2dq keys is a 2dq export with a key missing, not a foreign graph: refused."""
    props = hand_metadata().to_props()
    del props[key("multiple")]
    with pytest.raises(ValueError, match=r"p\.onnx: metadata 2dq\.multiple missing"):
        read_onnx_info(write_sr_onnx(tmp_path / "p.onnx", metadata=props))


def test_fp16_metadata_on_an_fp16_graph_is_read(tmp_path):
    path = write_sr_onnx(tmp_path / "m.onnx", fp16_cast=True, metadata=hand_metadata(float_dtype="fp16"))
    info = read_onnx_info(path)
    assert (info.float_dtype, info.export.float_dtype) == ("float16", "fp16")


def test_resolve_tile_refuses_another_tile_or_a_tile_off_the_multiple(tmp_path):
    info = read_onnx_info(write_sr_onnx(tmp_path / "m.onnx", tile=8))
    assert resolve_tile(info, None) == (8, 2)
    with pytest.raises(ValueError, match="exported for tile 8, but tile 16"):
        resolve_tile(info, 16)
    free = read_onnx_info(write_sr_onnx(tmp_path / "f.onnx", fixed=False, tile=16, metadata=hand_metadata(
        tile=16, multiple=8)))
    with pytest.raises(ValueError, match="exported for tile 16, but tile 12"):
        resolve_tile(free, 12)


def test_an_fp16_cast_inside_marks_the_float_graph_fp16(tmp_path):
    assert read_onnx_info(write_sr_onnx(tmp_path / "m.onnx", fp16_cast=True)).float_dtype == "float16"


def test_missing_onnx_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        read_onnx_info(tmp_path / "nope.onnx")


H200 = GpuInfo("NVIDIA H200", "9.0")


def make_record(tmp_path, plan_bytes=b"plan bytes"):
    onnx_path = write_sr_onnx(
        tmp_path / "m.onnx", metadata=hand_metadata(artifact_sha256=ARTIFACT, checkpoint_sha256=CHECKPOINT)
    )
    plan = tmp_path / "m.plan"
    plan.write_bytes(plan_bytes)
    record = make_sidecar(
        read_onnx_info(onnx_path),
        plan_sha256=sha256_file(plan),
        tensorrt_version="10.13.0.35",
        gpu=H200,
        precision="int8",
        build_mode={"strongly_typed": True, "network_flag": "STRONGLY_TYPED", "builder_flags": []},
        build_options={"precision": "int8", "max_batch": 8},
        tile=8,
        scale=2,
        profile={"min_batch": 1, "opt_batch": 8, "max_batch": 8},
        io_dtypes={"input": "float32", "output": "float32"},
    )
    return onnx_path, plan, record


def test_sidecar_round_trips_beside_the_plan(tmp_path):
    onnx_path, plan, record = make_record(tmp_path)
    path = write_sidecar(plan, record)
    assert path == sidecar_path(plan) == tmp_path / "m.plan.json"
    assert read_sidecar(plan) == json.loads(json.dumps(record))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    assert record["onnx"]["sha256"] == sha256_file(onnx_path)
    assert (record["artifact_sha256"], record["checkpoint_sha256"]) == (ARTIFACT, CHECKPOINT)
    assert (record["float_dtype"], record["multiple"]) == ("fp32", 1)  # the export's, from its metadata
    assert record["input"] == {"name": "input", "shape": ["N", 3, 8, 8], "dtype": "float32"}
    assert record["output"]["shape"] == ["N", 3, 16, 16]


def test_matching_plan_passes_every_check(tmp_path):
    onnx_path, plan, record = make_record(tmp_path)
    assert (
        check_plan(
            record,
            gpu=H200,
            tensorrt_version="10.13.0.35",
            onnx_sha256=sha256_file(onnx_path),
            plan_sha256=sha256_file(plan),
        )
        == []
    )


@pytest.mark.parametrize(
    "checks, phrase",
    [
        (
            {"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "9.0")},
            "built on GPU 'NVIDIA H200', this GPU is 'NVIDIA A100-SXM4-80GB'",
        ),
        ({"gpu": GpuInfo("NVIDIA H200", "8.0")}, "built for compute capability 9.0, this GPU has 8.0"),
        ({"tensorrt_version": "10.14.1.48"}, "built with TensorRT 10.13.0.35, TensorRT 10.14.1.48 is installed"),
        ({"onnx_sha256": "0" * 64}, "the given ONNX has " + "0" * 64),
        ({"plan_sha256": "1" * 64}, "plan replaced or corrupt"),
    ],
)
def test_each_mismatch_is_reported_and_refused(tmp_path, checks, phrase):
    _, plan, record = make_record(tmp_path)
    args = {"gpu": H200, "tensorrt_version": "10.13.0.35", **checks}
    problems = check_plan(record, **args)
    assert len(problems) == 1 and phrase in problems[0]
    with pytest.raises(PlanMismatchError, match="refusing to run .*m.plan") as err:
        validate_plan(plan, record, **args)
    assert "rebuild it on this machine" in str(err.value)


def test_a_plan_of_another_onnx_is_refused_without_tensorrt(tmp_path):
    onnx_path, plan, record = make_record(tmp_path)
    validate_source(plan, record, sha256_file(onnx_path))
    with pytest.raises(PlanMismatchError, match="refusing to run .*m.plan: .*the given ONNX has " + "0" * 64):
        validate_source(plan, record, "0" * 64)


def test_all_mismatches_are_listed_together(tmp_path):
    _, _, record = make_record(tmp_path)
    problems = check_plan(record, gpu=GpuInfo("Tesla T4", "7.5"), tensorrt_version="11.0.0", onnx_sha256="f" * 64)
    assert len(problems) == 4


def test_unreadable_sidecars_are_clear_errors(tmp_path):
    _, plan, record = make_record(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"m\.plan\.json not found"):
        read_sidecar(plan)
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a 2dq plan sidecar"):
        read_sidecar(plan)
    partial = {k: v for k, v in record.items() if k not in ("gpu", "tile")}
    sidecar_path(plan).write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="lacks gpu, tile"):
        read_sidecar(plan)
