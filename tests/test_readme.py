"""The README's Python API example runs as written (on the shipped DAT-light x4) and does what it says."""
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
def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example())
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script))
    out = capsys.readouterr().out
    assert "252 quantizers" in out                      # what the example's comment claims
    assert "252 DequantizeLinear" in out                # every placed quantizer reached the graph
    assert (tmp_path / "runs" / "api_w4a4.safetensors").is_file()
    assert (tmp_path / "runs" / "api_w4a4.json").is_file()
    assert (tmp_path / "runs" / "api_w4a4.onnx").is_file()
    assert namespace["result"].violations == []


def _main_job_commands() -> list[str]:
    """The command lines of the README's set-up section (both bash blocks), comments stripped, install left out."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Set up and run the main job"):text.index("Your own checkpoint")]
    lines = [line.split("#", 1)[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("pip install")]


@pytest.mark.slow
def test_readme_main_job_and_default_chain_run_as_written(tmp_path: Path) -> None:
    """Every command of the set-up section, as a user types it on a fresh clone: no path but the image, the
    shipped model and data only (no ../shared), each stage reading the previous stage's default output."""
    import shutil
    import subprocess
    import sys

    from toolchain.defaults import DEFAULT_DATA

    from .test_chain import _both_inputs_dequantized

    commands = _main_job_commands()
    assert [c.split()[0] for c in commands] == ["2dq-calibrate", "2dq-export", "2dq-build-engine", "2dq-eval",
                                                "2dq-profile", "2dq-eval", "2dq-upscale", "2dq-report"]
    shutil.copyfile(DEFAULT_DATA / "Set5" / "LR_bicubic" / "X4" / "birdx4.png", tmp_path / "photo.png")
    outputs = {}
    for command in commands:
        tool, *args = command.split()
        done = subprocess.run([str(Path(sys.executable).with_name(tool)), *args, "--no-progress"
                               if tool in ("2dq-calibrate", "2dq-build-engine", "2dq-eval", "2dq-report") else "-q"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
        outputs.setdefault(tool, []).append(done.stdout)
    runs = tmp_path / "runs"
    assert (runs / "dat_light_x4_w4a4.safetensors").is_file() and (runs / "dat_light_x4_w4a4.json").is_file()
    assert _both_inputs_dequantized(runs / "dat_light_x4_w4a4.onnx") == 72 + 54   # every placed linear and matmul
    assert (runs / "dat_light_x4_w4a4.ort.onnx").is_file()
    assert "PASS" in outputs["2dq-build-engine"][0]
    engine_psnr, float_psnr = (float(re.search(r"\| Set5 \| x4 \| ([\d.]+) \|", out).group(1))
                               for out in outputs["2dq-eval"])
    assert float_psnr == pytest.approx(32.57, abs=0.01)   # the published DAT-light x4 Set5 figure
    assert 28.42 < engine_psnr < float_psnr               # W4A4 shows: below FP, above bicubic (28.42)
    assert (tmp_path / "photo_x4.png").is_file()
    assert (runs / "dat_light_x4_w4a4_report" / "index.html").is_file()
    profile = outputs["2dq-profile"][0]
    assert "latency" in profile and re.search(r"int8 126 \(", profile)   # every placed linear and matmul runs in int8


def _data_room_commands() -> list[str]:
    """The ``2dq-*`` command lines of the README block that uses ``../shared`` (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("Your own checkpoint"):text.index("## Python API")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [" ".join(line.split()) for line in lines if line.startswith("2dq-")]


@pytest.mark.slow
def test_readme_data_room_commands_run_on_tiny_stand_ins(tmp_path: Path) -> None:
    """Every command of the README's ../shared block, as written, with tiny stand-ins for what is long: a tiny DAT x4
    (random weights) for DAT-light, the shipped images and Set5 for the data room, a token DQC budget. The real
    runs of the same commands are the main-job test above and tests/test_chain.py."""
    import shutil
    import subprocess
    import sys

    from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_DATA

    from .tiny_models import save_checkpoint, tiny_dat

    checkpoint = save_checkpoint(tiny_dat(scale=4), tmp_path / "tiny_dat_x4.safetensors")
    shutil.copyfile(DEFAULT_DATA / "Set5" / "LR_bicubic" / "X4" / "birdx4.png", tmp_path / "photo.png")
    stand_ins = [("../shared/models/DAT-light/DAT_light_x4.pth", str(checkpoint)),
                 ("../shared/datasets/train", str(DEFAULT_CALIB_IMAGES)), ("../shared/datasets", str(DEFAULT_DATA)),
                 ("--sets Set5,Set14,B100", "--sets Set5")]   # the shipped data holds Set5 only
    commands = _data_room_commands()
    assert len(commands) == 13 and {c.split()[0] for c in commands} == {
        "2dq-calibrate", "2dq-eval", "2dq-export", "2dq-build-engine", "2dq-upscale", "2dq-report"}
    for command in commands:
        for real, tiny in stand_ins:
            command = command.replace(real, tiny)
        tool, *args = command.split()
        if tool == "2dq-calibrate":
            args += ["--patches", "4", "--no-progress"]
            if "2dquant" in args:
                args += ["--dqc-iters", "1", "--dqc-batch", "2", "--val-every", "0"]
        done = subprocess.run([str(Path(sys.executable).with_name(tool)), *args], cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    shared = tmp_path / "runs" / "shared"
    for name in ("dat_light_x4_w4a4.safetensors", "dat_light_x4_w4a4_2dq.safetensors", "dat_light_x4_w4a4_all.safetensors",
                 "dat_light_x4_w4a4.onnx", "dat_light_x4_w4a4.ort.onnx", "dat_light_x4_w4a4.ov.xml",
                 "dat_light_x4_w4a4.ov.bin"):
        assert (shared / name).is_file(), name
    assert (tmp_path / "photo_x4.png").is_file() and (tmp_path / "runs" / "report" / "index.html").is_file()


def _trtexec_lines() -> list[list[str]]:
    """The ``trtexec`` command lines of the README's TensorRT section, continuations joined, as argument lists."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## TensorRT engines"):]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("trtexec "):
                commands.append(line.split())
    return commands


def test_readme_trtexec_commands_are_the_ones_the_tools_run() -> None:
    """TensorRT cannot run here: the README's trtexec lines are checked against the commands 2dq builds and runs
    (engines.trt.trtexec), so the documentation cannot drift from the code."""
    from engines.trt.trtexec import build_command, profile_command

    common = dict(input_name="input", tile=64, max_batch=8, timing_cache="trt_timing.cache")
    expected = [
        build_command("trtexec", "swinir_x2_w4a4.onnx", "swinir_x2_w4a4.plan", **common),
        build_command("trtexec", "swinir_x2_w4a4.onnx", "swinir_x2_w4a4.plan", strongly_typed=False,
                      builder_flags=("INT8",), **common),
        profile_command("trtexec", "swinir_x2_w4a4.plan", input_name="input", batch=8, tile=64,
                        profile_json="profile.json", layer_info_json="layer_info.json"),
    ]
    assert _trtexec_lines() == expected
