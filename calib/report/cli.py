"""``2dq-report``: what calibration did, in pictures and tables, as one self-contained HTML page.

Examples::

    2dq-report --weights NGswin_x2.pth --calib run/w4a4_dobi.safetensors \\
        --compare run/w4a4_minmax.safetensors --data ../shared/datasets --sets Set5 --out-dir report/
    2dq-report --weights CKPT --calib ARTIFACT --data ../shared/datasets --max-images 2 --out-dir /tmp/r

The folder ``--out-dir`` receives ``index.html``, ``figures/*.png`` and ``report.json`` (every number
of the page). It is built beside ``--out-dir`` under a temporary name and renamed onto it at the end,
so a failure leaves no half-written report; an existing ``--out-dir`` is replaced only if it is empty
or an earlier report.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from toolchain import defaults
from toolchain.cli.common import UsageError, add_json_argument, add_logging_arguments, run_cli
from toolchain.files import atomic_path, sha256_file

from .html import GENERATOR, page, paragraph
from toolchain.models import info_of

log = logging.getLogger("2dq-report")

#: where the paper's Table 3 lies relative to the data root (../shared/datasets -> ../shared/reference)
PAPER_TABLE = Path("..") / "reference" / "paper_table3.csv"
_VERSIONS = ("torch", "numpy", "matplotlib", "pillow", "scipy", "2dq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-report",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Write an HTML report of a calibration: per-quantizer histograms of the calibration data "
        "with the DOBI and final bounds, PSNR/SSIM of bicubic, the float model and each artifact beside the "
        "2DQuant paper's Table 3, crops where the models differ most, and provenance. Self-contained: open "
        "DIR/index.html from disk.",
        epilog="Exit codes: 0 ok, 1 failure (unreadable or mismatched files), 2 usage error.",
    )
    parser.add_argument("--weights", default=str(defaults.DEFAULT_WEIGHTS), metavar="CKPT",
                        help="float checkpoint the artifacts calibrate (default: the shipped DAT-light x4)")
    parser.add_argument("--calib", metavar="ARTIFACT", help="main calibration artifact (.safetensors; default: "
                        "runs/<checkpoint>_w4a4.safetensors, what 2dq-calibrate writes by default)")
    parser.add_argument("--compare", action="append", default=[], metavar="ARTIFACT",
                        help="another artifact of the same checkpoint to compare (repeatable)")
    parser.add_argument("--data", metavar="ROOT", help="folder holding <Set>/HR and <Set>/LR_bicubic/X<s> (default: the "
                        "shipped Set5)")
    parser.add_argument("--out-dir", metavar="DIR", help="report folder to write (index.html, figures/, report.json; "
                        "default: runs/<artifact stem>_report)")
    parser.add_argument("--sets", help="comma-separated test sets (default: Set5,Set14,B100 with --data, Set5 without)")
    parser.add_argument("--max-images", type=int, metavar="N", help="evaluate only the first N images of each set")
    parser.add_argument("--crops", type=int, default=3, help="images shown as crops (default: %(default)s)")
    parser.add_argument("--top", type=int, default=10, help="quantizers drawn in detail (default: %(default)s)")
    parser.add_argument("--calib-images", metavar="DIR",
                        help="folder of the calibration images, if it moved since calibration (same files)")
    parser.add_argument("--paper-table", metavar="CSV",
                        help=f"the paper's Table 3 (default: ROOT/{PAPER_TABLE.as_posix()}; skipped if absent)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_json_argument(parser, "a summary (folder, seconds, most affected quantizer)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_logging_arguments(parser)
    return parser


def _check_args(args: argparse.Namespace) -> list[str]:
    if not args.calib:
        args.calib = str(defaults.existing(defaults.artifact_path(args.weights), "--calib",
                                           "calibrate first: 2dq-calibrate"))
    if args.sets is None:
        args.sets = defaults.sets_for(args.data)
    args.data = args.data or str(defaults.DEFAULT_DATA)
    args.out_dir = args.out_dir or str(defaults.RUNS / f"{Path(args.calib).stem}_report")
    sets = [name.strip() for name in args.sets.split(",") if name.strip()]
    if not sets:
        raise UsageError("--sets is empty")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be positive, got {args.max_images}")
    if args.crops < 0 or args.top < 1:
        raise UsageError(f"--crops must be >= 0 and --top >= 1, got {args.crops} and {args.top}")
    out = Path(args.out_dir)
    if out.exists() and not _replaceable(out):
        raise UsageError(f"--out-dir {out} exists and is not an earlier 2dq report (nor empty); choose another folder")
    return sets


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    index = out / "index.html"
    return not any(out.iterdir()) or (index.is_file() and f'content="{GENERATOR}"' in index.read_text(errors="replace"))


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``, renamed onto ``out`` if the block succeeds, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(build, 0o755)
        yield build
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "report")
            os.replace(build, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(build, out)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from calib.artifact import load_artifact, load_quantized_model
    from calib.observers import batch_forward_loop
    from toolchain import load_model
    from toolchain.backends import BicubicUpscaler, TorchUpscaler
    from toolchain.data.benchmark import benchmark_pairs

    from . import sections
    from .crops import choose_crops
    from .figures import require_matplotlib
    from .sources import calibration_patches, dobi_entry, dobi_options, make_entries
    from .stats import bound_specs, collect_stats, rank_affected
    from .tables import Method, evaluate_methods, is_paper_model, paper_notes, paper_rows_for, subset_root

    require_matplotlib()  # the figures need the report extra: say so before minutes of evaluation
    sets = _check_args(args)
    progress = not args.no_progress
    started = time.perf_counter()
    entries = make_entries([load_artifact(path) for path in [args.calib, *args.compare]])
    fp_model = load_model(args.weights, device=args.device)
    models = [load_quantized_model(args.weights, e.artifact.path, device=args.device) for e in entries]
    info = info_of(fp_model)
    scale, arch, config = info.scale, info.arch, info.hyperparameters
    for name in sets:  # a missing set or scale fails now, not after the calibration pass
        benchmark_pairs(args.data, name, scale)

    lr, used = calibration_patches(entries[0].artifact, scale, args.calib_images)
    source = dobi_entry(entries)
    dobi = source.label if source is not None else dobi_options(entries[0].artifact.meta)
    loop = batch_forward_loop(lr, used["batch_size"], args.device, progress, "calibration data")
    stats = collect_stats(models[0], loop, entries[0].label, {e.label: bound_specs(m) for e, m in zip(entries, models)},
                          dobi)
    seconds_stats = time.perf_counter() - started
    log.info("collected the calibration data of %d quantizers in %.1f s", len(stats), seconds_stats)
    dobi_note = (f"DOBI bounds: those of the artifact '{source.label}' ({source.artifact.path.name}), made by DOBI on "
                 f"the same calibration data." if source is not None else
                 f"DOBI bounds: recomputed here on the main artifact's calibration patches ({_describe(dobi)}); "
                 f"their in-range shares are read from DOBI's streamed histogram (marked ~).")
    other_labels = [e.label for e in entries[1:] if source is None or e is not source]

    methods = [Method("bicubic", "bicubic", BicubicUpscaler(scale)),
               Method(f"FP ({arch} x{scale})", "fp", TorchUpscaler(fp_model, args.device))]
    methods += [Method(e.label, "quantized", TorchUpscaler(m, args.device)) for e, m in zip(entries, models)]
    paper_path = Path(args.paper_table) if args.paper_table else Path(args.data) / PAPER_TABLE
    bits = sorted({e.artifact.quant_config.w_bits for e in entries
                   if e.artifact.quant_config.w_bits == e.artifact.quant_config.a_bits})
    paper, paper_missing = paper_rows_for(paper_path, scale, bits, sets, explicit=bool(args.paper_table))
    with tempfile.TemporaryDirectory(prefix="2dq-report-") as scratch:
        data_root = Path(args.data)
        if args.max_images:
            data_root = subset_root(data_root, sets, scale, args.max_images, Path(scratch) / "data")
        t_eval = time.perf_counter()
        results = evaluate_methods(methods, data_root, sets, scale, Path(scratch) / "sr", progress)
        seconds_eval = time.perf_counter() - t_eval
        choices, crop_images, hrs = choose_crops(methods, data_root, sets, scale, Path(scratch) / "sr", args.crops)
        out = Path(args.out_dir)
        with staged_folder(out) as build:
            summary = sections.summary_lines(stats)
            notes = paper_notes(is_paper_model(arch, config), arch, config, args.max_images, paper_missing)
            seconds = time.perf_counter() - started
            facts = _facts(args, argv, used, dobi_note, seconds_stats, seconds_eval)
            parts = [
                sections.quality_section(methods, results, sets, scale, paper, notes),
                sections.crops_section(build, choices, crop_images, hrs),
                sections.quantizer_section(build, stats, args.top, other_labels, dobi_note, progress),
                sections.provenance_section(facts, {e.label: e.artifact.meta for e in entries}),
            ]
            intro = "\n".join(paragraph(line) for line in [
                f"Model: {arch} x{scale} ({Path(args.weights).name}); artifacts: "
                + "; ".join(f"{e.label} ({e.artifact.path.name})" for e in entries) + ".", *summary])
            with atomic_path(build / "index.html") as tmp:
                tmp.write_text(page(f"2dq calibration report: {entries[0].label}, {arch} x{scale}", parts, intro))
            record = _record(entries, stats, results, choices, facts, dobi_note, seconds)
            with atomic_path(build / "report.json") as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")
    worst = rank_affected(stats)[0]
    seconds = time.perf_counter() - started
    print(f"wrote {out / 'index.html'} in {seconds:.1f} s")
    print(f"most affected quantizer: {worst.name} ({worst.role}): {100 * worst.final.inside:.2f}% in range "
          f"(final), {100 * worst.dobi.inside:.2f}% (DOBI)")
    if args.json:
        args.json.write({"out_dir": str(out), "seconds": round(seconds, 1), "most_affected": record["most_affected"]})
    return 0


def _describe(options) -> str:
    return f"{options.candidates} candidates, mode {options.mode}, {options.bins} histogram bins"


def _facts(args: argparse.Namespace, argv: Sequence[str], used: dict[str, Any], dobi_note: str,
           seconds_stats: float, seconds_eval: float) -> list[tuple[str, str]]:
    weights = Path(args.weights)
    facts = [("command", shlex.join(["2dq-report", *argv])),
             ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
             ("checkpoint", str(weights.resolve())), ("checkpoint SHA-256", sha256_file(weights)),
             ("test data", str(Path(args.data).resolve())),
             ("calibration patches", f"{used['patches']} patches {used['patch_size']}x{used['patch_size']} "
                                     f"(seed {used['seed']}) from {used['images']} images in {used['folder']}, "
                                     f"batches of {used['batch_size']}"),
             ("DOBI bounds", dobi_note),
             ("time", f"calibration data {seconds_stats:.1f} s, evaluation {seconds_eval:.1f} s")]
    facts += [(f"version: {name}", value) for name, value in versions().items()]
    return facts


def _bounds_record(bounds) -> dict[str, Any]:
    return {"lower": bounds.lower.tolist(), "upper": bounds.upper.tolist(), "inside": bounds.inside,
            "exact": bounds.exact}


def _record(entries, stats, results, choices, facts, dobi_note, seconds) -> dict[str, Any]:
    from .stats import rank_affected

    ranked = rank_affected(stats)
    return {
        "generator": GENERATOR,
        "artifacts": [{"label": e.label, "path": str(e.artifact.path)} for e in entries],
        "quality": {label: [r.to_dict() for r in rows] for label, rows in results.items()},
        "quantizers": [{"name": s.name, "role": s.role, "kind": s.kind, "bits": s.bits, "count": s.count,
                        "min": s.minimum, "max": s.maximum, "clipped": s.clipped, "shift": s.shift,
                        "final": _bounds_record(s.final), "dobi": _bounds_record(s.dobi),
                        "others": {k: _bounds_record(v) for k, v in s.others.items()}} for s in stats],
        "most_affected": {"name": ranked[0].name, "role": ranked[0].role, "in_range_final": ranked[0].final.inside,
                          "in_range_dobi": ranked[0].dobi.inside},
        "crops": [{"set": c.set, "image": c.image, "top": c.window.top, "left": c.window.left,
                   "size": c.window.size, "score": c.window.score} for c in choices],
        "dobi_source": dobi_note,
        "facts": dict(facts),
        "seconds": seconds,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda args: _main(args, argv), build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
