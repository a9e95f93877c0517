"""The README's Python API example runs as written (on the real DAT-light x4 of ../shared) and does what it says."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from .conftest import REPO


def _example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S)
    assert found, "README.md has no Python API example"
    return found.group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs(shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example().replace("../shared", str(shared_dir)))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script))
    out = capsys.readouterr().out
    assert "252 quantizers" in out                      # what the example's comment claims
    assert "252 DequantizeLinear" in out                # every placed quantizer reached the graph
    assert (tmp_path / "runs" / "api_w4a4.safetensors").is_file()
    assert (tmp_path / "runs" / "api_w4a4.json").is_file()
    assert (tmp_path / "runs" / "api_w4a4.onnx").is_file()
    assert namespace["result"].violations == []
