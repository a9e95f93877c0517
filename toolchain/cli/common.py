"""Conventions shared by the 2dq command-line tools.

Exit codes: 0 success, 1 a failure while working (bad file contents, mismatched artifacts, engine
errors), 2 a usage error (bad or missing options). ``-v``/``-q`` set the logging level; progress bars
go to stderr; tables and JSON go to stdout.
"""
from __future__ import annotations

import argparse
import logging
import warnings
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    group.add_argument("-q", "--quiet", action="store_true", help="log only errors")


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


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


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, set up logging, run ``main`` and map exceptions to the exit-code convention."""
    args = parser.parse_args(argv)
    setup_logging(args)
    log = logging.getLogger(parser.prog)
    try:
        with warnings.catch_warnings():
            # said by torch about the architecture code spandrel ships, once per run: nothing a user can act on
            for message in _FOREIGN_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return main(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, RuntimeError) as err:
        if args.verbose:
            log.exception("failed")
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
