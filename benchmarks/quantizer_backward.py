"""The quantizer's straight-through backward: today's (``toolchain/quant/grid.py``) against the masks written out.

Until session 38 ``_ClipRoundScale.backward`` built boolean masks (below, above, the two ties, inside), turned
them into floats and multiplied; it now weighs each clip end with one ``sign`` (0 past it, 1/2 on it, 1
inside). :func:`masked_backward` is the old form, kept here as the reference. For each chosen block of a
calibrated model this script times one block-reconstruction step (forward, MSE to the block's own float
output, learned-rounding regularizer, backward; the trainable set of ``calib/reconstruct.py``: every
activation bound, the rounding logits of every weight) with each backward, alternated in one process
(``--rounds`` rounds of ``--steps`` steps, the fastest round reported), and checks that both give the same
gradient for every trainable tensor, bit for bit.

Needs the float checkpoint and an artifact calibrated on it (default: the committed DAT-light x4 W4A4 row)::

    python benchmarks/quantizer_backward.py --units 0,1 --threads 2 \\
        --json benchmarks/results/quantizer_backward.json --markdown benchmarks/quantizer_backward_table.md
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from calib.artifact import load_quantized_model
from calib.feature_taps import feature_modules
from calib.learned_rounding import attach_rounding, beta_at, weight_layers
from calib.reconstruct import _first_tensor, _quantized_inputs
from toolchain.allocator import keep_freed_memory
from toolchain.files import atomic_path
from toolchain.quant import quantizers
from toolchain.quant.grid import _ClipRoundScale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotation_ablation import cpu_name  # noqa: E402

log = logging.getLogger("quantizer_backward")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def masked_backward(ctx, grad: torch.Tensor):
    """The backward of ``_ClipRoundScale`` before session 38: boolean masks, made float, multiplied."""
    x, step, low, high = ctx.saved_tensors
    need_x, need_step, need_low, need_high = ctx.needs_input_grad
    below, above = x < low, x > high
    tie_low, tie_high = x == low, x == high
    grad_x = grad_step = grad_low = grad_high = None
    if need_x:
        grad_x = grad * (~(below | above | tie_low | tie_high) + 0.5 * (tie_low | tie_high))
    if need_step:
        t = torch.clamp(x, low, high).div_(step)
        grad_step = (grad * torch.round(t).sub_(t)).sum_to_size(step.shape)
    if need_low:
        grad_low = (grad * (below + 0.5 * tie_low)).sum_to_size(low.shape)
    if need_high:
        grad_high = (grad * (above + 0.5 * tie_high)).sum_to_size(high.shape)
    return grad_x, grad_step, grad_low, grad_high


BACKWARDS: dict[str, Callable] = {"masked (before)": masked_backward, "sign (now)": _ClipRoundScale.backward}


@contextmanager
def use_backward(fn: Callable) -> Iterator[None]:
    """``_ClipRoundScale.backward`` is ``fn`` inside, today's again after."""
    saved = _ClipRoundScale.__dict__["backward"]
    _ClipRoundScale.backward = staticmethod(fn)
    try:
        yield
    finally:
        _ClipRoundScale.backward = saved


def unit_step(model: nn.Module, path: str, unit: nn.Module, lr: torch.Tensor) -> tuple[Callable, list, Callable]:
    """One reconstruction step of ``unit`` on ``lr`` (forward, MSE to the block's own float output, learned-rounding
    regularizer, backward: the trainable set of ``calib/reconstruct.py``, every activation bound and the rounding
    logits of every weight, made trainable here), those tensors (their gradients after a step), and a cleanup that
    detaches the roundings and freezes them again."""
    (args, kwargs), = _quantized_inputs(model, unit, [lr], torch.device("cpu"))
    layers = weight_layers(unit, path)
    roundings = attach_rounding(layers)
    rounded = {id(layer.weight_quantizer) for layer in layers.values()}
    params = [p for q in quantizers(unit).values() if id(q) not in rounded for p in (q.lower, q.upper)]
    params += [r.v for r in roundings.values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        target = _first_tensor(unit(*args, **kwargs))

    def step() -> None:
        for p in params:
            p.grad = None
        out = _first_tensor(unit(*args, **kwargs))
        loss = F.mse_loss(out, target) + 0.01 * sum(r.regularizer(beta_at(100, 200)) for r in roundings.values())
        loss.backward()

    def cleanup() -> None:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer in layers.values():
            layer.weight_quantizer.rounding = None
    return step, params, cleanup


def time_unit(model: nn.Module, path: str, unit: nn.Module, lr: torch.Tensor, rounds: int, steps: int) -> dict:
    """Seconds per reconstruction step of ``unit`` with each backward, and whether their gradients agree."""
    run_step, params, cleanup = unit_step(model, path, unit, lr)

    def step(keep: bool = False) -> list[torch.Tensor]:
        run_step()
        return [p.grad.clone() if keep else None for p in params]

    grads = {}
    for name, fn in BACKWARDS.items():
        with use_backward(fn):
            grads[name] = step(keep=True)
    first, second = grads.values()
    identical = all(torch.equal(a, b) for a, b in zip(first, second))
    times = {name: [] for name in BACKWARDS}
    for _ in range(rounds):
        for name, fn in BACKWARDS.items():
            with use_backward(fn):
                step()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[name].append((time.perf_counter() - start) / steps)
    cleanup()
    best = {name: min(values) for name, values in times.items()}
    return {"unit": path, "kind": type(unit).__name__, "trainable_tensors": len(params),
            "s_per_step": best, "speedup": best["masked (before)"] / best["sign (now)"], "identical": identical}


def markdown(result: dict) -> str:
    lines = ["| block | kind | masked (before) s/step | sign (now) s/step | speed-up | gradients identical |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        times = row["s_per_step"]
        lines.append(f"| {row['unit']} | {row['kind']} | {times['masked (before)']:.3f} | {times['sign (now)']:.3f} "
                     f"| {row['speedup']:.2f}x | {'yes' if row['identical'] else 'NO'} |")
    setup = result["setup"]
    lines.append("")
    lines.append(f"{setup['batch']} patches of {setup['tile']}x{setup['tile']}, {setup['threads']} thread(s), fastest "
                 f"of {setup['rounds']} rounds of {setup['steps']} steps, glibc thresholds raised: "
                 f"{setup['allocator_raised']}; {result['machine']}.")
    return "\n".join(lines) + "\n"


def add_step_arguments(parser: argparse.ArgumentParser, threads: int, steps: int) -> None:
    """The options of the step benchmarks (this one, ``compiled_step.py``): the model, the blocks, the timing."""
    parser.add_argument("--weights", default=str(SHARED / "models/DAT-light/DAT_light_x4.pth"),
                        help="float checkpoint the artifact was calibrated on")
    parser.add_argument("--artifact", default=str(HERE / "artifacts/dat_light_x4_w4a4.safetensors"))
    parser.add_argument("--units", default="0,1", help="comma-separated indices of the model's blocks to time")
    parser.add_argument("--batch", type=int, default=4, help="patches per step")
    parser.add_argument("--tile", type=int, default=64, help="LR patch side")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the table here")


def load_blocks(parser: argparse.ArgumentParser, options: argparse.Namespace) -> tuple[nn.Module, list, list[int]]:
    """The calibrated model of ``--weights`` / ``--artifact``, its blocks holding quantizers and the chosen indices
    (``--units``); raises glibc's thresholds (whether it took: ``options.allocator_raised``) and sets ``--threads``."""
    for flag, value in (("--weights", options.weights), ("--artifact", options.artifact)):
        if not Path(value).is_file():
            parser.error(f"{flag}: no file at {value}")
    options.allocator_raised = keep_freed_memory()
    torch.set_num_threads(options.threads)
    model = load_quantized_model(options.weights, options.artifact).eval()
    units = [(path, module) for path, module in feature_modules(model, "") if quantizers(module)]
    try:
        chosen = [int(i) for i in options.units.split(",") if i]
    except ValueError:
        parser.error(f"--units: expected comma-separated integers, got {options.units!r}")
    if any(not 0 <= i < len(units) for i in chosen):
        parser.error(f"--units: the model has blocks 0..{len(units) - 1}, got {options.units}")
    return model, units, chosen


def write_outputs(options: argparse.Namespace, result: dict, table: str) -> None:
    """Print the table; write the JSON and the table where ``--json`` / ``--markdown`` say (atomically)."""
    print(table, end="")
    for target, text in ((options.json, json.dumps(result, indent=1) + "\n"), (options.markdown, table)):
        if target:
            with atomic_path(Path(target)) as tmp:
                tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, threads=2, steps=5)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model, units, chosen = load_blocks(parser, options)
    raised = options.allocator_raised
    lr = torch.rand(options.batch, 3, options.tile, options.tile, generator=torch.Generator().manual_seed(0))
    rows = []
    for i in chosen:
        path, unit = units[i]
        row = time_unit(model, path, unit, lr, options.rounds, options.steps)
        log.info("%s", row)
        rows.append(row)
    result = {"rows": rows, "machine": f"{cpu_name()}, {platform.python_version()}, torch {torch.__version__}",
              "setup": {"weights": Path(options.weights).name, "artifact": Path(options.artifact).name,
                        "batch": options.batch, "tile": options.tile, "threads": options.threads,
                        "rounds": options.rounds, "steps": options.steps, "allocator_raised": raised}}
    write_outputs(options, result, markdown(result))
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
