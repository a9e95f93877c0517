"""What the tools use when a path is not given: the shipped model and data, and the ``runs/`` chain.

2dq ships (``toolchain/assets``, made by ``scripts/pack_defaults.py``; provenance in its README):
the official DAT-light x4 as a slim checkpoint (:data:`DEFAULT_WEIGHTS`), 28 training images as the
calibration set (:data:`DEFAULT_CALIB_IMAGES`) and Set5 with its MATLAB bicubic LR
(:data:`DEFAULT_DATA`). Each stage's default output is the next stage's default input::

    2dq-calibrate                 -> runs/dat_light_x4_w4a4.safetensors (+ .json)
    2dq-export --onnx             -> runs/dat_light_x4_w4a4.onnx
    2dq-build-engine --verify     -> runs/dat_light_x4_w4a4.ort.onnx
    2dq-eval --backend ort, 2dq-upscale IMAGE, 2dq-report read them
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "dat_light_x4.safetensors"
DEFAULT_CALIB_IMAGES = ASSETS / "calib"
#: a benchmark root holding ``Set5/HR`` and ``Set5/LR_bicubic/X{2,3,4}``
DEFAULT_DATA = ASSETS / "datasets"
DEFAULT_SETS = "Set5"
#: the benchmark sets of a data root given by hand (the team's ../shared/datasets layout)
BENCHMARK_SETS = "Set5,Set14,B100"
RUNS = Path("runs")
#: the method whose artifacts get the plain name (others add ``_<method>``)
PLAIN_METHOD = "dobi"

PathLike = Union[str, os.PathLike]


def artifact_path(weights: PathLike = DEFAULT_WEIGHTS, w_bits: int = 4, a_bits: int = 4,
                  method: str = PLAIN_METHOD) -> Path:
    """``runs/<checkpoint stem>_w<W>a<A>[_<method>].safetensors``.

    >>> artifact_path().as_posix()
    'runs/dat_light_x4_w4a4.safetensors'
    >>> artifact_path("models/x2.pth", 3, 3, "2dquant").as_posix()
    'runs/x2_w3a3_2dquant.safetensors'
    """
    suffix = "" if method == PLAIN_METHOD else f"_{method}"
    return RUNS / f"{Path(weights).stem}_w{w_bits}a{a_bits}{suffix}.safetensors"


def onnx_path(artifact: PathLike) -> Path:
    """The export of an artifact: the same name with ``.onnx``.

    >>> onnx_path("runs/dat_light_x4_w4a4.safetensors").as_posix()
    'runs/dat_light_x4_w4a4.onnx'
    """
    return Path(artifact).with_suffix(".onnx")


def float_onnx_path(weights: PathLike = DEFAULT_WEIGHTS, float_dtype: str = "fp32") -> Path:
    """The float export of a checkpoint (``2dq-export --float``): ``runs/<checkpoint stem>_<float dtype>.onnx``.

    >>> float_onnx_path().as_posix()
    'runs/dat_light_x4_fp32.onnx'
    """
    return RUNS / f"{Path(weights).stem}_{float_dtype}.onnx"


#: the file name an engine of each CPU backend gets beside its export (an OpenVINO IR's weights go to .ov.bin)
ENGINE_SUFFIXES = {"ort": ".ort.onnx", "openvino": ".ov.xml"}


def engine_path(onnx: PathLike, backend: str = "ort") -> Path:
    """The engine ``backend`` builds from an export by default: ``<stem>.ort.onnx`` / ``<stem>.ov.xml``.

    >>> engine_path("runs/dat_light_x4_w4a4.onnx").as_posix()
    'runs/dat_light_x4_w4a4.ort.onnx'
    >>> engine_path("runs/dat_light_x4_w4a4.onnx", "openvino").as_posix()
    'runs/dat_light_x4_w4a4.ov.xml'
    """
    if backend not in ENGINE_SUFFIXES:
        raise ValueError(f"no default engine file for backend {backend!r}; expected one of {', '.join(ENGINE_SUFFIXES)}")
    onnx = Path(onnx)
    return onnx.with_name(onnx.stem + ENGINE_SUFFIXES[backend])


def artifact_of_onnx(onnx: PathLike) -> Path:
    """The artifact an export of the default chain came from (its name with ``.safetensors``)."""
    return Path(onnx).with_suffix(".safetensors")


def sets_for(data: Optional[PathLike]) -> str:
    """The default ``--sets``: the shipped Set5 without ``--data``, the three benchmark sets with it."""
    return DEFAULT_SETS if data is None else BENCHMARK_SETS


def existing(path: PathLike, option: str, how: Optional[str] = None) -> Path:
    """``path`` if it exists; else a usage error (exit 2) naming the option, its default and how to make it."""
    from .cli.common import UsageError

    path = Path(path)
    if not path.exists():
        hint = f" ({how})" if how else ""
        raise UsageError(f"{option}: the default {path} does not exist{hint}; pass {option}")
    return path


#: the default chain's files (what the tools write and read when no path is given)
MAIN_ARTIFACT = artifact_path()
MAIN_ONNX = onnx_path(MAIN_ARTIFACT)
MAIN_ENGINE = engine_path(MAIN_ONNX)
