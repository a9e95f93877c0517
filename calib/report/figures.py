"""Matplotlib figures of the report, built as ``Figure`` objects (no pyplot, no global state).

Each figure function returns the :class:`~matplotlib.figure.Figure`, so tests can read what was
drawn (bound lines carry ``gid`` ``"<set>-lower"`` / ``"<set>-upper"`` with ``<set>`` = ``dobi``,
``final`` or ``other<k>``; the histogram is the axes' ``StepPatch``) before :func:`save_figure`
writes it, atomically, as PNG through the Agg renderer. matplotlib is the ``report`` extra: it is
imported when a figure is made (:func:`new_figure`), so this module imports without it.

Per-channel bounds are drawn as their envelope: the smallest lower and the largest upper bound
over the channels (the in-range share is still counted per channel).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolchain.extras import import_extra
from toolchain.files import atomic_path

from .stats import Bounds, QuantizerStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: what a missing matplotlib is reported as (the ``report`` extra)
FEATURE = "2dq-report"

#: histogram bins drawn in a detailed figure / in a small multiple
DETAIL_BINS = 160
SMALL_BINS = 48
SMALL_COLUMNS = 5
DPI = 90
# DOBI's dashed line is drawn above the final one, so that equal bounds still show both
_STYLES = {"dobi": dict(color="tab:orange", linestyle="--", linewidth=1.6, zorder=3.2),
           "final": dict(color="tab:red", linestyle="-", linewidth=1.6, zorder=3.1)}
_OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")
_ROLE_COLORS = {"weight": "tab:gray", "linear_input": "tab:blue", "mlp_hidden": "tab:cyan",
                "attn_q": "tab:green", "attn_k": "tab:olive", "attn_probs": "tab:red", "attn_v": "tab:purple",
                "matmul_a": "tab:brown", "matmul_b": "tab:pink", "conv_input": "black"}


def envelope(bounds: Bounds) -> tuple[float, float]:
    """The lines drawn for a set of bounds: the bounds themselves, or the per-channel envelope."""
    return float(bounds.lower.min()), float(bounds.upper.max())


def short_label(name: str, parts: int = 3, width: int = 30) -> str:
    """The last ``parts`` components of a dotted name, at most ``width`` characters (for small titles)."""
    label = ".".join(name.split(".")[-parts:])
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _bound_sets(stats: QuantizerStats) -> list[tuple[str, str, Bounds, dict]]:
    """``(gid prefix, label, bounds, line style)`` for DOBI, final and every other artifact."""
    sets = [("dobi", "DOBI", stats.dobi, _STYLES["dobi"]), ("final", "final", stats.final, _STYLES["final"])]
    for k, (label, bounds) in enumerate(stats.others.items()):
        style = dict(color=_OTHER_COLORS[k % len(_OTHER_COLORS)], linestyle=":", linewidth=1.4)
        sets.append((f"other{k}", label, bounds, style))
    return sets


def require_matplotlib() -> None:
    """Raise :class:`toolchain.extras.MissingExtraError` now if matplotlib is not installed."""
    import_extra("matplotlib.figure", "report", FEATURE)


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib ``Figure`` (not pyplot: no global state) of ``figsize`` inches."""
    return import_extra("matplotlib.figure", "report", FEATURE).Figure(figsize=figsize)


def _share(bounds: Bounds) -> str:
    return f"{'~' if not bounds.exact else ''}{100.0 * bounds.inside:.2f}%"


def _draw_histogram(ax, stats: QuantizerStats, bins: int) -> None:
    hist = stats.histogram.merged(bins)
    # zero-count bins sit on the baseline 0.5, below one count, so the log axis can show them
    ax.stairs(hist.counts, hist.edges, baseline=0.5, fill=True, color="tab:blue", alpha=0.45, gid="histogram")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5, top=max(float(hist.counts.max()), 1.0) * 2.0)
    lines = [v for _, _, b, _ in _bound_sets(stats) for v in envelope(b)]
    low, high = min(stats.minimum, *lines), max(stats.maximum, *lines)
    margin = 0.03 * (high - low) if high > low else 1.0
    ax.set_xlim(low - margin, high + margin)


def quantizer_figure(stats: QuantizerStats) -> Figure:
    """Histogram of one quantizer's calibration data (log counts) with its bounds drawn and labelled."""
    fig = new_figure((7.5, 3.8))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.84)
    ax = fig.add_subplot()
    _draw_histogram(ax, stats, DETAIL_BINS)
    per_channel = stats.final.lower.numel() > 1
    for gid, label, bounds, style in _bound_sets(stats):
        low, high = envelope(bounds)
        text = f"{label} [{low:.4g}, {high:.4g}]{' (envelope)' if per_channel else ''}: {_share(bounds)} in range"
        ax.axvline(low, gid=f"{gid}-lower", label=text, **style)
        ax.axvline(high, gid=f"{gid}-upper", **style)
    ax.set_title(f"{stats.name}\n{stats.role}, {stats.kind}, {stats.bits} bits, {stats.count:,} values, "
                 f"range [{stats.minimum:.4g}, {stats.maximum:.4g}]", fontsize=9)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log scale)")
    ax.legend(fontsize=7.5, loc="upper right", framealpha=0.85)
    return fig


def block_figure(title: str, stats: Sequence[QuantizerStats]) -> Figure:
    """Small multiples: one small histogram per quantizer of a block, DOBI (dashed) and final bounds."""
    ticker = import_extra("matplotlib.ticker", "report", FEATURE)
    columns = min(SMALL_COLUMNS, len(stats))
    rows = math.ceil(len(stats) / columns)
    # inches: each row is an axes of 1.1 plus 0.5 for its two-line title and tick labels
    height = 1.6 * rows + 0.75
    fig = new_figure((2.5 * columns, height))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.25 / height, top=1 - 0.8 / height, wspace=0.08,
                        hspace=0.5 / 1.1)
    fig.suptitle(title or "(model)", fontsize=10, y=1 - 0.08 / height, va="top")
    for k, s in enumerate(stats):
        ax = fig.add_subplot(rows, columns, k + 1)
        _draw_histogram(ax, s, SMALL_BINS)
        for gid, _, bounds, style in _bound_sets(s)[:2]:
            low, high = envelope(bounds)
            ax.axvline(low, gid=f"{gid}-lower", **style)
            ax.axvline(high, gid=f"{gid}-upper", **style)
        ax.set_title(f"{short_label(s.short)}\nin range {_share(s.final)}", fontsize=7)
        # log-axis tick labels dominate the drawing time of small multiples; the counts are relative
        ax.set_yticks([])
        ax.set_yticks([], minor=True)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(3))
        ax.tick_params(labelsize=6)
    return fig


def overview_figure(stats: Sequence[QuantizerStats]) -> Figure:
    """In-range share of every quantizer in model order: final bounds (filled), DOBI (open), by role."""
    fig = new_figure((12, 3.6))
    fig.subplots_adjust(left=0.065, right=0.87, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    index = np.arange(len(stats))
    final = np.array([100.0 * s.final.inside for s in stats])
    dobi = np.array([100.0 * s.dobi.inside for s in stats])
    roles = [s.role for s in stats]
    for role in dict.fromkeys(roles):
        mask = np.array([r == role for r in roles])
        color = _ROLE_COLORS.get(role, "black")
        ax.scatter(index[mask], final[mask], s=12, color=color, label=role, gid=f"final-{role}")
        ax.scatter(index[mask], dobi[mask], s=18, facecolors="none", edgecolors=color, linewidths=0.7,
                   gid=f"dobi-{role}")
    ax.set_xlabel("quantizer (model order)")
    ax.set_ylabel("calibration values in range (%)")
    ax.set_ylim(min(float(final.min()), float(dobi.min()), 99.0) - 1.0, 100.5)
    ax.set_title("share of calibration values not clipped: final bounds (filled), DOBI (open)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="role", title_fontsize=7)
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
