"""Benchmark: the quantizer compiled (``toolchain/quant/compiled.py``) against eager, in the training steps it serves.

For the chosen blocks of a calibrated model this times one block-reconstruction step (forward, MSE to the block's
own float output, learned-rounding regularizer, backward; the trainable set of ``calib/reconstruct.py``), and one
full-model step as DQC takes it (forward of the whole model, MSE to the float model's output, backward to every
bound), with the quantizer's kernels eager (``TWODQ_COMPILE=0``) and compiled, alternated in one process
(``--rounds`` rounds of ``--steps`` steps, the fastest round reported; the compiling happens in a warm-up step
before the rounds and is timed apart). It also reports how far the two paths' gradients are apart: the bounds'
gradients are float32 sums of the same terms added in another order.

Needs the float checkpoint and an artifact calibrated on it (default: the committed DAT-light x4 W4A4 row)::

    python benchmarks/compiled_step.py --units 0,1 --threads 1 --json benchmarks/results/compiled_step.json
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.quant import bound_parameters, float_mode
from toolchain.quant.compiled import ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantizer_backward import add_step_arguments, load_blocks, unit_step, write_outputs  # noqa: E402
from rotation_ablation import cpu_name  # noqa: E402

log = logging.getLogger("compiled_step")
SWITCHES = {"eager": "0", "compiled": "1"}


def _gradients(step: Callable[[], None], params: list[torch.Tensor]) -> list[torch.Tensor]:
    step()
    return [p.grad.clone() for p in params]


@contextmanager
def switch_restored() -> Iterator[None]:
    """``TWODQ_COMPILE`` as it was after the block, however the block set it."""
    saved = os.environ.get(ENV)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


@switch_restored()
def compare(step: Callable[[], None], params: list[torch.Tensor], rounds: int, steps: int) -> dict:
    """Seconds per step with each switch (fastest round), the first (compiling) step's seconds, and the largest
    gradient difference relative to the gradient tensor's largest magnitude."""
    grads, first = {}, {}
    for name, switch in SWITCHES.items():
        os.environ[ENV] = switch
        start = time.perf_counter()
        grads[name] = _gradients(step, params)
        first[name] = time.perf_counter() - start
    relative = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(grads["compiled"], grads["eager"]))
    times: dict[str, list[float]] = {name: [] for name in SWITCHES}
    for _ in range(rounds):
        for name, switch in SWITCHES.items():
            os.environ[ENV] = switch
            step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    best = {name: min(values) for name, values in times.items()}
    return {"s_per_step": best, "speedup": best["eager"] / best["compiled"], "first_step_s": first,
            "max_relative_gradient_difference": relative, "trainable_tensors": len(params)}


def model_step(model: nn.Module, lr: torch.Tensor) -> tuple[Callable, list]:
    """A full-model distillation step (DQC's output term) and every bound."""
    with torch.no_grad(), float_mode(model):
        target = model(lr)
    params = bound_parameters(model)

    def step() -> None:
        for p in params:
            p.grad = None
        F.mse_loss(model(lr), target).backward()
    return step, params


def run(model: nn.Module, blocks: list[tuple[str, nn.Module]], lr: torch.Tensor, rounds: int, steps: int,
        full: bool) -> list[dict]:
    """One row per block of ``blocks`` (and the full model with ``full``): :func:`compare` of its step."""
    rows = []
    for p in model.parameters():
        p.requires_grad_(False)
    for path, unit in blocks:
        step, params, cleanup = unit_step(model, path, unit, lr)
        row = {"step": f"reconstruction, {path}", "kind": type(unit).__name__,
               **compare(step, params, rounds, steps)}
        cleanup()
        log.info("%s", row)
        rows.append(row)
    if full:
        step, params = model_step(model, lr)
        for p in params:
            p.requires_grad_(True)
        row = {"step": "full model (DQC)", "kind": type(model).__name__, **compare(step, params, rounds, steps)}
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        log.info("%s", row)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = ["| step | eager s/step | compiled s/step | speed-up | first (compiling) step, s | max gradient difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        t, first = row["s_per_step"], row["first_step_s"]
        lines.append(f"| {row['step']} | {t['eager']:.3f} | {t['compiled']:.3f} | {row['speedup']:.2f}x | "
                     f"{first['compiled']:.1f} | {row['max_relative_gradient_difference']:.1e} |")
    setup = result["setup"]
    lines += ["", f"{setup['batch']} patches of {setup['tile']}x{setup['tile']}, {setup['threads']} thread(s), fastest of "
              f"{setup['rounds']} rounds of {setup['steps']} steps; gradient difference: the largest over the trainable "
              f"tensors of max|compiled - eager| / max|eager|; {result['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, threads=1, steps=3)
    parser.add_argument("--no-full", action="store_true", help="skip the full-model (DQC) step")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model, units, chosen = load_blocks(parser, options)
    lr = torch.rand(options.batch, 3, options.tile, options.tile, generator=torch.Generator().manual_seed(0))
    rows = run(model, [units[i] for i in chosen], lr, options.rounds, options.steps, not options.no_full)
    result = {"rows": rows, "machine": f"{cpu_name()}, {platform.python_version()}, torch {torch.__version__}",
              "setup": {"weights": Path(options.weights).name, "artifact": Path(options.artifact).name,
                        "batch": options.batch, "tile": options.tile, "threads": options.threads,
                        "rounds": options.rounds, "steps": options.steps}}
    write_outputs(options, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
