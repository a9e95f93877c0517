"""Where an OpenVINO engine spends its time: the CPU plugin's performance counters, per node type and kernel.

    python benchmarks/ov_profile.py /tmp/cpu_speed44/dat-light_w8a8.ov.xml /tmp/cpu_speed44/dat-light_fp32_passes.onnx \\
        --runs 5 --threads 1 --group Subgraph

The OpenVINO counterpart of ``ort_profile.py``. Compiles each model (IR or ONNX) for the CPU with
``PERF_COUNT`` and ``INFERENCE_PRECISION_HINT=f32`` (the precision our benchmarks time; bf16 would change
the float kernels), runs it ``--runs`` times on one random input of the model's shape after two warm-up
runs, and prints the mean milliseconds per run by (node type, kernel) — the kernel names say which
instruction set runs it (``brgemm_avx512_amx_i8``: AMX int8; ``jit_avx512_f32``: AVX-512 float;
``ref_*``: reference C++). ``--group TYPE`` breaks that node type down by node name with block indices
removed. The counters add the plugin's own time per node, so the total is above a plain run's latency.
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import numpy as np

BLOCK_INDEX = re.compile(r"\d+")


def profile(path: Path, runs: int, threads: int) -> list[tuple[str, str, str, float]]:
    """(node type, kernel, node name, milliseconds) of every executed node, summed over ``runs`` runs."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).get_partial_shape()]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(2):
        request.infer({0: x})
    nodes: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            nodes[(info.node_type, info.exec_type, info.node_name)] += info.real_time.total_seconds() * 1e3
    return [(*key, ms) for key, ms in nodes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="OpenVINO IR (.xml) or ONNX files")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--group", action="append", default=[], metavar="TYPE", help="break TYPE down by node name")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.models:
        nodes = profile(path, args.runs, args.threads)
        by_kernel: collections.Counter = collections.Counter()
        for node_type, kernel, _, ms in nodes:
            by_kernel[f"{node_type} ({kernel})"] += ms / args.runs
        total = sum(by_kernel.values())
        print(f"{path}: {total:.1f} ms per run by the counters ({args.threads} thread(s), {args.runs} runs)")
        print("| node type (kernel) | ms per run | share |\n|---|---:|---:|")
        for name, ms in by_kernel.most_common(args.top):
            print(f"| {name} | {ms:.1f} | {100 * ms / total:.1f}% |")
        for group in args.group:
            names: collections.Counter = collections.Counter()
            for node_type, kernel, node, ms in nodes:
                if node_type == group:
                    names[f"{BLOCK_INDEX.sub('#', node)} ({kernel})"] += ms / args.runs
            print(f"  {group}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in names.most_common(args.top)))


if __name__ == "__main__":
    main()
