"""DQC speed on this machine: steps per second, peak memory, and where the time goes.

Builds the model (SwinIR-light x4 with the official light configuration and random weights by
default, since no trained SwinIR-light checkpoint exists here; or ``--weights`` for a real
checkpoint, e.g. NGswin x2), attaches W4A4 quantizers, sets DOBI bounds from a few training
patches, then times :func:`calib.dqc.distill` for each ``--threads`` value and profiles a few steps
with ``torch.profiler``.

    python benchmarks/dqc_speed.py --iters 20 --batch 4 --patch-size 48 --threads 1,2 --json runs/dqc_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from calib.dobi import calibrate_dobi
from calib.dqc import DQCConfig, distill
from calib.observers import batch_forward_loop
from toolchain.models import info_of
from toolchain.data.patches import PatchDataset, sample_patches, split_train_val
from toolchain.quant import QuantConfig, bounds_state, load_bounds, quantize_model


def build_model(weights: str | None, scale: int) -> tuple[torch.nn.Module, str]:
    if weights:
        from toolchain import load_model

        model = load_model(weights)
        return model, f"{info_of(model).arch} x{info_of(model).scale} ({Path(weights).name})"
    from random_models import swinir_light

    torch.manual_seed(0)
    return swinir_light(scale), f"SwinIR-light x{scale} (official light config, random weights)"


def rss_mib() -> float:
    """Current resident memory of this process (Linux ``/proc``), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_steps(model, data, config: DQCConfig, steps: int, rows: int) -> str:
    """``torch.profiler`` table (by self CPU time) of ``steps`` DQC steps."""
    from torch.profiler import ProfilerActivity, profile

    short = DQCConfig(**{**config.to_dict(), "iters": steps, "val_every": 0, "checkpoint_every": 0})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        distill(model, data, short, progress=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="float checkpoint (default: SwinIR-light with random weights)")
    parser.add_argument("--scale", type=int, default=4, help="scale of the random-weight SwinIR-light")
    parser.add_argument("--images", default="../shared/datasets/train", help="training images")
    parser.add_argument("--iters", type=int, default=20, help="timed DQC steps per thread count")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to time")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (0: none)")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, described = build_model(args.weights, args.scale)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    train, val = split_train_val(args.images, 0.1, seed=0)
    calib_lr, _ = sample_patches(train, 8, args.patch_size, info_of(model).scale, seed=0)
    calibrate_dobi(model, batch_forward_loop(calib_lr, 8, progress=False))
    dobi = bounds_state(model)
    data = PatchDataset(train, args.patch_size, info_of(model).scale, seed=1, length=(args.iters + 8) * args.batch)
    config = DQCConfig(iters=args.iters, batch=args.batch, val_every=0, checkpoint_every=0)
    results = {"model": described, "w_bits": 4, "a_bits": 4, "batch": args.batch, "patch_size": args.patch_size,
               "iters": args.iters, "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
               "torch": torch.__version__, "runs": []}
    rss_before = rss_mib()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load_bounds(model, dobi)
        distill(model, data, DQCConfig(**{**config.to_dict(), "iters": 2}), progress=False)  # warm-up
        load_bounds(model, dobi)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = distill(model, data, config, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        # CPU seconds (all threads) per step: what the step costs, whatever else runs on the machine
        run = {"threads": threads, "seconds": round(seconds, 2), "it_per_s": round(args.iters / seconds, 3),
               "cpu_s_per_it": round(cpu_seconds / args.iters, 2),
               "first_losses": result.train_losses[0], "last_losses": result.train_losses[-1]}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results["rss_before_dqc_mib"] = round(rss_before, 1)
    results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    results["load_average_end"] = round(os.getloadavg()[0], 1)
    if args.profile_steps:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        load_bounds(model, dobi)
        results["profile"] = profile_steps(model, data, config, args.profile_steps, args.profile_rows)
        print(results["profile"])
    print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
