"""Where an ONNX Runtime engine spends its time: ORT's own profiler, per op type and per node group.

    python benchmarks/ort_profile.py /tmp/ortspeed/ours-w8a8.ort.onnx /tmp/ortspeed/fp32_plain.onnx \\
        --runs 4 --threads 1 --group MatMulIntegerToFloat

Runs each model ``--runs`` times on one random tile of the model's input size (after one warm-up run)
with ``SessionOptions.enable_profiling`` and prints the mean milliseconds per run of each op type, and,
for ``--group OP``, of that op's nodes grouped by their name with block indices removed (e.g. all
``attn.qkv/MatMul`` nodes together). Numbers are per run of the whole model on this machine.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

BLOCK_INDEX = re.compile(r".*blocks[./]\d+[./]")


def profile(path: Path, runs: int, threads: int, scratch: Path) -> list[dict]:
    """The kernel events of ``runs`` timed runs (one warm-up run before them is dropped)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    shape = [d if isinstance(d, int) else 1 for d in model_input.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(runs + 1):
        session.run(None, {model_input.name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return kernels[len(kernels) // (runs + 1):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="ONNX / ORT engine files")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--group", action="append", default=[], metavar="OP", help="break OP down by node name")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="2dq-ortprof-") as scratch:
        for path in args.models:
            kernels = profile(path, args.runs, args.threads, Path(scratch))
            by_op = collections.Counter()
            for event in kernels:
                by_op[event["args"]["op_name"]] += event["dur"] / 1000 / args.runs
            print(f"{path}: {sum(by_op.values()):.1f} ms per run ({args.threads} thread(s), {args.runs} runs)")
            print("  " + ", ".join(f"{op} {ms:.1f}" for op, ms in by_op.most_common(args.top)))
            for op in args.group:
                groups, counts = collections.Counter(), collections.Counter()
                for event in kernels:
                    if event["args"]["op_name"] == op:
                        name = BLOCK_INDEX.sub("", event["name"][:-len("_kernel_time")])
                        groups[name] += event["dur"] / 1000 / args.runs
                        counts[name] += 1
                print(f"  {op}: " + ", ".join(f"{name} x{counts[name] // args.runs} {ms:.1f}"
                                              for name, ms in groups.most_common(args.top)))


if __name__ == "__main__":
    main()
