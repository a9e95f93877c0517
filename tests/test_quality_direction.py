"""The direction of the quality claims, on real weights, through the console scripts (issue 24 item 2).

The shipped DAT-light x4 (official weights) is calibrated by ``2dq-calibrate`` on 24 of the 28 shipped
training images (8 LR patches 64x64, seed 0); the other 4 are the held-out check (HR crops and their
MATLAB-bicubic LR, laid out as a benchmark set for ``2dq-eval``; :mod:`toolchain.data.heldout`, the split of
``benchmarks/rotation_ablation.md``). Never the test sets. One module
fixture runs each calibration once; the tests assert on its table of held-out PSNRs (all of them in
every assertion message). Asserted, W4A4 unless said:

- DOBI beats MinMax (the paper's first claim: searched bounds over raw ranges);
- the exact transforms beyond 2DQuant together (per-channel weights, folded smoothing, shifts) beat DOBI;
- DQC validates its DOBI start (step 0) and every step on its own held-out patches and keeps the best:
  when a step beats the start, the kept loss is below the start's; when none does (measured here at
  this budget: the first step at DQC's default learning rate jumps from 0.173 to 0.501 and the next
  five stay above the start), the artifact is DOBI's bounds exactly, so its held-out PSNR equals
  DOBI's. Either way DQC never ends worse than DOBI on its held-out check;
- each option beyond 2DQuant alone beats its base: ``--smooth all`` and ``--rotate inputs`` beat DOBI; ``--granularity per-channel`` beats per-tensor DOBI at W4A8; ``--gptq``
  beats that per-channel W4A8 run without it.

Measured (helper-13; held-out PSNR minus its base in dB, this split, seeds 0 / 1 / 2 of the calibration
patches, the test runs seed 0; DOBI alone 22.137 / 22.047 / 22.040 dB, float 23.37 dB):

- ``--rotate inputs`` +0.44 / +0.64 / +0.53; ``--smooth all`` +0.06 / +0.19 / +0.17; ``--shifts``
  +0.05 / +0.07 / +0.05 (it makes the 2DQuant grid exact on an integer zero point and re-runs DOBI's
  search on that grid, so it also pays in quality); per-channel at W4A8 +0.26 / +0.30 / +0.25;
  ``--gptq`` on it +0.12 / +0.26 / +0.21 (at W4A4 on per-tensor DOBI: +0.26 / +0.02 / +0.13).
- Not asserted, because alone they do not pay reliably at this budget: ``--shifts`` (the +0.05 / +0.07 / +0.05
  above are an AMD EPYC's; on an Intel Xeon, where DOBI alone gives 22.209 / 22.115 / 22.084, -0.019 / -0.015 /
  +0.037, session 43: the gain is within what another CPU's float rounding moves DOBI's discrete search by),
  per-channel weights at W4A4
  +0.000 / +0.08 / +0.28 (activation error dominates at A4; the weight grids' gain shows at A8), and
  ``--smooth folded`` +0.05 / -0.00 / -0.07 (-0.09 and -0.15 at seeds 1, 2 with 32 patches; on top of
  per-channel weights +0.23 / +0.09 / +0.02, on top of per-channel + shifts +0.22 / +0.01 / -0.09):
  SmoothQuant's factors move the activations' outliers into the 4-bit weights, a trade DQC then learns.
  ``--smooth all`` adds the explicit input smoothing (``input`` alone -0.01 / +0.16 / +0.23).

Each calibrate + eval takes 10-25 s on one CPU thread (about 5 s of it starting the two processes); two run side
by side, one thread each (the fixture: 114 s on this project's two-core machine, 173 s one at a time with two
threads each; the seed-0 held-out PSNRs above are the same either way).
Budgets are small (8 calibration patches, 3 DQC steps): the claims are directions, not the numbers of
``benchmarks/dat_light_ptq.md`` (where 60 DQC steps on a GPU add 0.2-2.4 dB over DOBI).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolchain.data.heldout import make_heldout_split
from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_WEIGHTS

PATCHES = ("--patches", "8")
#: runs side by side, one torch thread each: a launch spends about 4 s importing on one core (torch, spandrel), and
#: two one-thread calibrations use two cores better than one two-thread calibration does
PROCESSES, THREADS = 2, ("--threads", "1")
DOBI = ("--method", "dobi")
DQC = ("--method", "2dquant", "--dqc-iters", "3", "--dqc-batch", "4", "--dqc-patch-size", "32",
       "--val-every", "1", "--val-patches", "8")
# run name -> 2dq-calibrate options (W4A4 from --bits 4 unless --a-bits says otherwise)
RUNS: dict[str, tuple[str, ...]] = {
    "minmax": ("--method", "minmax"),
    "dobi": DOBI,
    "beyond": (*DOBI, "--granularity", "per-channel", "--smooth", "folded", "--shifts"),
    "dqc": DQC,
    "smooth_all": (*DOBI, "--smooth", "all"),
    "rotate_inputs": (*DOBI, "--rotate", "inputs"),
    "dobi_w4a8": (*DOBI, "--a-bits", "8"),
    "per_channel_w4a8": (*DOBI, "--a-bits", "8", "--granularity", "per-channel"),
    "gptq_per_channel_w4a8": (*DOBI, "--a-bits", "8", "--granularity", "per-channel", "--gptq"),
}
# option alone -> its base: the same options without it
BEYOND_OPTIONS = [
    ("smooth_all", "dobi"),
    ("rotate_inputs", "dobi"),
    ("per_channel_w4a8", "dobi_w4a8"),
    ("gptq_per_channel_w4a8", "per_channel_w4a8"),
]


@dataclass(frozen=True)
class Run:
    psnr: float       # held-out PSNR-Y, dB
    seconds: float    # wall time of calibrate + eval
    sidecar: dict     # the artifact's JSON sidecar


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def _calibrate_and_eval(calib: Path, heldout: Path, tmp: Path, name: str, options: tuple[str, ...]) -> Run:
    start = time.perf_counter()
    artifact = tmp / f"{name}.safetensors"
    _run(_tool("2dq-calibrate"), "--calib-images", str(calib), "--bits", "4", *PATCHES, "--no-progress",
         "--out", str(artifact), *THREADS, *options)
    report = tmp / f"{name}_eval.json"
    _run(_tool("2dq-eval"), "--weights", str(DEFAULT_WEIGHTS), "--calib", str(artifact), "--data", str(heldout),
         "--sets", "Heldout", "--no-progress", "--json", str(report), *THREADS)
    (row,) = json.loads(report.read_text())["results"]
    return Run(row["psnr"], time.perf_counter() - start, json.loads(artifact.with_suffix(".json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every run of :data:`RUNS`, calibrated and evaluated once for the module's tests."""
    root = tmp_path_factory.mktemp("direction")
    calib, heldout = make_heldout_split(DEFAULT_CALIB_IMAGES, root)  # 24 calibrate, 4 held out
    with ThreadPoolExecutor(PROCESSES) as pool:
        futures = {name: pool.submit(_calibrate_and_eval, calib, heldout, root, name, options)
                   for name, options in RUNS.items()}
        return {name: future.result() for name, future in futures.items()}


def _summary(runs: dict[str, Run]) -> str:
    return "held-out PSNR (dB, seconds): " + ", ".join(
        f"{name} {run.psnr:.3f} ({run.seconds:.0f} s)" for name, run in runs.items())


@pytest.mark.slow
def test_dobi_beats_minmax(runs: dict[str, Run]) -> None:
    assert runs["dobi"].psnr > runs["minmax"].psnr, _summary(runs)


@pytest.mark.slow
def test_beyond_options_together_beat_dobi(runs: dict[str, Run]) -> None:
    assert runs["beyond"].psnr > runs["dobi"].psnr, _summary(runs)


@pytest.mark.slow
@pytest.mark.parametrize(("option", "base"), BEYOND_OPTIONS)
def test_each_beyond_option_beats_its_base(runs: dict[str, Run], option: str, base: str) -> None:
    assert runs[option].psnr > runs[base].psnr, f"{option} vs {base}: {_summary(runs)}"


@pytest.mark.slow
def test_dqc_never_ends_worse_than_dobi(runs: dict[str, Run]) -> None:
    summary = _summary(runs)
    dqc_record = _find(runs["dqc"].sidecar, "validations")
    losses = [row["val_loss"] for row in dqc_record["validations"]]
    assert dqc_record["validations"][0]["iteration"] == 0, dqc_record   # the DOBI start, validated
    assert dqc_record["best_val_loss"] == min(losses), (losses, summary)
    if dqc_record["best_iteration"] == 0:
        assert runs["dqc"].psnr == runs["dobi"].psnr, (losses, summary)   # DOBI's bounds kept: the dobi model
    else:
        assert min(losses) < losses[0], (losses, summary)


def _find(record: dict, key: str) -> dict:
    """The (nested) dict of the artifact's sidecar that holds ``key`` (DQC's result sits under the method)."""
    if key in record:
        return record
    for value in record.values():
        if isinstance(value, dict):
            found = _find(value, key)
            if found:
                return found
    return {}
