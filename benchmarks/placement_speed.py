"""Benchmark: what generic placement costs (issue 19 item 7).

1. the traced forward that finds the sites (:func:`toolchain.quant.placement.find_placement`);
2. the float model against the same model with every quantizer placed and disabled (``float_mode``:
   QuantLinear / QuantConv2d wrappers and the routed matmul calls, no fake quantization), medians of
   interleaved rounds at one thread, on a 64x64 LR tile and a 128x128 LR image; outputs must be
   bit-identical (checked);
3. ``2dq-calibrate --method dobi`` end to end on 32 LR patches 64x64 (subprocess, wall time).

    python benchmarks/placement_speed.py --weights ../shared/models/DAT-light/DAT_light_x4.pth \\
        --out benchmarks/placement_speed.md
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ort_speed import time_rounds
from toolchain import load_model
from toolchain.models import example_input, info_of
from toolchain.quant import QuantConfig, float_mode, quantize_model, quantizers
from toolchain.quant.placement import find_placement

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=[str(SHARED / "models/DAT-light/DAT_light_x4.pth")])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calib-images", default=str(SHARED / "datasets/train"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    rows, dobi_rows = [], []
    for weights in args.weights:
        model = load_model(weights)
        info = info_of(model)
        example = example_input(model)
        start = time.perf_counter()
        placement = find_placement(model, example)
        trace = time.perf_counter() - start
        placed = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=4))
        count = len(quantizers(placed))
        for side in (64, 128):
            x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            with torch.no_grad(), float_mode(placed):
                same = torch.equal(model(x), placed(x))
                medians = time_rounds({"fp": lambda: model(x), "placed": lambda: placed(x)}, args.rounds)
            rows.append(f"| {info.arch} x{info.scale} | {count} | {side}x{side} | {1000 * medians['fp']:.0f} | "
                        f"{1000 * medians['placed']:.0f} | {100 * (medians['placed'] / medians['fp'] - 1):+.1f}% | "
                        f"{'yes' if same else 'NO'} | {trace:.2f} |")
            print(rows[-1], file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(Path(sys.executable).with_name("2dq-calibrate")), "--weights", weights, "--calib-images",
                   args.calib_images, "--bits", "4", "--method", "dobi", "--out", f"{tmp}/dobi.safetensors",
                   "--no-progress", "-q", "--threads", "2"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            dobi_rows.append(f"| {info.arch} x{info.scale} | {count} | 32 x 64x64 | {time.perf_counter() - start:.1f} |")
            print(dobi_rows[-1], file=sys.stderr)
        del placement
    lines = [
        "# Placement speed (generic placement, issue 19 item 7)", "",
        f"Command: `python benchmarks/placement_speed.py --weights {' '.join(args.weights)} --out {args.out}` (paths as given)", "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}); load average at start {load[0]:.2f}.", "",
        "## Forward with every quantizer placed and disabled, against the float model", "",
        "One thread, medians of interleaved rounds "
        f"({args.rounds}); the outputs must be bit-identical. Target: placement costs at most 10%.", "",
        "| model | quantizers | LR input | FP (ms) | placed, disabled (ms) | overhead | identical | trace (s) |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "## DOBI end to end (`2dq-calibrate --method dobi --bits 4`, two threads, wall time)", "",
        "Target: at most 60 s on this 2-core machine.", "",
        "| model | quantizers | patches | seconds |", "|---|---|---|---|", *dobi_rows, ""]
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
