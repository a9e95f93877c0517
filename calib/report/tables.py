"""Quality tables: PSNR/SSIM of bicubic, the float model and each artifact, beside the paper's Table 3.

Numbers come from :func:`toolchain.evaluate.evaluate_set` unchanged. ``--max-images N`` evaluates
the first ``N`` images (sorted by name) of each set through a folder of links to them, so that
the evaluation code is the one ``2dq-eval`` runs.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from toolchain.backends import Upscaler
from toolchain.data.benchmark import benchmark_pairs
from toolchain.evaluate import SetResult, evaluate_set

from .html import Cell, table
from .stats import QuantizerStats

log = logging.getLogger(__name__)

#: the model of the paper's tables: SwinIR-light (configuration entries that define it)
PAPER_MODEL = {"embed_dim": 60, "depths": [6, 6, 6, 6], "num_heads": [6, 6, 6, 6], "window_size": 8,
               "upsampler": "pixelshuffledirect"}


@dataclass(frozen=True)
class Method:
    """A row of the quality table: ``kind`` is ``"bicubic"``, ``"fp"`` or ``"quantized"``."""

    label: str
    kind: str
    upscaler: Upscaler


@dataclass(frozen=True)
class PaperRow:
    """A row of the paper's Table 3: method, bits (32 = float) and ``set -> (psnr, ssim)``."""

    method: str
    bits: int
    values: dict[str, tuple[float, float]]


def is_paper_model(arch: str, config: dict[str, Any]) -> bool:
    """Whether the model is SwinIR-light, the model of the paper's Table 3."""
    return arch == "swinir" and all(config.get(key) == value for key, value in PAPER_MODEL.items())


def subset_root(data_root: Path, sets: Sequence[str], scale: int, max_images: int, folder: Path) -> Path:
    """``folder`` laid out as a benchmark root with the first ``max_images`` pairs of each set (links)."""
    for name in sets:
        for pair in benchmark_pairs(data_root, name, scale)[:max_images]:
            for source, target in ((pair.hr_path, folder / name / "HR" / pair.hr_path.name),
                                   (pair.lr_path, folder / name / "LR_bicubic" / f"X{scale}" / pair.lr_path.name)):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.symlink(source.resolve(), target)
                except OSError:  # no symlinks on this filesystem
                    shutil.copyfile(source, target)
    return folder


def evaluate_methods(methods: Sequence[Method], data_root: Path, sets: Sequence[str], scale: int,
                     outputs: Path, progress: bool = True) -> dict[str, list[SetResult]]:
    """``evaluate_set`` for every method and set; SR images go to ``outputs/<k>/<set>/x<scale>/``."""
    results: dict[str, list[SetResult]] = {}
    for k, method in enumerate(methods):
        log.info("evaluating %s on %s x%d", method.label, ", ".join(sets), scale)
        results[method.label] = [evaluate_set(method.upscaler, data_root, name, scale, outputs / str(k), progress)
                                 for name in sets]
    return results


def output_path(outputs: Path, k: int, set_name: str, scale: int, image: str) -> Path:
    """Where :func:`evaluate_methods` put method ``k``'s output for ``image``."""
    return outputs / str(k) / set_name / f"x{scale}" / f"{image}.png"


def read_paper_table(path: Path, scale: int, bits: Sequence[int], sets: Sequence[str]) -> list[PaperRow]:
    """Rows of the paper's CSV at ``scale``: FP, Bicubic and the methods at ``bits`` (W = A bits).

    The file (``reference/paper_table3.csv``) has ``#`` comment lines and columns ``scale, method,
    bits, <Set>_psnr, <Set>_ssim, ...``. Sets the paper does not report are left out.
    """
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    needed = {"scale", "method", "bits"}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise ValueError(f"{path}: expected columns {sorted(needed)} and <Set>_psnr/<Set>_ssim, "
                         f"got {reader.fieldnames}")
    rows = []
    for record in reader:
        try:
            if int(record["scale"]) != scale:
                continue
            row_bits = int(record["bits"])
        except ValueError:
            raise ValueError(f"{path}: non-integer scale/bits in row {record}") from None
        if row_bits != 32 and row_bits not in bits:
            continue
        values = {name: (float(record[f"{name}_psnr"]), float(record[f"{name}_ssim"]))
                  for name in sets if record.get(f"{name}_psnr") and record.get(f"{name}_ssim")}
        rows.append(PaperRow(record["method"], row_bits, values))
    return rows


def quality_table(methods: Sequence[Method], results: dict[str, list[SetResult]], sets: Sequence[str],
                  scale: int, paper: Sequence[PaperRow] = (), paper_label: str = "paper") -> str:
    """HTML table: one row per method (PSNR / SSIM per set), then the paper's rows, marked."""
    header = [Cell("method", left=True, header=True)]
    header += [f"{name} x{scale} {metric}" for name in sets for metric in ("PSNR (dB)", "SSIM")]
    rows: list[list[object]] = []
    classes: list[str] = []
    for method in methods:
        by_set = {r.set: r for r in results[method.label]}
        row: list[object] = [Cell(method.label, left=True)]
        for name in sets:
            row += [f"{by_set[name].psnr:.2f}", f"{by_set[name].ssim:.4f}"]
        rows.append(row)
        classes.append(method.kind)
    if paper:
        rows.append([paper_label])
        classes.append("sep")
        for prow in paper:
            label = prow.method if prow.bits == 32 else f"{prow.method} W{prow.bits}A{prow.bits}"
            row = [Cell(f"{label} (paper)", left=True)]
            for name in sets:
                psnr_ssim = prow.values.get(name)
                row += [f"{psnr_ssim[0]:.2f}", f"{psnr_ssim[1]:.4f}"] if psnr_ssim else ["-", "-"]
            rows.append(row)
            classes.append("paper")
    return table(header, rows, classes)


def _percent(share: float) -> str:
    return f"{100.0 * share:.2f}%"


def quantizer_table(stats: Sequence[QuantizerStats], others: Sequence[str] = ()) -> str:
    """HTML table of quantizers: role, bits, data range, bounds and in-range shares."""
    header = ["#", Cell("quantizer", left=True, header=True), "role", "bits", "min", "max", "DOBI lower",
              "DOBI upper", "final lower", "final upper", "in range (DOBI)", "in range (final)",
              *[f"in range ({label})" for label in others], "shift"]
    rows = []
    for rank, s in enumerate(stats, 1):
        rows.append([rank, Cell(s.name, left=True), s.role, s.bits, f"{s.minimum:.4g}", f"{s.maximum:.4g}",
                     _bound(s.dobi.lower), _bound(s.dobi.upper), _bound(s.final.lower), _bound(s.final.upper),
                     ("" if s.dobi.exact else "~") + _percent(s.dobi.inside), _percent(s.final.inside),
                     *[_percent(s.others[label].inside) if label in s.others else "-" for label in others],
                     f"{s.shift:.3f}"])
    return table(header, rows)


def _bound(value: Any) -> str:
    if value.numel() == 1:
        return f"{float(value):.4g}"
    return f"{float(value.min()):.3g}..{float(value.max()):.3g}"


def paper_rows_for(path: Path, scale: int, bits: Sequence[int], sets: Sequence[str],
                   explicit: bool = False) -> tuple[list[PaperRow], Optional[str]]:
    """The paper's rows, or ``([], why)`` when the file is absent (an error if it was asked for by name)."""
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"--paper-table {path}: no such file")
        return [], f"The paper's Table 3 was not found at {path}; its rows are left out."
    rows = read_paper_table(path, scale, bits, sets)
    return rows, None if rows else f"The paper's Table 3 ({path}) has no rows for x{scale}."


def paper_notes(paper_model: bool, arch: str, config: dict[str, Any], max_images: Optional[int],
                missing: Optional[str]) -> list[str]:
    """The caveats printed under the quality table."""
    notes = []
    if missing:
        notes.append(missing)
    elif paper_model:
        notes.append("The paper's rows are SwinIR-light with the official weights; this checkpoint has the same "
                     "architecture, but its float numbers show how far its weights are from the official ones.")
    else:
        notes.append(f"The evaluated model is {arch} ({', '.join(f'{k}={v}' for k, v in config.items())}), not "
                     f"SwinIR-light: the paper's rows are for context only and are not comparable numbers.")
    if not missing:
        notes.append("The paper's Bicubic rows were not made with MATLAB bicubic and differ from the standard "
                     "figures; the bicubic row above is MATLAB-compatible bicubic.")
    if max_images:
        notes.append(f"Only the first {max_images} images (sorted by name) of each set were evaluated: these "
                     f"numbers are not comparable to full-set results.")
    return notes
