"""The ``2dq.*`` ONNX metadata schema: what an export says about itself, written and read in one place.

The exporter (:mod:`export.onnx_export`) writes one :class:`ExportMetadata` as the graph's
``metadata_props``; every reader (the ORT engine and runner, the TensorRT sidecar, ``2dq-build-engine``,
the lint) reads it back through :meth:`ExportMetadata.from_props` / :meth:`ExportMetadata.read`, which
refuse a missing key or a value of the wrong form with a ``ValueError`` naming the file and the key.
The key strings are ``KEY_PREFIX + field name`` and are spelled in this module only.

Keys (all strings in the ONNX file):

- ``arch``: spandrel architecture id (``"SwinIR"``, ``"DAT"``); ``model_config``: its hyper-parameters
  (JSON object).
- ``scale``: upscaling factor; ``tile``: LR tile side ``T`` the graph is traced for (input
  ``(N, 3, T, T)``, output ``(N, 3, sT, sT)``); ``multiple``: the model's input multiple (LR sides
  must be multiples of it; ``tile`` is one).
- ``batch``: tiles per call of a static-batch graph, or ``"dynamic"``. Optional: exports written
  before the key existed are all dynamic, so a missing key reads as dynamic (``None``).
- ``target``: ``trt-int8`` / ``trt-int4`` / ``ort``; ``float_dtype``: ``fp32`` / ``fp16``, the dtype
  of the float layers; ``opset``: the default-domain opset (checked against the graph by
  :meth:`ExportMetadata.of_model`); ``int4_block``: the int4 weight block size, present exactly when
  the target is ``trt-int4``.
- ``checkpoint_sha256``: SHA-256 of the float checkpoint; ``artifact_sha256``: SHA-256 of the
  calibration artifact, :data:`IN_MEMORY` for a model exported from memory by the Python API, or
  ``""`` for none (a float model); ``quant_config``: ``QuantConfig.to_dict()`` (JSON object).

Other ``2dq.*`` keys are ignored (an ORT engine adds ``2dq.engine.*``, :data:`ENGINE_PREFIX`).

>>> meta = ExportMetadata(arch="DAT", scale=4, tile=64, multiple=1, target="trt-int8", float_dtype="fp32",
...                       opset=21, checkpoint_sha256="0" * 64, artifact_sha256=IN_MEMORY,
...                       quant_config={"w_bits": 4}, model_config={})
>>> props = meta.to_props()
>>> props["2dq.tile"], props["2dq.scale"]
('64', '4')
>>> ExportMetadata.from_props(props, "w4a4.onnx") == meta   # what every consumer reads back
True
>>> ExportMetadata.from_props({k: v for k, v in props.items() if k != "2dq.tile"}, "w4a4.onnx")
Traceback (most recent call last):
ValueError: w4a4.onnx: metadata 2dq.tile ...
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from toolchain.quant.config import TARGETS

KEY_PREFIX = "2dq."
#: keys an ORT engine adds to the export's (:mod:`engines.ort_engine`)
ENGINE_PREFIX = KEY_PREFIX + "engine."
FLOAT_DTYPES = ("fp32", "fp16")
#: ``batch`` of a graph that runs any number of tiles
DYNAMIC = "dynamic"
#: ``artifact_sha256`` of a model exported from memory by :func:`export.api.export_onnx`
IN_MEMORY = "in-memory"
#: the target whose graphs carry int4 weight blocks (and the ``int4_block`` key)
INT4_TARGET = "trt-int4"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ExportMetadata:
    """Everything a 2dq QDQ export records about itself (see the module docstring for each key).

    ``quant_config`` / ``model_config`` are stored as their JSON round trip (tuples become lists),
    so a written and a read-back record compare equal.
    """

    arch: str
    scale: int
    tile: int
    multiple: int
    target: str
    float_dtype: str
    opset: int
    checkpoint_sha256: str
    artifact_sha256: str
    quant_config: dict[str, Any]
    model_config: dict[str, Any]
    #: tiles per call of a static-batch graph; None: dynamic
    batch: Optional[int] = None
    #: int4 weight block size; set exactly when ``target`` is ``trt-int4``
    int4_block: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"metadata {key('arch')} must be a non-empty string, got {self.arch!r}")
        for name in ("scale", "tile", "multiple", "opset"):
            _check_positive(name, getattr(self, name))
        for name in ("batch", "int4_block"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.tile % self.multiple:
            raise ValueError(f"metadata {key('tile')}={self.tile} is not a multiple of {key('multiple')}="
                             f"{self.multiple}")
        if self.target not in TARGETS:
            raise ValueError(f"metadata {key('target')} must be one of {TARGETS}, got {self.target!r}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"metadata {key('float_dtype')} must be one of {FLOAT_DTYPES}, got {self.float_dtype!r}")
        if (self.int4_block is not None) != (self.target == INT4_TARGET):
            raise ValueError(f"metadata {key('int4_block')} is written exactly for target {INT4_TARGET}; got "
                             f"{key('int4_block')}={self.int4_block} with {key('target')}={self.target}")
        if not isinstance(self.checkpoint_sha256, str) or not _SHA256.fullmatch(self.checkpoint_sha256):
            raise ValueError(f"metadata {key('checkpoint_sha256')} must be 64 lowercase hex digits, "
                             f"got {self.checkpoint_sha256!r}")
        if not isinstance(self.artifact_sha256, str) or not (
                _SHA256.fullmatch(self.artifact_sha256) or self.artifact_sha256 in (IN_MEMORY, "")):
            raise ValueError(f"metadata {key('artifact_sha256')} must be 64 lowercase hex digits, {IN_MEMORY!r} or "
                             f"empty, got {self.artifact_sha256!r}")
        for name in ("quant_config", "model_config"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"metadata {key(name)} must be a JSON object, got {type(value).__name__}")
            try:
                object.__setattr__(self, name, json.loads(json.dumps(dict(value), sort_keys=True)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"metadata {key(name)} is not JSON-serializable: {err}") from None

    def to_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props``: ``{"2dq.<field>": text}`` (``int4_block`` only for ``trt-int4``)."""
        text: dict[str, str] = {
            "checkpoint_sha256": self.checkpoint_sha256,
            "artifact_sha256": self.artifact_sha256,
            "quant_config": json.dumps(self.quant_config, sort_keys=True),
            "tile": str(self.tile),
            "scale": str(self.scale),
            "multiple": str(self.multiple),
            "target": self.target,
            "float_dtype": self.float_dtype,
            "arch": self.arch,
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "opset": str(self.opset),
        }
        if self.int4_block is not None:
            text["int4_block"] = str(self.int4_block)
        text["batch"] = DYNAMIC if self.batch is None else str(self.batch)
        return {key(name): value for name, value in text.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], where: str | os.PathLike) -> "ExportMetadata":
        """Parse and validate ``metadata_props`` (``{key: text}``); ``where`` names the file in errors.

        Raises ``ValueError`` ("``<where>``: metadata 2dq.<key> ...") for a missing key or a bad value.
        """
        def text(name: str) -> str:
            if key(name) not in props:
                raise ValueError(f"{where}: metadata {key(name)} missing (not a 2dq export, or one from another "
                                 "version of 2dq: re-export it with 2dq-export)")
            value = props[key(name)]
            if not isinstance(value, str):
                raise ValueError(f"{where}: metadata {key(name)} must be a string, got {type(value).__name__}")
            return value

        def integer(name: str) -> int:
            value = text(name)
            if not _DIGITS.fullmatch(value):
                raise ValueError(f"{where}: metadata {key(name)}={value!r} is not a positive integer")
            return int(value)

        def json_object(name: str) -> Any:
            value = text(name)
            try:
                return json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: metadata {key(name)} is not valid JSON ({err})") from None

        fields: dict[str, Any] = {name: text(name) for name in ("arch", "target", "float_dtype", "checkpoint_sha256",
                                                                "artifact_sha256")}
        fields.update({name: integer(name) for name in ("scale", "tile", "multiple", "opset")})
        fields.update({name: json_object(name) for name in ("quant_config", "model_config")})
        # a missing batch key is an export from before static batches existed: dynamic
        batch = props.get(key("batch"), DYNAMIC)
        fields["batch"] = None if batch == DYNAMIC else integer("batch")
        fields["int4_block"] = integer("int4_block") if key("int4_block") in props else None
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def find(cls, props: Mapping[str, str], where: str | os.PathLike) -> Optional["ExportMetadata"]:
        """:meth:`from_props` for graphs that may not be 2dq exports at all: None when no schema key is
        present (a foreign ONNX), the validated record otherwise (a partial one is refused)."""
        if not any(key(field.name) in props for field in dataclasses.fields(cls)):
            return None
        return cls.from_props(props, where)

    @classmethod
    def of_model(cls, model: Any, where: str | os.PathLike = "model") -> "ExportMetadata":
        """The record of an ``onnx.ModelProto``, its ``opset`` checked against the graph's default-domain opset."""
        meta = cls.from_props({p.key: p.value for p in model.metadata_props}, where)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset != meta.opset:
            raise ValueError(f"{where}: metadata {key('opset')}={meta.opset} but the graph imports opset {opset}")
        return meta

    @classmethod
    def read(cls, onnx_path: str | os.PathLike) -> "ExportMetadata":
        """The record of the ONNX file ``onnx_path`` (weights stored beside it are not loaded)."""
        import onnx
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(str(onnx_path), load_external_data=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"ONNX model not found: {onnx_path}") from None
        except DecodeError as err:
            raise ValueError(f"{onnx_path}: not an ONNX model ({err})") from None
        return cls.of_model(model, onnx_path)


def key(name: str) -> str:
    """The ONNX metadata key of the :class:`ExportMetadata` field ``name`` (``"tile"`` -> ``"2dq.tile"``)."""
    if name not in _FIELDS:
        raise KeyError(f"{name!r} is not a 2dq metadata field; fields: {', '.join(_FIELDS)}")
    return KEY_PREFIX + name


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"metadata {key(name)} must be a positive integer, got {value!r}")


_FIELDS = tuple(field.name for field in dataclasses.fields(ExportMetadata))
