"""Conventions shared by the 2dq command-line tools.

Exit codes: 0 success, 1 a failure while working (bad file contents, mismatched artifacts, engine
errors), 2 a usage error (bad or missing options). ``-v``/``-q`` set the logging level (debug / errors
only; info without either) the same way in every tool; progress bars and log lines go to stderr; tables
and text summaries go to stdout. ``--json PATH`` writes a tool's report to a file (atomically), ``--json
-`` to stdout, the text output then going to stderr so that stdout is the JSON alone.

One flag name has one meaning in every tool (``tests/toolchain/cli/test_agree.py`` holds the table):
``--batch`` is images or tiles per model call, ``--out`` a file to write (a folder is ``--out-dir``),
``--weights`` the float checkpoint, ``--calib`` a calibration artifact to read, ``--data`` the benchmark
root, ``--calib-images`` the calibration (training) images, ``--threads`` CPU threads, ``--device`` the
torch device. DQC's own options are ``--dqc-*`` (``--dqc-batch``, ``--dqc-lr``): LR means low resolution here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from ..files import atomic_path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q``: ``args.log_level`` is ``logging.DEBUG`` / ``logging.ERROR``, else ``logging.INFO``.

    >>> parser = argparse.ArgumentParser()
    >>> add_logging_arguments(parser)
    >>> [logging.getLevelName(parser.parse_args(argv).log_level) for argv in ([], ["-v"], ["-q"])]
    ['INFO', 'DEBUG', 'ERROR']
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=logging.INFO, help="log debug messages")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.ERROR,
                       default=logging.INFO, help="log only errors")


def is_verbose(args: argparse.Namespace) -> bool:
    """Whether ``-v`` asked for debug messages."""
    return args.log_level <= logging.DEBUG


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)


#: ``--json -``: the report goes to stdout
STDOUT = "-"


@dataclass(frozen=True)
class JsonOutput:
    """Where ``--json`` sends a report: ``path`` (written atomically), or ``stream`` for ``--json -``.

    The stream is stdout as it was when the command line was parsed: :func:`run_cli` then sends the
    tool's text output to stderr, so that stdout carries the JSON alone.
    """

    path: Optional[Path]
    stream: Optional[TextIO] = None

    @property
    def to_stdout(self) -> bool:
        return self.path is None

    def write(self, report: Any) -> None:
        text = json.dumps(report, indent=2) + "\n"
        if self.path is None:
            self.stream.write(text)
            self.stream.flush()
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)


def json_output(text: str) -> JsonOutput:
    """``--json``'s value: ``-`` for stdout, else a file path (argparse ``type``).

    >>> json_output("-").to_stdout, json_output("run/report.json").path
    (True, PosixPath('run/report.json'))
    """
    if text == STDOUT:
        return JsonOutput(None, sys.stdout)
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, or - for stdout")
    return JsonOutput(Path(text))


def add_json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json PATH`` (``args.json``: a :class:`JsonOutput` or None); ``what``: the report it writes."""
    parser.add_argument("--json", type=json_output, metavar="PATH",
                        help=f"also write {what} as JSON to PATH (atomically); '-': to stdout, the text output "
                        "then going to stderr")


def parse_int_list(text: str, option: str) -> list[int]:
    """``"2,3,4"`` -> ``[2, 3, 4]``; a clear usage error otherwise."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


_FOREIGN_WARNINGS = (r"torch\.meshgrid: in an upcoming release", r"`torch\.jit\.script` is deprecated")
#: loggers of other packages silenced below ERROR unless ``-v``: torch's compiler says "No CUDA runtime is found"
#: the first time it compiles a quantizer kernel on a CPU-only machine
_FOREIGN_LOGGERS = ("torch.utils.cpp_extension",)


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, set up logging, run ``main`` and map exceptions to the exit-code convention."""
    from toolchain.allocator import keep_freed_memory

    args = parser.parse_args(argv)
    setup_logging(args)
    keep_freed_memory()  # a few times faster steps on CPU (toolchain/allocator.py)
    log = logging.getLogger(parser.prog)
    json_out = getattr(args, "json", None)
    # --json -: stdout is the report's alone; the tool's text lines go to stderr
    text_to_stderr = isinstance(json_out, JsonOutput) and json_out.to_stdout
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            if text_to_stderr:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            # said by torch about the architecture code spandrel ships, once per run: nothing a user can act on
            for message in _FOREIGN_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            for name in () if is_verbose(args) else _FOREIGN_LOGGERS:
                foreign = logging.getLogger(name)
                stack.callback(foreign.setLevel, foreign.level)   # as it was, after the run
                foreign.setLevel(max(foreign.level, logging.ERROR))
            return main(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, RuntimeError) as err:
        if is_verbose(args):
            log.exception("failed")
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
