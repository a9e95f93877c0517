"""Visual crops: the region of a test image where the models' outputs differ most.

Candidate windows of ``size x size`` HR pixels lie on a grid of stride ``size // 4`` (plus the
last position on each axis), at least ``border`` pixels from the image edge (the metric's crop
border). A window's score is the mean, over its pixels, of the variance of the luma (Y, BT.601)
across the SR models' outputs (float and every quantized model; bicubic and HR are left out, so
the crop shows where quantization changed the output, not where any SR beats bicubic). With one
quantized model this is a quarter of its squared error against the float output.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.data.io import write_image
from toolchain.metrics import rgb_to_y

#: HR side of a crop, reduced for small images
CROP_SIZE = 96
#: colour of the rectangle marking the crop on the overview image
MARK = np.array([255, 0, 0], dtype=np.uint8)


@dataclass(frozen=True)
class Window:
    """A square crop ``[top:top+size, left:left+size]`` and its score (mean luma variance, Y units^2)."""

    top: int
    left: int
    size: int
    score: float

    def take(self, image: np.ndarray) -> np.ndarray:
        return image[self.top:self.top + self.size, self.left:self.left + self.size]


def _positions(length: int, size: int, stride: int, border: int) -> list[int]:
    start, stop = border, length - border - size
    if stop < start:  # the image is too small for the border: use the whole extent
        start, stop = 0, max(length - size, 0)
    positions = list(range(start, stop + 1, stride))
    if positions[-1] != stop:
        positions.append(stop)
    return positions


def best_window(outputs: Sequence[np.ndarray], size: int, border: int = 0, stride: int | None = None) -> Window:
    """The window where ``outputs`` (uint8 ``(H, W, 3)`` each, two or more) disagree most.

    Ties keep the first window in row-major order.
    """
    if len(outputs) < 2:
        raise ValueError(f"best_window needs at least two outputs to compare, got {len(outputs)}")
    shapes = {o.shape for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"outputs differ in shape: {sorted(shapes)}")
    height, width = outputs[0].shape[:2]
    size = min(size, height, width)
    stride = stride or max(size // 4, 1)
    variance = np.stack([rgb_to_y(o) for o in outputs]).var(axis=0)
    # integral image: the sum over any window in four lookups
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = variance.cumsum(0).cumsum(1)
    tops = np.array(_positions(height, size, stride, border))[:, None]
    lefts = np.array(_positions(width, size, stride, border))[None, :]
    sums = (integral[tops + size, lefts + size] - integral[tops, lefts + size]
            - integral[tops + size, lefts] + integral[tops, lefts])
    row, col = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return Window(int(tops[row, 0]), int(lefts[0, col]), size, float(sums[row, col]) / (size * size))


def overview(image: np.ndarray, window: Window, max_side: int = 200) -> np.ndarray:
    """``image`` (uint8 HxWx3) reduced to at most ``max_side`` pixels, with the window outlined."""
    step = max(1, int(np.ceil(max(image.shape[:2]) / max_side)))
    small = image[::step, ::step].copy()
    top, left = window.top // step, window.left // step
    bottom = min((window.top + window.size) // step, small.shape[0] - 1)
    right = min((window.left + window.size) // step, small.shape[1] - 1)
    for thick in range(2):
        small[top + thick, left:right + 1] = MARK
        small[bottom - thick, left:right + 1] = MARK
        small[top:bottom + 1, left + thick] = MARK
        small[top:bottom + 1, right - thick] = MARK
    return small


def write_crops(folder: Path, stem: str, window: Window, images: dict[str, np.ndarray],
                hr: np.ndarray) -> dict[str, Path]:
    """Write the overview and one crop per image (``label -> uint8 HxWx3``); returns ``label -> path``.

    Files: ``<stem>_overview.png`` and ``<stem>_<k>.png`` in the order of ``images``.
    """
    paths = {"overview": write_image(folder / f"{stem}_overview.png", overview(hr, window))}
    for k, (label, image) in enumerate(images.items()):
        paths[label] = write_image(folder / f"{stem}_{k}.png", window.take(image))
    return paths



@dataclass(frozen=True)
class CropChoice:
    """A crop chosen for the page: which image, where, and how much the models disagree there."""

    set: str
    image: str
    window: Window


def choose_crops(methods: Sequence, data_root: Path, sets: Sequence[str], scale: int, outputs: Path,
                 count: int, size: int = CROP_SIZE) -> tuple[list, list[dict[str, np.ndarray]], list[np.ndarray]]:
    """The ``count`` images (one crop each) whose best window has the highest score, over all sets.

    ``methods`` are :class:`calib.report.tables.Method` rows whose outputs
    :func:`calib.report.tables.evaluate_methods` wrote under ``outputs``; the window is chosen on
    the float and quantized outputs. Returns the choices (best first), every method's output by
    label, and the HR image, per choice.
    """
    from toolchain.data.benchmark import benchmark_pairs, load_pair
    from toolchain.data.io import read_image, to_uint8

    from .tables import output_path

    if count == 0:
        return [], [], []
    compared = [k for k, m in enumerate(methods) if m.kind != "bicubic"]
    candidates = []
    for set_name in sets:
        for pair in benchmark_pairs(data_root, set_name, scale):
            images = [to_uint8(read_image(output_path(outputs, k, set_name, scale, pair.name))) for k in compared]
            candidates.append(CropChoice(set_name, pair.name, best_window(images, size, border=scale)))
    chosen = sorted(candidates, key=lambda c: -c.window.score)[:count]
    outputs_by_choice, hrs = [], []
    for choice in chosen:
        pair = next(p for p in benchmark_pairs(data_root, choice.set, scale) if p.name == choice.image)
        hrs.append(to_uint8(load_pair(pair)[1]))
        outputs_by_choice.append({m.label: to_uint8(read_image(output_path(outputs, k, choice.set, scale, choice.image)))
                                  for k, m in enumerate(methods)})
    return chosen, outputs_by_choice, hrs
