"""Agreement of an engine with the PyTorch fake-quant reference on real images (ARCHITECTURE.md s. 7).

Both sides upscale the same LR images through the same tiling (the reference is a
:class:`~toolchain.backends.TorchUpscaler` with the engine's tile, overlap and batch), so the
comparison is like for like. Measured per image and pooled over all images:

- ``psnr_vs_reference``: PSNR (dB) between the two outputs clamped to [0, 1] (data range 1), from
  the mean squared difference over every pixel of every image;
- ``identical_pixels``: share of identical uint8 values (``round(clip(x) * 255)``, every channel);
- ``max_abs_error``: largest absolute difference of the raw float outputs.

All three come from :func:`toolchain.metrics.output_difference`, the statistics every comparison uses.
Used by the ONNX Runtime and TensorRT backends alike (``2dq-build-engine --verify``). The same check
is offered through Polygraphy's comparator (:func:`polygraphy_compare`): ONNX Runtime runs the
engine on the tiles, the reference outputs are loaded into Polygraphy's ``RunResults`` as a second
runner, and ``SimpleCompareFunc`` requires the 99th percentile of the absolute error to stay
below half a uint8 level.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from toolchain.backends import Upscaler, to_batch
from toolchain.data.io import to_uint8
from toolchain.extras import import_extra
from toolchain.inference import TileSpec, pad_symmetric, round_up, tile_starts
from toolchain.metrics import output_difference, psnr_from_mse, psnr_y, ssim_y
from toolchain.tolerances import (
    POLYGRAPHY_ATOL,
    POLYGRAPHY_QUANTILE,
    TASK_NOISE_FACTOR,
    TASK_PSNR_TOLERANCE,
    TASK_SSIM_TOLERANCE,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageAgreement:
    """Agreement on one image; ``squared_error`` and ``values`` let images be pooled."""

    name: str
    psnr: float
    identical_pixels: float
    max_abs_error: float
    squared_error: float = field(repr=False)
    identical: int = field(repr=False)
    values: int = field(repr=False)
    #: with HR: PSNR-Y / SSIM-Y (crop = scale) of the engine's and the reference's outputs
    task: dict[str, float] | None = None


@dataclass(frozen=True)
class Agreement:
    """Pooled agreement over images, with the per-image figures."""

    psnr_vs_reference: float
    identical_pixels: float
    max_abs_error: float
    min_image_psnr: float
    images: tuple[ImageAgreement, ...]

    def passes(self, min_psnr: float, min_identical: float) -> bool:
        return self.psnr_vs_reference >= min_psnr and self.identical_pixels >= min_identical

    @property
    def task(self) -> dict[str, float] | None:
        """Mean PSNR-Y / SSIM-Y against HR of engine and reference over the images, and their differences
        (None when the images had no HR)."""
        rows = [i.task for i in self.images]
        if not rows or any(r is None for r in rows):
            return None
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        return {**mean, "psnr_difference": mean["engine_psnr"] - mean["reference_psnr"],
                "ssim_difference": mean["engine_ssim"] - mean["reference_ssim"]}

    def task_passes(self, psnr_tolerance: float = TASK_PSNR_TOLERANCE,
                    ssim_tolerance: float = TASK_SSIM_TOLERANCE) -> bool:
        task = self.task
        if task is None:
            raise ValueError("the task check needs HR images (benchmark_images)")
        return abs(task["psnr_difference"]) <= psnr_tolerance and abs(task["ssim_difference"]) <= ssim_tolerance

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an infinite PSNR, identical outputs, is written as the string ``"inf"``)."""
        images = [{"name": i.name, "psnr": _finite(i.psnr), "identical_pixels": i.identical_pixels,
                   "max_abs_error": i.max_abs_error, **({"task": i.task} if i.task else {})} for i in self.images]
        out = {"psnr_vs_reference": _finite(self.psnr_vs_reference), "identical_pixels": self.identical_pixels,
               "max_abs_error": self.max_abs_error, "min_image_psnr": _finite(self.min_image_psnr),
               "images": images}
        if self.task is not None:
            out["task"] = self.task
        return out


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def compare_images(name: str, engine: np.ndarray, reference: np.ndarray, hr: np.ndarray | None = None,
                   scale: int = 0) -> ImageAgreement:
    """Agreement of two SR outputs ``(H, W, 3)`` float (not clamped); with ``hr`` (mod-cropped, float
    [0, 1]) also both outputs' PSNR-Y / SSIM-Y against it (crop = ``scale``)."""
    if engine.shape != reference.shape:
        raise ValueError(f"{name}: engine output {engine.shape} and reference {reference.shape} differ in shape")
    difference = output_difference(engine, reference)
    task = None
    if hr is not None:
        engine8, reference8, hr8 = to_uint8(engine), to_uint8(reference), to_uint8(hr)
        task = {"engine_psnr": psnr_y(engine8, hr8, scale), "reference_psnr": psnr_y(reference8, hr8, scale),
                "engine_ssim": ssim_y(engine8, hr8, scale), "reference_ssim": ssim_y(reference8, hr8, scale)}
    return ImageAgreement(name, difference.psnr, difference.identical_pixels, difference.max_abs_error,
                          difference.squared_error, difference.identical, difference.values, task)


def pool(images: Sequence[ImageAgreement]) -> Agreement:
    """Pool per-image agreements (every pixel of every image weighs the same)."""
    if not images:
        raise ValueError("no images to compare")
    squared = sum(i.squared_error for i in images)
    values = sum(i.values for i in images)
    return Agreement(psnr_from_mse(squared / values, 1.0), sum(i.identical for i in images) / values,
                     max(i.max_abs_error for i in images), min(i.psnr for i in images), tuple(images))


def compare_upscalers(engine: Upscaler, reference: Upscaler, images: Iterable[tuple],
                      progress: bool = False) -> Agreement:
    """Upscale each ``(name, lr)`` or ``(name, lr, hr)`` (``(h, w, 3)`` float [0, 1]) with both and pool
    the agreement (with HR: the task metrics too)."""
    results = []
    for name, lr, *hr in tqdm(list(images), desc="compare", unit="img", disable=not progress, leave=False):
        results.append(compare_images(name, engine.upscale(lr), reference.upscale(lr), hr[0] if hr else None,
                                      int(engine.scale)))
        log.debug("%s: %.2f dB, %.4f identical", name, results[-1].psnr, results[-1].identical_pixels)
    return pool(results)


def benchmark_lr_images(data_root: str | os.PathLike, sets: Sequence[str], scale: int) -> list[tuple[str, np.ndarray]]:
    """``("<set>/<name>", lr)`` for every LR image of ``sets`` at ``scale``."""
    from toolchain.data.benchmark import benchmark_pairs
    from toolchain.data.io import read_image

    return [(f"{set_name}/{pair.name}", read_image(pair.lr_path))
            for set_name in sets for pair in benchmark_pairs(data_root, set_name, scale)]


def benchmark_images(data_root: str | os.PathLike, sets: Sequence[str], scale: int
                     ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``("<set>/<name>", lr, hr)`` for every pair of ``sets`` at ``scale`` (HR mod-cropped)."""
    from toolchain.data.benchmark import benchmark_pairs, load_pair

    return [(f"{set_name}/{pair.name}", *load_pair(pair))
            for set_name in sets for pair in benchmark_pairs(data_root, set_name, scale)]


@dataclass(frozen=True)
class Verdict:
    """The verification criterion (ARCHITECTURE.md s. 7) applied to one engine.

    Passes when the engine's PSNR against the fake-quant reference reaches
    ``floor = min(fixed floor, noise floor - margin)`` and its task PSNR/SSIM against HR equal the
    reference's within the tolerances.
    """

    agreement: Agreement
    fixed_floor: float
    noise_floor: float | None
    margin: float
    min_identical: float = 0.0
    #: RMS of the reference's own task (PSNR, SSIM) differences over the noise draws (None: not measured)
    task_noise: tuple[float, float] | None = None

    @property
    def task_tolerance(self) -> tuple[float, float]:
        """(PSNR dB, SSIM): the fixed tolerances, or :data:`TASK_NOISE_FACTOR` times the reference's own
        spread under noise where that is larger (the task twin of the noise floor)."""
        if self.task_noise is None:
            return TASK_PSNR_TOLERANCE, TASK_SSIM_TOLERANCE
        return (max(TASK_PSNR_TOLERANCE, TASK_NOISE_FACTOR * self.task_noise[0]),
                max(TASK_SSIM_TOLERANCE, TASK_NOISE_FACTOR * self.task_noise[1]))

    @property
    def floor(self) -> float:
        if self.noise_floor is None:
            return self.fixed_floor
        return min(self.fixed_floor, self.noise_floor - self.margin)

    @property
    def psnr_passes(self) -> bool:
        return self.agreement.psnr_vs_reference >= self.floor and self.agreement.identical_pixels >= self.min_identical

    @property
    def task_passes(self) -> bool:
        return self.agreement.task_passes(*self.task_tolerance)

    @property
    def passed(self) -> bool:
        return self.psnr_passes and self.task_passes

    def summary(self) -> str:
        task = self.agreement.task
        floor = (f"floor {self.floor:.2f} dB = min({self.fixed_floor:g}, noise floor {self.noise_floor:.2f} - "
                 f"{self.margin:g})" if self.noise_floor is not None else f"floor {self.floor:g} dB")
        return (f"engine vs reference {agreement_summary(self.agreement)}; {floor} -> "
                f"{'ok' if self.psnr_passes else 'BELOW'}; task PSNR engine {task['engine_psnr']:.3f} / reference "
                f"{task['reference_psnr']:.3f} dB ({task['psnr_difference']:+.3f}), SSIM {task['engine_ssim']:.4f} / "
                f"{task['reference_ssim']:.4f} ({task['ssim_difference']:+.5f}), tolerance "
                f"{self.task_tolerance[0]:.3f} dB / {self.task_tolerance[1]:.5f} -> "
                f"{'ok' if self.task_passes else 'DIFFERS'}; {'PASS' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict[str, Any]:
        return {**self.agreement.to_dict(), "fixed_floor": self.fixed_floor, "noise_floor": self.noise_floor,
                "floor_margin": self.margin, "floor": self.floor, "min_identical": self.min_identical,
                "psnr_passed": self.psnr_passes, "task_passed": self.task_passes,
                "task_tolerance": {"psnr": self.task_tolerance[0], "ssim": self.task_tolerance[1]},
                "task_noise_rms": None if self.task_noise is None else {"psnr": self.task_noise[0],
                                                                       "ssim": self.task_noise[1]},
                "passed": self.passed}


def cut_tiles(lr: np.ndarray, tile: int, multiple: int, overlap: int = 16) -> torch.Tensor:
    """The tiles :func:`toolchain.inference.tiled_upscale` feeds a backend for ``lr``: ``(n, 3, tile, tile)``."""
    image = to_batch(lr)
    _, _, h, w = image.shape
    ph, pw = max(round_up(h, multiple), tile), max(round_up(w, multiple), tile)
    padded = pad_symmetric(image, ph, pw)
    return torch.cat([padded[..., r:r + tile, c:c + tile] for r in tile_starts(ph, tile, overlap)
                      for c in tile_starts(pw, tile, overlap)])


def polygraphy_compare(engine_path: str | os.PathLike, reference: Callable[[torch.Tensor], torch.Tensor],
                       tiles: Sequence[torch.Tensor], atol: float = POLYGRAPHY_ATOL,
                       quantile: float = POLYGRAPHY_QUANTILE) -> tuple[bool, list[dict[str, float]]]:
    """Compare an ORT engine with reference outputs through Polygraphy's comparator.

    ``reference`` maps a batch of tiles ``(N, 3, T, T)`` to outputs (e.g. the fake-quant model);
    ``tiles`` are the batches to run. Returns whether every batch passes (``quantile`` of the
    absolute error <= ``atol``) and, per batch, the max / mean / quantile absolute error.

    >>> import tempfile, calib
    >>> from export import export_onnx
    >>> from toolchain.models.examples import tiny_swinir
    >>> tiles = torch.rand(4, 3, 16, 16)
    >>> qmodel = calib.quantize(tiny_swinir(), forward_loop=lambda m: m(tiles))
    >>> folder = tempfile.TemporaryDirectory()
    >>> onnx_path = os.path.join(folder.name, "w4a4.onnx")
    >>> _ = export_onnx(qmodel, onnx_path, tile=16)
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):   # Polygraphy logs its steps on stdout
    ...     ok, stats = polygraphy_compare(onnx_path, qmodel, [tiles])   # the export runs as an ORT engine
    >>> ok, sorted(stats[0])
    (True, ['max_abs_error', 'mean_abs_error', 'q0.99_abs_error'])
    >>> folder.cleanup()
    """
    import_extra("polygraphy", "polygraphy", "polygraphy_compare (2dq-build-engine --verify --polygraphy)")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    feeds = [{"input": np.ascontiguousarray(batch.numpy(), dtype=np.float32)} for batch in tiles]
    runner = OnnxrtRunner(SessionFromOnnx(str(engine_path), providers=["CPUExecutionProvider"]), name="onnxrt-engine")
    results = Comparator.run([runner], data_loader=feeds)
    with torch.inference_mode():
        outputs = [reference(batch).to("cpu", torch.float32).numpy() for batch in tiles]
    name = "fake-quant-torch"
    results.append((name, [IterationResult(outputs={"output": out}, runner_name=name) for out in outputs]))
    compare = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="quantile", error_quantile=quantile)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    stats = []
    for engine_iter, ref_out in zip(results[0][1], outputs):
        difference = output_difference(engine_iter["output"], ref_out, quantiles=(quantile,))
        stats.append({"max_abs_error": difference.max_abs_error, "mean_abs_error": difference.mean_abs_error,
                      f"q{quantile:g}_abs_error": difference.abs_error_quantiles[quantile]})
    return bool(accuracy), stats


def agreement_summary(agreement: Agreement) -> str:
    """One line for humans."""
    return (f"PSNR vs reference {agreement.psnr_vs_reference:.2f} dB (worst image {agreement.min_image_psnr:.2f}), "
            f"identical uint8 pixels {100 * agreement.identical_pixels:.3f}%, max abs error {agreement.max_abs_error:.3g}"
            f" over {len(agreement.images)} images")



def check_provenance(metadata: Mapping[str, Any], weights: str | os.PathLike, calib: str | os.PathLike | None,
                     where: str = "engine") -> None:
    """Refuse an engine built from another checkpoint or artifact than ``weights`` / ``calib``.

    ``metadata`` holds ``checkpoint_sha256`` and ``artifact_sha256`` (the export's ``2dq.*`` metadata
    without the prefix, or a TensorRT plan's sidecar). ``calib`` None: the engine of a float export
    (``2dq-export --float``), which must record no artifact.
    """
    from toolchain.files import check_sha256

    if calib is None and metadata.get("artifact_sha256"):
        raise ValueError(f"{where} is a quantized export (it records an artifact): give its --calib")
    for key, path in (("checkpoint_sha256", weights), ("artifact_sha256", calib)):
        if path is None:
            continue
        expected = metadata.get(key)
        if not expected:
            raise ValueError(f"{where} does not record {key}; cannot tell which model it belongs to")
        check_sha256(path, expected, f"{where} was built from another file (its {key})")


def reference_model(weights: str | os.PathLike, calib: str | os.PathLike | None, device: str = "cpu") -> nn.Module:
    """What an engine is verified against: the fake-quant model of ``weights`` + ``calib``, or the float model of
    ``weights`` for the engine of a float export (``calib`` None)."""
    from calib.artifact import load_quantized_model
    from toolchain.loading import load_model

    return load_model(weights, device=device) if calib is None else load_quantized_model(weights, calib, device=device)


def reference_upscaler(weights: str | os.PathLike, calib: str | os.PathLike | None, tile: int, *,
                       overlap: int = 16, batch: int = 4, device: str = "cpu") -> Upscaler:
    """:func:`reference_model` run in ``tile`` tiles, each image computed once (:class:`Remembered`: the engine
    comparison and every noise draw share its outputs)."""
    from toolchain.backends import TorchUpscaler

    model = reference_model(weights, calib, device)
    return Remembered(TorchUpscaler(model, device, TileSpec(tile, overlap, batch)))


class Remembered:
    """An upscaler that computes each image once, keyed by the image array itself."""

    def __init__(self, upscaler: Upscaler) -> None:
        self.upscaler, self.scale, self._outputs = upscaler, upscaler.scale, {}

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        key = id(lr)
        if key not in self._outputs:
            self._outputs[key] = (lr, self.upscaler.upscale(lr))  # holding lr keeps its id unique
        return self._outputs[key][1]


def verify_engine(runner: Any, weights: str | os.PathLike, calib: str | os.PathLike | None,
                  images: Sequence[tuple[str, np.ndarray]], *, overlap: int = 16, batch: int = 4,
                  device: str = "cpu", progress: bool = False, reference: Upscaler | None = None) -> Agreement:
    """Agreement of a tile runner with the fake-quant model of ``weights`` + ``calib`` (None: the float model) on
    ``images``.

    The reference runs the same tiles (``runner.tile``, ``overlap``, ``batch``) on ``device``; pass
    ``reference`` (:func:`reference_upscaler`) to share it with :func:`engines.noise.noise_floor`.
    """
    from toolchain.backends import TiledUpscaler

    if reference is None:
        reference = reference_upscaler(weights, calib, runner.tile, overlap=overlap, batch=batch, device=device)
    if int(reference.scale) != int(runner.scale):
        raise ValueError(f"the engine upscales x{runner.scale}, the model of {weights} x{reference.scale}")
    engine = TiledUpscaler(runner, overlap=overlap, batch=batch)
    return compare_upscalers(engine, reference, images, progress)
