"""Benchmark: model-level DOBI (one streamed pass) against the plain 100-pass search.

What it measures, on one model and the calibration patches (default: 32 LR patches 64x64 from
../shared/datasets/train, seed 0):

1. the float forward pass alone, and :func:`calib.dobi.calibrate_dobi` (forward + streamed
   histograms + scoring + exact weight searches), then a breakdown of the DOBI cost;
2. on a subset of activation quantizers (``--per-role`` of every role, evenly spaced), whose full
   data are captured: the plain search (100 fake-quant passes over the whole tensor in a Python
   loop, first minimum kept) against the streamed path (histogram updates over the same batches +
   scoring). Both time only the search, not the forward. It checks that both choose the same
   candidate (within one step), at the model's bits and at ``--extra-bits``;
3. the plain search over every activation quantizer, extrapolated from 2 by element count (the
   plain search is linear in the data size: it cannot run here in full);
4. ``2dq-calibrate --method dobi`` end to end (subprocess): CPU and wall time, peak resident memory.

Results go to a markdown file (``--out``). Examples::

    python benchmarks/dobi_speed.py --weights ../shared/models/NGswin/NGswin_x2.pth --out benchmarks/dobi_speed.md
    python benchmarks/dobi_speed.py --random-swinir-light 4 --out /tmp/dobi_swinir.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.dobi import calibrate_dobi, candidate_bounds, search_histogram
from calib.observers import StreamingHistogram, batch_forward_loop, observe
from toolchain import load_model
from toolchain.models import info_of
from toolchain.data.patches import list_images, sample_patches
from toolchain.quant import QuantConfig, float_mode, quantize_model, quantizers
from toolchain.quant.grid import fake_quantize


def plain_search(x: torch.Tensor, bits: int, one_sided: bool, symmetric: bool, n: int = 100) -> int:
    """Index of the best of the DOBI candidates, each scored by a full fake-quant pass (reference)."""
    cand = candidate_bounds(x.min().double(), x.max().double(), bits, torch.tensor(one_sided), symmetric, n)
    best, chosen = math.inf, -1
    for i in range(n):
        q = fake_quantize(x, cand.lower[i].float(), cand.upper[i].float(), bits, symmetric)
        error = float((x - q).double().square().sum())
        if error < best:
            best, chosen = error, i
    return chosen


def pick_subset(model, per_role: int) -> list[str]:
    by_role: dict[str, list[str]] = {}
    for name, q in quantizers(model).items():
        if q.kind == "activation":
            by_role.setdefault(q.role, []).append(name)
    chosen = []
    for names in by_role.values():
        k = min(per_role, len(names))
        chosen += [names[round(j * (len(names) - 1) / max(k - 1, 1))] for j in range(k)]
    return chosen


_MEASURE = (  # run in a fresh interpreter: RUSAGE_CHILDREN then covers exactly one child
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "use = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps([time.perf_counter() - start, use.ru_utime + use.ru_stime, use.ru_maxrss]))\n"
)


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[Took, float]:
    """Time and peak resident memory (MiB) of ``command``, the only child of a fresh wrapper."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall, cpu, peak_kib = json.loads(done.stdout.strip().splitlines()[-1])
    return Took(wall, cpu), peak_kib / 1024


def float_forward_only(args: argparse.Namespace) -> None:
    """The memory baseline: decode the images, sample the patches, run the float model over them."""
    model = load_model(args.weights)
    lr, _ = sample_patches(list_images(args.images), args.patches, args.patch_size, info_of(model).scale, 0)
    with torch.no_grad():
        batch_forward_loop(lr, args.batch_size, progress=False)(model)


@dataclass(frozen=True)
class Took:
    """Wall-clock and process CPU seconds of one call. CPU time is what the speed-ups use: the cores
    are shared with other jobs, and with one torch thread CPU time is the work done."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.cpu:.1f} s ({self.wall:.1f} s)"


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, Took(time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="float checkpoint (real weights preferred)")
    source.add_argument("--random-swinir-light", type=int, metavar="SCALE",
                        help="SwinIR-light of this scale with random weights (seed 0)")
    parser.add_argument("--images", default="../shared/datasets/train")
    parser.add_argument("--patches", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--extra-bits", default="2,8", help="more bit widths for the agreement check")
    parser.add_argument("--per-role", type=int, default=2, help="subset: quantizers per role")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--float-forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.float_forward_only:
        float_forward_only(args)
        return
    load_start = os.getloadavg()
    lines: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="dobi_speed_"))

    if args.weights:
        weights = Path(args.weights)
        model = load_model(weights)
        source = f"`{weights}` (real weights)"
    else:
        from safetensors.torch import save_file

        from random_models import swinir_light

        model = swinir_light(args.random_swinir_light)
        weights = tmp / f"swinir_light_x{args.random_swinir_light}_random.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        source = f"SwinIR-light x{args.random_swinir_light}, random weights (seed 0; no trained checkpoint here)"
    config = QuantConfig(w_bits=args.bits, a_bits=args.bits)
    quantize_model(model, config)
    images = list_images(args.images)
    (lr, _), t_patches = timed(lambda: sample_patches(images, args.patches, args.patch_size, info_of(model).scale, 0))
    loop = batch_forward_loop(lr, args.batch_size, progress=False)
    print(f"model {info_of(model).arch} x{info_of(model).scale}, {len(quantizers(model))} quantizers, patches {tuple(lr.shape)}",
          file=sys.stderr)

    # 1. model level
    with float_mode(model), torch.no_grad():
        _, t_forward = timed(lambda: loop(model))
    results, t_dobi = timed(lambda: calibrate_dobi(model, loop))
    hists: dict[str, StreamingHistogram] = {}
    _, t_observe = timed(lambda: observe(model, loop, lambda q: hists.setdefault(q.name, StreamingHistogram())
                                         if q.kind == "activation" else (lambda *_: None)))
    act = {name: q for name, q in quantizers(model).items() if q.kind == "activation"}
    _, t_score = timed(lambda: [search_histogram(hists[n], q.bits, "auto", q.symmetric, role=q.role)
                                for n, q in act.items()])
    total_elements = sum(h.count for h in hists.values())
    print(f"forward {t_forward}, dobi {t_dobi}, observe {t_observe}, score {t_score}",
          file=sys.stderr)

    # 2. subset: plain vs streamed on the same captured activations
    subset = pick_subset(model, args.per_role)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in subset}
    observe(model, loop, lambda q: (lambda _, x: captured[q.name].append(x.detach().clone()))
            if q.name in captured else (lambda *_: None))
    extra_bits = [int(b) for b in args.extra_bits.split(",") if b.strip()]
    rows, agree, t_plain_sum, t_stream_sum, subset_elements = [], [], 0.0, 0.0, 0
    for name in subset:
        q = act[name]
        data = torch.cat([t.reshape(-1) for t in captured[name]])
        subset_elements += data.numel()

        def streamed(bits):
            hist = StreamingHistogram()
            for t in captured[name]:
                hist.update(t)
            return search_histogram(hist, bits, "auto", role=q.role)

        result, t_stream = timed(lambda: streamed(args.bits))
        one_sided = result.mode == "upper"
        index, t_plain = timed(lambda: plain_search(data, args.bits, one_sided, q.symmetric))
        t_plain_sum += t_plain.cpu
        t_stream_sum += t_stream.cpu
        deltas = {args.bits: int(result.index) - index}
        assert int(results[name].index) == int(result.index), name  # the model-level pass saw the same data
        for bits in extra_bits:
            other = streamed(bits)
            deltas[bits] = int(other.index) - plain_search(data, bits, other.mode == "upper", bits == 8)
        agree += list(deltas.values())
        rows.append(f"| `{name}` | {q.role} | {data.numel() / 1e6:.2f} | {result.mode} | {t_plain.cpu:.2f} | "
                    f"{t_stream.cpu * 1000:.0f} | {t_plain.cpu / t_stream.cpu:.0f}x | "
                    + ", ".join(f"{b}b: {d:+d}" for b, d in deltas.items()) + " |")
        print(rows[-1], file=sys.stderr)
        captured[name] = []

    plain_total = t_plain_sum / subset_elements * total_elements
    dobi_cost = t_dobi.cpu - t_forward.cpu

    # 4. end to end, and the float forward alone for the memory baseline (each child measured alone)
    cli_lines: list[str] = []
    if not args.skip_cli:
        out = tmp / "w4a4.safetensors"
        threads = ["--threads", str(torch.get_num_threads())]
        command = ["2dq-calibrate", "--weights", str(weights), "--calib-images", args.images, "--bits", str(args.bits),
                   "--patches", str(args.patches), "--patch-size", str(args.patch_size), "--out", str(out),
                   *threads, "--no-progress", "-q"]
        took, peak = measure(command)
        # glibc raises its mmap threshold as large blocks are freed and then keeps freed heap memory
        # mapped; a fixed threshold shows how much of the peak is DOBI's own data
        fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
        fixed_took, fixed_peak = measure(command, fixed)
        forward_only = [sys.executable, __file__, "--float-forward-only", "--weights", str(weights), "--images",
                        args.images, "--patches", str(args.patches), "--patch-size", str(args.patch_size),
                        "--batch-size", str(args.batch_size), *threads, "--out", "-"]
        float_took, float_peak = measure(forward_only)
        float_fixed_took, float_fixed_peak = measure(forward_only, fixed)
        shown = " ".join(command).replace(str(weights), args.weights or "SWINIR_LIGHT_RANDOM.safetensors")
        shown = shown.replace(str(out), "run/w4a4.safetensors")
        cli_lines = [
            "| what | CPU time (wall) | peak RSS |",
            "|---|---|---|",
            f"| `2dq-calibrate --method dobi` end to end (image decoding, {args.patches} patches, "
            f"calibration, artifact) | {took} | {peak:.0f} MiB |",
            f"| for comparison: a process that only decodes the images and runs the float forward pass over "
            f"the same patches and batches | {float_took} | {float_peak:.0f} MiB |",
            f"| the two above with `MALLOC_MMAP_THRESHOLD_=131072` (glibc keeps no freed heap memory mapped): "
            f"calibration / float forward only | {fixed_took} / {float_fixed_took} | "
            f"{fixed_peak:.0f} / {float_fixed_peak:.0f} MiB |",
            "",
            f"Command: `{shown}`",
            "",
        ]

    load_end = os.getloadavg()
    held = total_elements * 4 / 2**30
    lines += [
        "# DOBI speed: one streamed pass vs the plain 100-pass search",
        "",
        f"Model: {info_of(model).arch} x{info_of(model).scale}, {source}; W{args.bits}A{args.bits} per tensor, "
        f"{len(act)} activation and {len(quantizers(model)) - len(act)} weight quantizers.",
        f"Data: {args.patches} LR patches {args.patch_size}x{args.patch_size} from `{args.images}` "
        f"({len(images)} images), seed 0, batches of {args.batch_size}; {total_elements / 1e9:.2f} G activation "
        f"values in all ({held:.1f} GiB as float32, which the streamed pass never holds).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s); load average {load_start[0]:.1f} at the "
        f"start, {load_end[0]:.1f} at the end (the cores are shared with other jobs, so times are noisy).",
        "",
        "## Model level",
        "",
        "Times are CPU seconds of this process (wall-clock in brackets); speed-ups use CPU time.",
        "",
        "| what | time |",
        "|---|---|",
        f"| patch sampling (decodes every image once) | {t_patches} |",
        f"| float forward pass alone | {t_forward} |",
        f"| `calibrate_dobi` (forward + histograms + scoring + weight searches) | {t_dobi} |",
        f"| DOBI cost on top of the forward | {dobi_cost:.1f} s |",
        f"| of which: histogram updates (forward with histogram observers, minus the forward) | "
        f"{t_observe.cpu - t_forward.cpu:.1f} s |",
        f"| of which: scoring 100 candidates for every activation quantizer from its histogram | {t_score} |",
        f"| plain 100-pass search of every activation quantizer (extrapolated from the subset below, "
        f"forward not included) | {plain_total:.0f} s |",
        f"| **speed-up, search cost alone** (plain / DOBI cost) | **{plain_total / dobi_cost:.0f}x** |",
        f"| speed-up with the forward pass on both sides | {(plain_total + t_forward.cpu) / t_dobi.cpu:.0f}x |",
        "",
        "## Subset: plain vs streamed on the same captured activations",
        "",
        f"{len(subset)} activation quantizers ({args.per_role} per role), all their data captured; the plain search "
        f"runs 100 full fake-quant passes; streamed = histogram updates over the same batches + scoring. "
        f"Last column: chosen candidate index, streamed minus plain, at each bit width (0 = same bounds, "
        f"+-1 = one candidate step).",
        "",
        "| quantizer | role | M values | mode | plain CPU s | streamed CPU ms | speed-up | index difference |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Subset total (CPU): plain {t_plain_sum:.1f} s, streamed {t_stream_sum:.2f} s "
        f"({t_plain_sum / t_stream_sum:.0f}x). Index differences: "
        f"{sum(d == 0 for d in agree)} of {len(agree)} identical, max |difference| {max(abs(d) for d in agree)}.",
        "",
    ]
    if cli_lines:
        lines += ["## End to end", "", *cli_lines]
    lines += ["Reproduce: `python " + " ".join(sys.argv) + "`", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
