"""Page assembly: one self-contained HTML file (inline CSS, no script, no network) and its pieces.

Every text that comes from data (names, paths, metadata) goes through :func:`esc`. Images are
referenced by paths relative to the page (``figures/...``), so the report folder can be moved
or opened from disk.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: marks a page written by 2dq-report (the CLI replaces only such folders)
GENERATOR = "2dq-report"

_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
tr.paper td { color: #555; background: #fafafa; } tr.sep td { border: none; padding: .6em 0 .1em; text-align: left; }
.note { background: #fff6d8; border-left: 4px solid #e0b000; padding: .4em .8em; }
.small { font-size: .85em; color: #555; }
figure { display: inline-block; margin: .3em; vertical-align: top; text-align: center; }
figcaption { font-size: .8em; max-width: 200px; }
img.crop { width: 160px; height: 160px; image-rendering: pixelated; border: 1px solid #999; }
img.fig { max-width: 100%; }
img.detail { width: 49%; min-width: 560px; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }
nav a { margin-right: 1em; }
.scroll { overflow: auto; max-height: 640px; border: 1px solid #ddd; }
"""


def esc(text: object) -> str:
    """``text`` as HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Cell:
    """A table cell: ``text`` (escaped when rendered), left-aligned if ``left``, a header if ``header``."""

    text: str
    left: bool = False
    header: bool = False


def _cell(cell: object) -> str:
    if not isinstance(cell, Cell):
        cell = Cell(str(cell))
    tag = "th" if cell.header else "td"
    klass = ' class="l"' if cell.left else ""
    return f"<{tag}{klass}>{esc(cell.text)}</{tag}>"


def table(header: Sequence[object], rows: Iterable[Sequence[object]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; ``row_classes[i]`` (e.g. ``"paper"``, ``"sep"``) is set on row ``i``.

    A ``"sep"`` row is one cell spanning the table (a caption between groups of rows).
    """
    cells = "".join(_cell(c if isinstance(c, Cell) else Cell(str(c), header=True)) for c in header)
    parts = ["<table>", f"<thead><tr>{cells}</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        klass = row_classes[i] if row_classes and row_classes[i] else ""
        attr = f' class="{esc(klass)}"' if klass else ""
        if klass == "sep":
            parts.append(f'<tr{attr}><td colspan="{len(header)}">{esc(row[0])}</td></tr>')
        else:
            parts.append(f"<tr{attr}>" + "".join(_cell(c) for c in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def image(src: str, alt: str, klass: str = "fig", caption: str | None = None) -> str:
    """An ``<img>`` (``src`` relative to the page), inside a captioned ``<figure>`` if ``caption``."""
    tag = f'<img class="{esc(klass)}" src="{esc(src)}" alt="{esc(alt)}">'
    return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>" if caption is not None else tag


def paragraph(text: str, klass: str | None = None) -> str:
    attr = f' class="{esc(klass)}"' if klass else ""
    return f"<p{attr}>{esc(text)}</p>"


def preformatted(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


@dataclass(frozen=True)
class Section:
    """A titled part of the page; ``body`` is HTML built with this module's helpers."""

    anchor: str
    title: str
    body: str


def page(title: str, sections: Sequence[Section], intro: str = "") -> str:
    """The whole page: title, navigation, sections."""
    nav = " ".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{esc(s.anchor)}">\n<h2>{esc(s.title)}</h2>\n{s.body}\n</section>'
                     for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{esc(title)}</h1>
{intro}
<nav>{nav}</nav>
{body}
</body>
</html>
"""
