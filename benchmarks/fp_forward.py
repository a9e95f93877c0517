"""FP forward time of SwinIR-light x4 on this machine: 64x64 and 256x256 LR, whole and tiled.

Random weights (the architecture's cost does not depend on the values). Medians of repeated runs
after a warm-up, single process, ``torch.set_num_threads(threads)``. Writes a markdown table.

    python benchmarks/fp_forward.py --threads 2 --repeats 5 --out benchmarks/fp_forward.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from toolchain.inference import TileSpec, tiled_upscale, upscale_padded
from random_models import swinir_light
from toolchain.models import info_of


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fp_forward.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = swinir_light(4)
    run = lambda x: model(x)  # noqa: E731
    rows = []
    with torch.inference_mode():
        for size in (64, 256):
            lr = torch.rand(1, 3, size, size)
            whole = median_ms(lambda: upscale_padded(run, lr, 4, info_of(model).multiple_of), args.repeats)
            spec = TileSpec(args.tile, args.overlap, batch=4)
            tiled = median_ms(lambda: tiled_upscale(run, lr, 4, spec, info_of(model).multiple_of), args.repeats)
            rows.append((size, whole, tiled))
    lines = [
        "# FP forward time, SwinIR-light x4 (PyTorch, CPU)",
        "",
        f"Command: `python benchmarks/fp_forward.py --threads {args.threads} --repeats {args.repeats}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}. Median of {args.repeats} runs after a warm-up.",
        "",
        f"| LR input | whole image (ms) | tiled {args.tile}px, overlap {args.overlap}, batch 4 (ms) |",
        "|---|---|---|",
    ]
    lines += [f"| {s}x{s} | {w:.0f} | {t:.0f} |" for s, w, t in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
