"""Cross-check a QDQ ONNX model on TensorRT against ONNX Runtime with Polygraphy.

This is a debugging aid beside the project's own verification (``engines/compare.py``: PSNR and
identical-8-bit-pixel share between the TensorRT plan's upscaled images and the fake-quant
reference): Polygraphy builds its own engine from the ONNX file, feeds the same random tiles to
TensorRT and ONNX Runtime and compares the outputs tensor by tensor, which localizes a disagreement
before any image is involved.

- :func:`polygraphy_compare_command`: the ``polygraphy run model.onnx --trt --onnxrt ...`` command
  line. A QDQ graph needs no calibration: on a strongly typed TensorRT (>= 10.12, 11) the command
  passes ``--strongly-typed``; on older 10.x it passes the builder flags of
  :func:`engines.trt.builder.build_mode` (``--int8``, ``--fp16``).
- :func:`polygraphy_compare`: the same through Polygraphy's Python API
  (``Comparator.run`` with ``TrtRunner`` and ``OnnxrtRunner``, then ``Comparator.compare_accuracy``).

Flags and signatures checked against the installed Polygraphy 0.53.6 (``polygraphy run --help``,
``NetworkFromOnnxPath(path, strongly_typed=...)``, ``CreateConfig(int8=, fp16=, ...)``,
``Comparator.run(runners, data_loader=...)``, ``Comparator.compare_accuracy(run_results, compare_func=...)``,
``DataLoader(seed=, iterations=, val_range=)``) and the Polygraphy API reference
(https://docs.nvidia.com/deeplearning/tensorrt/10.9.0/_static/polygraphy/comparator/toc.html).
``--compare psnr`` / ``--psnr-threshold`` need a Polygraphy new enough to have the ``psnr`` comparison.
Not run against a real TensorRT here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from toolchain.extras import import_extra
from toolchain.tolerances import TRT_ORT_MEDIAN_ATOL


def polygraphy_compare_command(
    onnx: str | os.PathLike,
    *,
    tile: int,
    batch: int = 1,
    max_batch: int | None = None,
    input_name: str = "input",
    strongly_typed: bool = True,
    builder_flags: Sequence[str] = (),
    seed: int = 0,
    iterations: int = 1,
    atol: float | None = None,
    psnr_threshold_db: float | None = None,
    workspace_mb: int | None = None,
    save_engine: str | os.PathLike | None = None,
) -> list[str]:
    """``polygraphy run`` comparing TensorRT with ONNX Runtime on random tiles in ``[0, 1]``.

    ``strongly_typed``/``builder_flags`` as returned by :func:`engines.trt.builder.build_mode`.
    ``atol``: absolute tolerance on the median error (Polygraphy's simple comparison); ``psnr_threshold_db``:
    use Polygraphy's PSNR comparison instead.
    """
    if strongly_typed and builder_flags:
        raise ValueError("a strongly typed network takes no precision flags")
    if batch < 1 or tile < 1:
        raise ValueError(f"batch and tile must be positive, got batch={batch}, tile={tile}")
    max_batch = max(max_batch or batch, batch)
    shape = lambda n: f"{input_name}:[{n},3,{tile},{tile}]"  # noqa: E731
    cmd = [
        "polygraphy",
        "run",
        str(onnx),
        "--trt",
        "--onnxrt",
        "--input-shapes",
        shape(batch),
        "--trt-min-shapes",
        shape(1),
        "--trt-opt-shapes",
        shape(batch),
        "--trt-max-shapes",
        shape(max_batch),
        "--val-range",
        f"{input_name}:[0,1]",
        "--seed",
        str(seed),
        "--iterations",
        str(iterations),
    ]
    cmd += ["--strongly-typed"] if strongly_typed else [f"--{flag.lower()}" for flag in builder_flags]
    if workspace_mb is not None:
        cmd += ["--pool-limit", f"workspace:{workspace_mb}M"]
    if save_engine is not None:
        cmd += ["--save-engine", str(save_engine)]
    if psnr_threshold_db is not None:
        cmd += ["--compare", "psnr", "--psnr-threshold", str(psnr_threshold_db)]
    elif atol is not None:
        cmd += ["--check-error-stat", "median", "--atol", str(atol), "--rtol", "0"]
    return cmd


def polygraphy_compare(
    onnx: str | os.PathLike,
    *,
    tile: int,
    batch: int = 1,
    input_name: str = "input",
    input_dtype: str = "float32",
    strongly_typed: bool = True,
    builder_flags: Sequence[str] = (),
    atol: float = TRT_ORT_MEDIAN_ATOL,
    seed: int = 0,
) -> Any:
    """Run the comparison in-process; returns Polygraphy's ``AccuracyResult`` (truthy when it passed).

    One batch of seeded uniform tiles in ``[0, 1)`` goes through a TensorRT engine Polygraphy builds
    from ``onnx`` and through ONNX Runtime; the median absolute error must stay within ``atol``.

    Example (needs TensorRT and a CUDA GPU, so the doctests do not run it)::

        ok = polygraphy_compare("swinir_x2_w4a4.onnx", tile=64, batch=2)
    """
    import numpy as np

    import_extra("polygraphy", "polygraphy", "engines.trt.verify.polygraphy_compare")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from .builder import import_tensorrt

    import_tensorrt()  # our install hint instead of Polygraphy's message when TensorRT is missing
    if strongly_typed and builder_flags:
        raise ValueError("a strongly typed network takes no precision flags")
    dims = lambda n: (n, 3, tile, tile)  # noqa: E731
    profile = Profile().add(input_name, min=dims(1), opt=dims(batch), max=dims(batch))
    flags = {flag.lower(): True for flag in builder_flags}
    network = NetworkFromOnnxPath(str(onnx), strongly_typed=strongly_typed)
    engine = EngineFromNetwork(network, config=CreateConfig(profiles=[profile], **flags))
    runners = [TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(str(onnx)))]
    tiles = np.random.default_rng(seed).random(dims(batch), dtype=np.float32).astype(input_dtype)
    results = Comparator.run(runners, data_loader=[{input_name: tiles}])
    compare = CompareFunc.simple(atol=atol, rtol=0.0, check_error_stat="median")
    return Comparator.compare_accuracy(results, compare_func=compare)
