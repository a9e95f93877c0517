"""Pick an upscaler by backend name: the one place that knows every backend the command lines offer.

``2dq-eval`` and ``2dq-upscale`` name a backend (``torch``, ``ort``, ``openvino``, ``trt``,
``bicubic``) and files; :func:`make_upscaler` returns the :class:`toolchain.backends.Upscaler` for
them. This module sits at the top layer (it imports :mod:`calib` for fake-quant models and the
engine runners of this package), so :mod:`toolchain` keeps only the interfaces and stays below
everything it serves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from toolchain.backends import BicubicUpscaler, TiledUpscaler, TileSpec, TorchUpscaler, Upscaler

#: every backend name, engines first after PyTorch
BACKENDS = ("torch", "ort", "openvino", "trt", "bicubic")
#: the backends that run an engine file
ENGINE_BACKENDS = ("ort", "openvino", "trt")
#: engine file suffix -> backend (``.ort.onnx`` ends in ``.onnx``; an OpenVINO IR is its ``.xml``)
ENGINE_SUFFIXES = {".onnx": "ort", ".ort": "ort", ".xml": "openvino", ".plan": "trt", ".engine": "trt"}


def engine_backend(path: str) -> str:
    """The backend of an engine file, from its suffix.

    >>> engine_backend("runs/dat_light_x4_w4a4.ov.xml"), engine_backend("a.ORT"), engine_backend("a.plan")
    ('openvino', 'ort', 'trt')
    >>> engine_backend("model.bin")
    Traceback (most recent call last):
    ...
    ValueError: model.bin: unknown engine suffix; expected one of .onnx, .ort, .xml, .plan, .engine
    """
    backend = ENGINE_SUFFIXES.get(Path(path).suffix.lower())
    if backend is None:
        raise ValueError(f"{path}: unknown engine suffix; expected one of {', '.join(ENGINE_SUFFIXES)}")
    return backend


def make_upscaler(
    backend: str,
    *,
    weights: Optional[str] = None,
    calib: Optional[str] = None,
    engine: Optional[str] = None,
    scale: Optional[int] = None,
    device: str = "cpu",
    tile: Optional[int] = None,
    overlap: int = 16,
    batch: int = 4,
    threads: Optional[int] = None,
) -> Upscaler:
    """Build the upscaler for ``backend`` (one of :data:`BACKENDS`) from the files the user named.

    ``torch``: ``weights`` (and ``calib`` for the fake-quant model), optionally tiled with ``tile``.
    ``ort`` / ``openvino`` / ``trt``: an ``engine`` file (ONNX Runtime model, OpenVINO IR, TensorRT
    plan), always tiled; ``threads`` sets the CPU engines' threads (None: all cores). ``bicubic``:
    needs ``scale``.

    >>> make_upscaler("bicubic", scale=2).scale
    2
    >>> make_upscaler("ort")
    Traceback (most recent call last):
    ...
    ValueError: the ort backend needs an engine file
    """
    if backend == "bicubic":
        if scale is None:
            raise ValueError("the bicubic backend needs a scale")
        return BicubicUpscaler(scale)
    if backend == "torch":
        if weights is None:
            raise ValueError("the torch backend needs a checkpoint (weights)")
        if calib is not None:
            from calib.artifact import load_quantized_model

            model = load_quantized_model(weights, calib, device=device)
        else:
            from toolchain.loading import load_model

            model = load_model(weights)
        return TorchUpscaler(model, device, TileSpec(tile, overlap, batch) if tile else None)
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if engine is None:
        raise ValueError(f"the {backend} backend needs an engine file")
    if backend == "ort":
        from .ort_engine import OrtTileRunner

        runner = OrtTileRunner(engine, threads=threads)
    elif backend == "openvino":
        from .openvino_engine import OpenVinoTileRunner

        runner = OpenVinoTileRunner(engine, threads=threads, batch=batch)
    else:
        from .trt.runner import TrtTileRunner

        runner = TrtTileRunner(engine, device=device if device != "cpu" else "cuda")
    return TiledUpscaler(runner, overlap=overlap, batch=batch)
