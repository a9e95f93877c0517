"""matplotlib (extra ``report``) and polygraphy (extra ``polygraphy``) are needed only where they are used.

The core command lines import without them; where one is missing, the feature that needs it says so
and how to install it (``toolchain.extras``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.extras import MissingExtraError

from .conftest import REPO

#: the core tools (calibrate, export, build, eval, upscale, profile)
CORE_MODULES = ("calib.cli", "export.cli", "engines.cli_build", "toolchain.cli.eval", "engines.cli_upscale",
                "engines.cli_profile")
OPTIONAL = ("matplotlib", "polygraphy")


def test_core_command_lines_import_neither_matplotlib_nor_polygraphy() -> None:
    script = ("import importlib, json, sys\n"
              "for name in sys.argv[1:]:\n"
              "    importlib.import_module(name)\n"
              f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r})))\n")
    done = subprocess.run([sys.executable, "-c", script, *CORE_MODULES], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` fail as if it were not installed (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, package, None)


def test_report_figures_without_matplotlib_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from calib.report import figures

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError) as err:
        figures.new_figure((2.0, 2.0))
    assert str(err.value) == "2dq-report needs matplotlib: pip install '2dq[report]'"
    assert isinstance(err.value, ImportError) and err.value.name == "matplotlib"


def test_report_command_without_matplotlib_fails_first_with_the_hint(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from calib.report.cli import main

    _hide(monkeypatch, "matplotlib")
    # the artifact does not exist: the missing extra is reported before anything is read
    code = main(["--calib", str(tmp_path / "missing.safetensors"), "--out-dir", str(tmp_path / "report")])
    assert code == 1
    assert "2dq-report needs matplotlib: pip install '2dq[report]'" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_polygraphy_comparator_without_polygraphy_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from engines.compare import polygraphy_compare

    _hide(monkeypatch, "polygraphy")
    with pytest.raises(MissingExtraError, match=r"needs polygraphy: pip install '2dq\[polygraphy\]'$"):
        polygraphy_compare(tmp_path / "missing.ort.onnx", lambda x: x, [])


def test_trt_polygraphy_comparator_without_polygraphy_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    from engines.trt.verify import polygraphy_compare

    _hide(monkeypatch, "polygraphy")
    with pytest.raises(MissingExtraError, match=r"needs polygraphy: pip install '2dq\[polygraphy\]'$"):
        polygraphy_compare(tmp_path / "missing.onnx", tile=64)


def test_a_broken_installed_package_is_not_reported_as_missing(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from toolchain.extras import import_extra

    # a package that imports, but whose own import of a missing dependency fails
    (tmp_path / "twodq_fake_extra").mkdir()
    (tmp_path / "twodq_fake_extra" / "__init__.py").write_text("import twodq_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        import_extra("twodq_fake_extra", "report", "2dq-report")
    assert not isinstance(err.value, MissingExtraError)
    assert err.value.name == "twodq_absent_dependency"
