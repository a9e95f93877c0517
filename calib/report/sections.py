"""The sections of the report page, each built from collected data and written figures.

Every function returns an :class:`~calib.report.html.Section` (HTML with links relative to the
report folder) and writes its figures under ``figures/`` of that folder.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from toolchain.metrics import psnr_y

from . import figures
from .crops import CropChoice, write_crops
from .html import Cell, Section, esc, image, paragraph, preformatted, table
from .stats import QuantizerStats, rank_affected
from .tables import Method, PaperRow, quality_table, quantizer_table

log = logging.getLogger(__name__)

FIGURES = "figures"
#: the paper's statement this report lets readers check on their own model
PAPER_EXTREME = ("The 2DQuant paper reports that after DQC its most extreme quantizer keeps only 46% of its "
                 "calibration data inside the clipping range.")


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def quantizer_section(root: Path, stats: Sequence[QuantizerStats], top: int, other_labels: Sequence[str],
                      dobi_note: str, progress: bool = True) -> Section:
    """Overview figure, the ``top`` most affected quantizers in detail, the ranked table, per-block grids."""
    folder = root / FIGURES
    ranked = rank_affected(stats)
    parts = [paragraph("Histograms of the calibration data each quantizer sees in the float model (log-scale "
                       "counts), with the DOBI bounds (dashed orange) and the final bounds of the main artifact "
                       "(solid red); other artifacts dotted. 'In range' is the share of values the quantizer does not "
                       "clip: round(x/s) is a code of the grid, -z <= round(x/s) <= 2^b-1-z, so the value is only "
                       "rounded (the clip interval [-z*s, (2^b-1-z)*s] widened by s/2; within one step of "
                       "[lower, upper], and MinMax keeps 100%). Most affected = largest share clipped by the final "
                       "bounds, then the largest move of "
                       "the bounds from DOBI to final relative to the data range ('shift')."),
             paragraph(dobi_note, "small")]
    figures.save_figure(figures.overview_figure(stats), folder / "overview.png")
    parts.append(image(f"{FIGURES}/overview.png", "in-range share of every quantizer"))
    parts.append(f"<h3>The {min(top, len(ranked))} most affected quantizers</h3>")
    for rank, s in enumerate(tqdm(ranked[:top], desc="figures (top)", disable=not progress), 1):
        name = f"q{rank:02d}_{_file_name(s.name)}.png"
        figures.save_figure(figures.quantizer_figure(s), folder / name)
        parts.append(image(f"{FIGURES}/{name}", s.name, "detail"))
    parts.append("<h3>All quantizers, most affected first</h3>")
    parts.append(f'<div class="scroll">{quantizer_table(ranked, other_labels)}</div>')
    parts.append("<h3>Per block</h3>")
    blocks: dict[str, list[QuantizerStats]] = {}
    for s in stats:
        blocks.setdefault(s.block, []).append(s)
    for k, (block, members) in enumerate(tqdm(blocks.items(), desc="figures (blocks)", disable=not progress)):
        name = f"block{k:03d}_{_file_name(block)}.png"
        figures.save_figure(figures.block_figure(block, members), folder / name, dpi=72)
        parts.append(image(f"{FIGURES}/{name}", f"quantizers of {block or 'the model'}"))
    return Section("quantizers", "Quantizers", "\n".join(parts))


def summary_lines(stats: Sequence[QuantizerStats]) -> list[str]:
    """The most extreme quantizer and its in-range share, in words."""
    worst = rank_affected(stats)[0]
    return [f"Most affected quantizer: {worst.name} ({worst.role}, {worst.bits} bits): "
            f"{100.0 * worst.final.inside:.2f}% of its calibration values in range with the final bounds, "
            f"{'~' if not worst.dobi.exact else ''}{100.0 * worst.dobi.inside:.2f}% with DOBI's.", PAPER_EXTREME]


def quality_section(methods: Sequence[Method], results: dict, sets: Sequence[str], scale: int,
                    paper: Sequence[PaperRow], notes: Sequence[str]) -> Section:
    body = [quality_table(methods, results, sets, scale, paper, "The 2DQuant paper, Table 3 (SwinIR-light)")]
    body += [paragraph(note, "note") for note in notes]
    return Section("quality", "Quality (PSNR / SSIM, Y channel)", "\n".join(body))


def crops_section(root: Path, choices: Sequence[CropChoice], images: Sequence[dict[str, np.ndarray]],
                  hrs: Sequence[np.ndarray]) -> Section:
    """One row per chosen crop: overview, then HR and every method on the same region, with crop PSNR-Y."""
    folder = root / FIGURES
    parts = [paragraph("Each crop is the window (on a grid of stride size/4) where the SR models' outputs "
                       "(float and quantized) differ most: largest mean variance of the luma across them. "
                       "Numbers: PSNR-Y of the crop against HR.")]
    for k, (choice, outputs, hr) in enumerate(zip(choices, images, hrs)):
        w = choice.window
        shown = {"HR": hr, **outputs}
        paths = write_crops(folder, f"crop{k}", w, shown, hr)
        parts.append(f"<h3>{esc(choice.set)} / {esc(choice.image)}: rows {w.top}..{w.top + w.size - 1}, "
                     f"columns {w.left}..{w.left + w.size - 1}</h3>")
        row = [image(f"{FIGURES}/{paths['overview'].name}", "overview", "fig", "where")]
        for label, picture in shown.items():
            caption = label if label == "HR" else f"{label}: {psnr_y(w.take(picture), w.take(hr), 0):.2f} dB"
            row.append(image(f"{FIGURES}/{paths[label].name}", label, "crop", caption))
        parts.append("<div>" + "".join(row) + "</div>")
    if not choices:
        parts.append(paragraph("No crops requested (--crops 0)."))
    return Section("crops", "Visual comparison", "\n".join(parts))


def provenance_section(facts: Sequence[tuple[str, str]], sidecars: dict[str, dict[str, Any]]) -> Section:
    parts = [table(["what", "value"], [(Cell(k, left=True), Cell(v, left=True)) for k, v in facts])]
    for label, meta in sidecars.items():
        parts.append(f"<h3>Artifact metadata: {esc(label)}</h3>")
        parts.append(preformatted(json.dumps(meta, indent=2)))
    return Section("provenance", "Provenance", "\n".join(parts))

