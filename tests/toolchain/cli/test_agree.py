"""The command-line tools agree: every tool of pyproject's ``[project.scripts]`` has the same ``-v/-q``
levels, a ``--json PATH`` that takes ``-`` for stdout, and a flag name that several tools use means the
same in each (the table :data:`SHARED` below); no tool has the retired names (:data:`RETIRED`).

A new tool is covered by adding it to ``[project.scripts]``: its module's ``build_parser()`` is read here.
A flag a second tool starts using must be declared in :data:`SHARED`, with what it means.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolchain.cli.common import JsonOutput, add_json_argument, add_logging_arguments, json_output, run_cli

from ...conftest import REPO


@dataclass(frozen=True)
class Shared:
    """What a flag means in every tool that has it: ``help`` is a regex each tool's help text matches;
    ``may_differ``: attributes (see :func:`signature`) that may differ between tools, and why."""

    meaning: str
    help: str
    may_differ: tuple[str, ...] = ()
    why: str = ""


#: every flag used by two or more tools, with its one meaning
SHARED: dict[str, Shared] = {
    "--verbose": Shared("log debug messages (-v)", r"debug"),
    "--quiet": Shared("log only errors (-q)", r"only errors"),
    "--weights": Shared("the float checkpoint (.pth or .safetensors)", r"checkpoint", ("default",),
                        "2dq-calibrate and 2dq-report name the shipped model in the parser, the others resolve it later "
                        "(2dq-upscale: None means an engine)"),
    "--calib": Shared("a calibration artifact to read (.safetensors + .json sidecar)", r"artifact"),
    "--calib-images": Shared("the folder of calibration (training) images", r"folder of .*images", ("default",),
                             "2dq-calibrate defaults to the shipped images; 2dq-report reads the artifact's record"),
    "--data": Shared("the benchmark root holding <Set>/HR and <Set>/LR_bicubic/X<s>", r"holding <Set>/"),
    "--sets": Shared("comma-separated test sets", r"comma-separated test sets", ("default",),
                     "2dq-build-engine verifies on Set5 alone even with --data (the reference runs several times)"),
    "--device": Shared("the torch device", r"torch device"),
    "--threads": Shared("CPU threads of the computation (torch's or the CPU engine's)", r"CPU threads"),
    "--overlap": Shared("tile overlap in LR pixels", r"tile overlap in LR pixels"),
    "--batch": Shared("images or tiles per model call (2dq-export: fixed into the graph)",
                      r"\b(tiles|patches) per model call", ("default", "metavar"),
                      "calibration patches are small (8 per call), engines default to 4 tiles, 2dq-export and "
                      "2dq-profile read the model's or plan's own batch"),
    "--tile": Shared("tile size in LR pixels", r"tile size", ("default",),
                     "2dq-export picks the tile (64); the others run the whole image or the export's tile"),
    "--json": Shared("a JSON report: a file written atomically, '-' for stdout", r"JSON to PATH.*'-': to stdout"),
    "--no-progress": Shared("hide progress bars", r"progress bars"),
    "--out": Shared("the file this tool writes (a folder is --out-dir)", r"to write", ("metavar",),
                    "the metavar names what the file is (ARTIFACT, ENGINE, OUT.png)"),
    "--target": Shared("the export target", r"export target", ("default",),
                       "2dq-export defaults to the artifact's own target"),
    "--backend": Shared("the runtime that runs the model", r"ONNX Runtime", ("default", "choices"),
                        "2dq-eval also runs PyTorch and picks the backend from --engine's suffix"),
    "--engine": Shared("an engine file to run (.onnx/.ort, .xml, .plan/.engine)", r"\.plan/\.engine"),
    "--onnx": Shared("the QDQ ONNX graph: 2dq-export writes it, 2dq-build-engine reads it", r"graph",
                     ("nargs", "const", "metavar"), "a bare 2dq-export --onnx writes the default name"),
}

#: names no tool may use, and what to use instead
RETIRED = {
    "--batch-size": "--batch (images or tiles per model call)",
    "--lr": "--dqc-lr (LR means low resolution in this project)",
}

#: tools without --json, and why
NO_JSON = {"2dq-upscale": "writes one image and prints one line; nothing to report"}

ATTRIBUTES = ("action", "nargs", "type", "const", "choices", "default", "metavar")


def tool_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{tool name: its parser}`` for every entry of pyproject's ``[project.scripts]``."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {}
    for tool, target in scripts.items():
        module = importlib.import_module(target.split(":")[0])
        assert hasattr(module, "build_parser"), f"{tool}: {target.split(':')[0]} has no build_parser()"
        parsers[tool] = module.build_parser()
    return parsers


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{--long-name: action}`` of a parser (``--help`` left out)."""
    return {option: action for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings if option.startswith("--")}


def signature(action: argparse.Action) -> dict[str, object]:
    """What two tools' uses of one flag must share (names in :data:`ATTRIBUTES`)."""
    return {"action": type(action).__name__, "nargs": action.nargs, "type": action.type, "const": action.const,
            "choices": None if action.choices is None else tuple(action.choices), "default": action.default,
            "metavar": action.metavar}


def clashes(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Every disagreement between the tools' flags, in words (empty when they agree)."""
    problems = []
    users: dict[str, dict[str, argparse.Action]] = {}
    for tool, parser in parsers.items():
        for flag, action in flags(parser).items():
            users.setdefault(flag, {})[tool] = action
            if flag in RETIRED:
                problems.append(f"{tool} has {flag}: use {RETIRED[flag]}")
    for flag, by_tool in sorted(users.items()):
        if len(by_tool) < 2:
            continue
        shared = SHARED.get(flag)
        if shared is None:
            problems.append(f"{flag} is used by {', '.join(sorted(by_tool))}: declare its one meaning in SHARED")
            continue
        for tool, action in by_tool.items():
            if not re.search(shared.help, action.help or ""):
                problems.append(f"{tool} {flag}: help {action.help!r} does not say {shared.meaning!r} "
                                f"(expected /{shared.help}/)")
        (first, reference), *others = sorted(by_tool.items())
        for tool, action in others:
            for name in ATTRIBUTES:
                ours, theirs = signature(reference)[name], signature(action)[name]
                if name not in shared.may_differ and ours != theirs:
                    problems.append(f"{flag}: {name} {ours!r} in {first} but {theirs!r} in {tool}")
    for tool, parser in parsers.items():
        out = flags(parser).get("--out")
        if out is not None and (out.metavar == "DIR" or re.match(r"(\w+ )?(folder|directory)\b", out.help or "")):
            problems.append(f"{tool} --out names a folder: call it --out-dir")
    return problems


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    """Stand-ins for a parser's positional arguments (parsing reads no file)."""
    return ["x" for action in parser._actions if not action.option_strings and action.nargs in (None, "+")]


def _parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    return parser.parse_args([*_positionals(parser), *argv])


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return tool_parsers()


def test_every_script_of_pyproject_is_read(parsers: dict[str, argparse.ArgumentParser]) -> None:
    assert {"2dq-calibrate", "2dq-export", "2dq-build-engine", "2dq-eval", "2dq-upscale", "2dq-profile",
            "2dq-report"} <= set(parsers)
    assert all(parser.prog == tool for tool, parser in parsers.items())


def test_a_flag_means_the_same_in_every_tool(parsers: dict[str, argparse.ArgumentParser]) -> None:
    assert clashes(parsers) == []


def test_the_table_declares_only_shared_flags(parsers: dict[str, argparse.ArgumentParser]) -> None:
    counts: dict[str, int] = {}
    for parser in parsers.values():
        for flag in flags(parser):
            counts[flag] = counts.get(flag, 0) + 1
    assert {flag for flag in SHARED if counts.get(flag, 0) < 2} == set()


@pytest.mark.parametrize("argv", [["--batch-size", "2"], ["--lr", "0.01"]])
def test_retired_names_are_refused(parsers: dict[str, argparse.ArgumentParser], argv: list[str],
                                   capsys: pytest.CaptureFixture) -> None:
    """Not even as an abbreviation of a longer flag: argparse's own error, exit 2."""
    for tool, parser in parsers.items():
        with pytest.raises(SystemExit) as exit_info:
            _parse(parser, *argv)
        assert exit_info.value.code == 2, tool
        assert f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err, tool


def test_no_prefix_stands_in_for_a_flag(parsers: dict[str, argparse.ArgumentParser],
                                       capsys: pytest.CaptureFixture) -> None:
    """argparse would take ``--out`` for 2dq-report's ``--out-dir``, or ``--dqc-b`` for ``--dqc-batch``: a second,
    silent name; every tool turns abbreviations off."""
    assert [tool for tool, parser in parsers.items() if parser.allow_abbrev] == []
    with pytest.raises(SystemExit):
        _parse(parsers["2dq-report"], "--out", "r")
    assert "unrecognized arguments: --out r" in capsys.readouterr().err


def test_no_tool_has_two_batch_flags(parsers: dict[str, argparse.ArgumentParser]) -> None:
    for tool, parser in parsers.items():
        assert not {"--batch", "--batch-size"} <= set(flags(parser)), tool


def test_every_tool_has_the_same_logging_levels(parsers: dict[str, argparse.ArgumentParser]) -> None:
    reference = argparse.ArgumentParser()
    add_logging_arguments(reference)
    expected = {(): logging.INFO, ("-v",): logging.DEBUG, ("--verbose",): logging.DEBUG, ("-q",): logging.ERROR,
                ("--quiet",): logging.ERROR}
    assert {argv: reference.parse_args(list(argv)).log_level for argv in expected} == expected
    for tool, parser in parsers.items():
        assert {argv: _parse(parser, *argv).log_level for argv in expected} == expected, tool
        with pytest.raises(SystemExit):
            _parse(parser, "-v", "-q")


def test_json_takes_a_path_or_dash_for_stdout(parsers: dict[str, argparse.ArgumentParser], tmp_path: Path) -> None:
    assert {tool for tool, parser in parsers.items() if "--json" not in flags(parser)} == set(NO_JSON)
    for tool, parser in parsers.items():
        if tool in NO_JSON:
            continue
        assert flags(parser)["--json"].type is json_output and flags(parser)["--json"].nargs is None, tool
        assert _parse(parser, "--json", "-").json.to_stdout, tool
        assert _parse(parser, "--json", str(tmp_path / "r.json")).json.path == tmp_path / "r.json", tool
        assert _parse(parser).json is None, tool
        with pytest.raises(SystemExit):
            _parse(parser, "--json")  # a value is required: no bare flag


def _toy_tool() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_json_argument(parser, "the toy report")
    add_logging_arguments(parser)
    return parser


def _toy_main(args: argparse.Namespace) -> int:
    print("a text summary")
    if args.json:
        args.json.write({"answer": 42})
    return 0


def test_json_to_a_file_is_atomic_and_keeps_the_text_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "sub" / "report.json"
    assert run_cli(_toy_main, _toy_tool(), ["--json", str(target)]) == 0
    assert json.loads(target.read_text()) == {"answer": 42}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temporary file left
    assert capsys.readouterr().out == "a text summary\n"


def test_json_to_stdout_is_the_json_alone(capsys: pytest.CaptureFixture) -> None:
    assert run_cli(_toy_main, _toy_tool(), ["--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"answer": 42} and "a text summary" in err


def test_a_failed_report_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(TypeError):
        JsonOutput(target).write({"not json": object()})
    assert list(tmp_path.iterdir()) == []
    JsonOutput(None, io.StringIO()).write([1])


def _with(parser: argparse.ArgumentParser, *args: str, **kwargs: object) -> argparse.ArgumentParser:
    parser.add_argument(*args, **kwargs)
    return parser


@pytest.mark.parametrize("flag, kwargs, expected", [
    ("--batch", {"type": int, "default": 4, "help": "DQC training batch"}, "does not say"),
    ("--lr", {"type": float, "help": "learning rate"}, "use --dqc-lr"),
    ("--batch-size", {"type": int, "help": "patches per forward batch"}, "use --batch"),
    ("--device", {"type": int, "default": 0, "help": "torch device index"}, "--device: "),
    ("--out-dir", {"help": "folder to write"}, None),
    ("--seed", {"type": int, "help": "seed"}, "declare its one meaning"),
])
def test_a_reintroduced_clash_is_caught(parsers: dict[str, argparse.ArgumentParser], flag: str,
                                        kwargs: dict, expected: str | None) -> None:
    """Negative control: a new tool that brings back a clash makes :func:`clashes` speak."""
    clash = _with(argparse.ArgumentParser(prog="2dq-new"), flag, **kwargs)
    found = clashes({**parsers, "2dq-new": clash})
    if expected is None:  # --out-dir in one tool is no clash (2dq-report has it too: then it must be declared)
        assert found == ["--out-dir is used by 2dq-new, 2dq-report: declare its one meaning in SHARED"]
    else:
        assert found and all(expected in problem for problem in found), found


def test_an_out_that_is_a_folder_is_caught(parsers: dict[str, argparse.ArgumentParser]) -> None:
    clash = _with(argparse.ArgumentParser(prog="2dq-new"), "--out", metavar="DIR", help="report folder to write")
    assert "2dq-new --out names a folder: call it --out-dir" in clashes({**parsers, "2dq-new": clash})


def test_foreign_compiler_warnings_are_silenced_unless_verbose(capsys: pytest.CaptureFixture) -> None:
    """torch's "No CUDA runtime is found" (logger ``torch.utils.cpp_extension``) is not shown by a tool's run,
    our own warnings are, ``-v`` shows both, and the foreign logger's level is restored after the run."""
    import logging

    foreign = logging.getLogger("torch.utils.cpp_extension")
    before = foreign.level

    def main(args: argparse.Namespace) -> int:
        foreign.warning("No CUDA runtime is found")
        logging.getLogger("toy").warning("our own warning")
        return 0

    assert run_cli(main, _toy_tool(), []) == 0
    err = capsys.readouterr().err
    assert "our own warning" in err and "No CUDA runtime" not in err
    assert foreign.level == before
    assert run_cli(main, _toy_tool(), ["-v"]) == 0
    err = capsys.readouterr().err
    assert "our own warning" in err and "No CUDA runtime" in err   # negative control: the message does reach stderr
