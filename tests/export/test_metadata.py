"""The ``2dq.*`` ONNX metadata schema (export/metadata.py): one record written by the exporter and read
back the same by every consumer (the schema itself, the ORT runner, the TensorRT sidecar's ONNX reader,
the lint); a missing or malformed key is refused naming the file and the key."""
from __future__ import annotations

import dataclasses
import re

import onnx
import pytest

from engines.ort_engine import OrtTileRunner, build_ort_engine
from engines.trt.sidecar import GpuInfo, make_sidecar, read_onnx_info
from export.lint import lint_model
from export.metadata import ENGINE_PREFIX, KEY_PREFIX, ExportMetadata, key
from export.onnx_export import ExportOptions, export_onnx

from .conftest import hand_metadata

#: every field the exporter always writes (``batch`` may be absent: old exports, read as dynamic)
ALWAYS_WRITTEN = [f.name for f in dataclasses.fields(ExportMetadata) if f.name not in ("batch", "int4_block")]

#: export variants: (quant config fields, export options besides the tile)
VARIANTS = {
    "int8-fp32-dynamic": (dict(w_bits=4, a_bits=4), {}),
    "int8-fp16": (dict(w_bits=4, a_bits=4), dict(float_dtype="fp16")),
    "int8-static-batch": (dict(w_bits=4, a_bits=4), dict(batch=3)),
    "int4-fp16": (dict(w_bits=4, a_bits=8, target="trt-int4", weight_granularity="per-channel"), {}),
}


@pytest.fixture(scope="module")
def exports(calibrated, tmp_path_factory, export_tile):
    """Factory ``exports(variant)``: ``(variant, calibrated, onnx path, ORT engine path)`` of one real
    export of the tiny model (cached per variant)."""
    cache = {}

    def make(variant: str):
        if variant not in cache:
            fields, options = VARIANTS[variant]
            made = calibrated(**fields)
            folder = tmp_path_factory.mktemp(variant)
            path = folder / "model.onnx"
            export_onnx(made.checkpoint, made.artifact, path, ExportOptions(tile=export_tile, **options))
            engine = folder / "model.ort.onnx"
            build_ort_engine(path, engine, threads=1)
            cache[variant] = variant, made, path, engine
        return cache[variant]

    return make


@pytest.fixture(params=sorted(VARIANTS))
def exported(request, exports):
    return exports(request.param)


def test_every_consumer_reads_the_same_facts(exported, export_tile):
    variant, made, path, engine = exported
    meta = ExportMetadata.read(path)
    fields, options = VARIANTS[variant]
    expected_dtype = options.get("float_dtype", "fp16" if fields.get("target") == "trt-int4" else "fp32")
    assert (meta.tile, meta.scale, meta.multiple) == (export_tile, 2, 1)
    assert (meta.float_dtype, meta.batch) == (expected_dtype, options.get("batch"))
    assert meta.int4_block == (64 if fields.get("target") == "trt-int4" else None)
    assert meta.target == fields.get("target", "trt-int8") and meta.opset == 21

    # the ORT engine keeps the export's record (and adds 2dq.engine.*, which the schema ignores)
    runner = OrtTileRunner(engine, threads=1)
    assert runner.export == meta and any(k.startswith(ENGINE_PREFIX) for k in runner.metadata)
    assert (runner.tile, runner.scale, runner.multiple, runner.static_batch) == (
        meta.tile, meta.scale, meta.multiple, meta.batch)

    # the TensorRT sidecar's ONNX reader: the record, the graph's own view, and what a sidecar copies
    info = read_onnx_info(path)
    assert info.export == meta
    assert (info.tile, info.scale, info.multiple, info.target) == (meta.tile, meta.scale, meta.multiple, meta.target)
    assert (info.artifact_sha256, info.checkpoint_sha256) == (meta.artifact_sha256, meta.checkpoint_sha256)
    assert info.float_dtype == {"fp32": "float32", "fp16": "float16"}[meta.float_dtype]  # the graph agrees
    record = make_sidecar(info, plan_sha256="0" * 64, tensorrt_version="10.13.0.35", gpu=GpuInfo("NVIDIA H200", "9.0"),
                          precision="int4" if meta.target == "trt-int4" else "int8",
                          build_mode={"strongly_typed": True, "network_flag": "STRONGLY_TYPED", "builder_flags": []},
                          build_options={}, tile=meta.tile, scale=meta.scale, profile={"max_batch": 4},
                          io_dtypes={"input": info.input_dtype, "output": info.output_dtype})
    assert (record["float_dtype"], record["multiple"], record["tile"], record["scale"]) == (
        meta.float_dtype, meta.multiple, meta.tile, meta.scale)

    # the lint takes the target from the record: an int4 graph is clean as trt-int4 only
    assert lint_model(path) == []
    if meta.target == "trt-int4":
        assert any(v.rule == "quant-type" for v in lint_model(path, target="trt-int8"))


def test_written_and_read_records_round_trip(exported):
    _, _, path, _ = exported
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert all(k.startswith(KEY_PREFIX) for k in props)
    meta = ExportMetadata.from_props(props, path)
    assert meta.to_props() == props and ExportMetadata.of_model(model, path) == meta


@pytest.mark.parametrize("name", ALWAYS_WRITTEN)
def test_a_real_export_missing_one_key_is_refused_by_every_consumer(exports, tmp_path, name):
    _, _, path, _ = exports("int8-fp32-dynamic")
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != key(name)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    message = rf"broken\.onnx: metadata {key(name)} missing"
    with pytest.raises(ValueError, match=message):
        ExportMetadata.read(broken)
    with pytest.raises(ValueError, match=message):
        read_onnx_info(broken)
    with pytest.raises(ValueError, match=message):
        lint_model(broken)
    with pytest.raises(ValueError, match=message):
        OrtTileRunner(broken, threads=1)
    with pytest.raises(ValueError, match=message):
        build_ort_engine(broken, tmp_path / "broken.ort.onnx")


def test_int4_block_is_required_for_trt_int4_only():
    int4 = hand_metadata(target="trt-int4", float_dtype="fp16", int4_block=128)
    assert int4.to_props()[key("int4_block")] == "128" and key("int4_block") not in hand_metadata().to_props()
    props = int4.to_props()
    del props[key("int4_block")]
    with pytest.raises(ValueError, match=r"m\.onnx: metadata 2dq\.int4_block is written exactly for target trt-int4"):
        ExportMetadata.from_props(props, "m.onnx")
    with pytest.raises(ValueError, match="2dq.int4_block is written exactly for target trt-int4"):
        hand_metadata(int4_block=64)


@pytest.mark.parametrize("name, text, phrase", [
    ("tile", "eight", "2dq.tile='eight' is not a positive integer"),
    ("scale", "0", "2dq.scale must be a positive integer, got 0"),
    ("multiple", "-4", "2dq.multiple='-4' is not a positive integer"),
    ("tile", "12", "2dq.tile=12 is not a multiple of 2dq.multiple=8"),
    ("float_dtype", "bf16", "2dq.float_dtype must be one of ('fp32', 'fp16'), got 'bf16'"),
    ("target", "trt-fp8", "2dq.target must be one of"),
    ("batch", "many", "2dq.batch='many' is not a positive integer"),
    ("checkpoint_sha256", "abc", "2dq.checkpoint_sha256 must be 64 lowercase hex digits"),
    ("artifact_sha256", "A" * 64, "2dq.artifact_sha256 must be 64 lowercase hex digits"),
    ("quant_config", "{not json", "2dq.quant_config is not valid JSON"),
    ("model_config", "[1, 2]", "2dq.model_config must be a JSON object, got list"),
    ("arch", "", "2dq.arch must be a non-empty string"),
])
def test_malformed_values_are_refused_naming_the_file_and_key(name, text, phrase):
    props = {**hand_metadata(tile=16, multiple=8).to_props(), key(name): text}
    with pytest.raises(ValueError, match="^" + re.escape("m.onnx: metadata " + phrase)):
        ExportMetadata.from_props(props, "m.onnx")


def test_batch_key_is_optional_and_defaults_to_dynamic():
    """Exports written before ``2dq.batch`` existed were all dynamic: the missing key reads as None."""
    props = hand_metadata(batch=3).to_props()
    assert ExportMetadata.from_props(props, "m.onnx").batch == 3
    del props[key("batch")]
    assert ExportMetadata.from_props(props, "m.onnx").batch is None


def test_find_tells_a_foreign_graph_from_a_partial_export():
    assert ExportMetadata.find({}, "m.onnx") is None
    assert ExportMetadata.find({ENGINE_PREFIX + "level": "extended", "producer": "x"}, "m.onnx") is None
    assert ExportMetadata.find(hand_metadata().to_props(), "m.onnx") == hand_metadata()
    with pytest.raises(ValueError, match=r"m\.onnx: metadata 2dq\.arch missing"):
        ExportMetadata.find({key("scale"): "2"}, "m.onnx")


def test_the_opset_must_be_the_graphs(exports):
    _, _, path, _ = exports("int8-fp32-dynamic")
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == key("opset"):
            prop.value = "20"
    with pytest.raises(ValueError, match=r"m\.onnx: metadata 2dq\.opset=20 but the graph imports opset 21"):
        ExportMetadata.of_model(model, "m.onnx")
    assert [str(v) for v in lint_model(model) if v.rule == "opset"] == [
        "[opset] <model>: metadata 2dq.opset=20 but the graph imports opset 21"]


def test_unknown_fields_are_not_keys():
    with pytest.raises(KeyError, match="'input_multiple' is not a 2dq metadata field"):
        key("input_multiple")


def test_in_memory_and_missing_artifacts_are_recorded_as_such():
    for marker in ("in-memory", ""):
        meta = hand_metadata(artifact_sha256=marker)
        assert ExportMetadata.from_props(meta.to_props(), "m.onnx").artifact_sha256 == marker
