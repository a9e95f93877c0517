"""Benchmark: the graph levers of issue 23 item 4 (:mod:`export.speed_passes`), each on and off, on CPU.

DAT-light x4 (official weights) at W8A8, MinMax bounds on the shipped calibration images (as
``cpu_speed.py``, but the bounds are saved as an artifact so that ``2dq-build-engine --verify`` can
check the rewritten graphs): the export is rewritten by each lever (:data:`VARIANTS`: each pass alone,
``exact`` = every pass that cannot change a float result, ``all``), and every graph is built into the
ORT engine and the OpenVINO IR ``2dq-build-engine`` makes. Timed at ``--threads`` (default 1), in
interleaved rounds (every runtime once per round, so that load from other processes falls on all
alike), medians:

- one 64x64 tile (batch 1): every variant on both engines, against the FP32 baselines of
  ``cpu_speed.py`` (ORT on the plain and on our float export, OpenVINO f32 on our float export), and
  OpenVINO f32 on our float export after the builders' default passes ("FP32 with our passes": timed and
  profiled, not one of the baselines the ratios use);
- a 256x256 image through overlapping 64x64 tiles (overlap 16) at 1 / 4 / 8 tiles per call:
  ``--image-variants`` on both engines, and OpenVINO f32 on our float export (the best FP32 runtime).

Each variant's engines are built from its own passes only (``graph_passes=()``: not the builders'
default passes on top), so ``baseline`` is the export with no pass at all.

Also: each variant's output on one tile against the unrewritten graph's on the same engine (max
abs difference, share of identical values), node counts, file sizes, and OpenVINO's per-node
profile (ms summed by node type over one tile, median of 7 calls) of every variant.

    python benchmarks/cpu_levers.py --out-dir /tmp/cpu_levers --json benchmarks/results/cpu_levers.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from calib.artifact import save_artifact
from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from cpu_speed import FP32_BASELINES, IMAGE, OVERLAP, TILE, FloatOpenVino, PlainOrt, export_files
from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine
from engines.ort_engine import OrtTileRunner, build_ort_engine
from export.onnx_export import ExportOptions, export_onnx
from export.speed_passes import CPU_ONLY_PASSES, PASSES, run_speed_passes
from ort_speed import time_rounds
from toolchain.backends import TiledUpscaler
from toolchain.data.patches import sample_patches
from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_WEIGHTS
from toolchain.files import sha256_file
from toolchain.loading import load_model
from toolchain.quant import QuantConfig, quantize_model

#: lever variants: name -> passes (``one_bias_add`` needs DAT's bias folded to a constant first;
#: ``dedupe_quantize`` finds nothing on DAT-light, so it is counted in ``all``, not timed alone)
VARIANTS = {
    "baseline": (),
    "fold_constants": ("fold_constants",),
    "one_bias_add": ("fold_constants", "one_bias_add"),
    "compose_movements": ("compose_movements",),
    "reduce_transpose_rank": ("reduce_transpose_rank",),
    "exact": ("fold_constants", "dedupe_quantize", "compose_movements", "reduce_transpose_rank"),
    "all": tuple(p for p in PASSES if p not in CPU_ONLY_PASSES),
    # codes instead of floats through the movement before a quantizer (export/quantize_early.py)
    "quantize_before_movement": ("compose_movements", "quantize_before_movement"),
    # the shifted-window mask added in 4-D, so OpenVINO fuses those attentions too (export/window_mask.py)
    "flat_window_mask": ("flat_window_mask", "compose_movements"),
    # the channel attention's q, k, v sliced before their head-split transpose (export/gather_early.py)
    "gather_before_transpose": ("flat_window_mask", "gather_before_transpose", "compose_movements"),
    # the same, also through the spatial blocks' channel halves, rolls and views: no qkv split transpose left
    "carry_transpose_to_gathers": ("flat_window_mask", "gather_before_transpose", "carry_transpose_to_gathers",
                                   "compose_movements"),
}
TILES_PER_CALL = (1, 4, 8)


def export_w8a8(out: Path, quantize: tuple[str, ...] = ("linear", "matmul")) -> tuple[Path, Path]:
    """The W8A8 export and the artifact it came from (reused when present); ``quantize``: what is
    quantized (``QuantConfig.quantize``; the files of another choice than the default are named for it)."""
    stem = "dat-light_w8a8" + ("" if quantize == ("linear", "matmul") else "_" + "-".join(quantize))
    artifact, graph = out / f"{stem}_minmax.safetensors", out / f"{stem}.onnx"
    if not artifact.exists():
        patches, _ = sample_patches(DEFAULT_CALIB_IMAGES, 16, TILE, 4, seed=0)
        config = QuantConfig(w_bits=8, a_bits=8, quantize=quantize)
        model = quantize_model(load_model(DEFAULT_WEIGHTS), config)
        calibrate_minmax(model, batch_forward_loop(patches, batch_size=8, progress=False))
        save_artifact(artifact, model, checkpoint=DEFAULT_WEIGHTS, quant_config=config, method="minmax")
    if not graph.exists():
        export_onnx(DEFAULT_WEIGHTS, artifact, graph, ExportOptions(tile=TILE))
    return graph, artifact


def export_float(out: Path) -> dict[str, Path]:
    """Our float export, the plain TorchScript one and ours after the default passes (the FP32 baselines of
    ``cpu_speed.py``, made by its :func:`cpu_speed.export_files`)."""
    return export_files("dat-light", lambda: load_model(DEFAULT_WEIGHTS), sha256_file(DEFAULT_WEIGHTS), None, out,
                        widths={})


def build_variants(graph: Path, out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each variant's rewritten graph, ORT engine and OpenVINO IR (reused when present)."""
    variants = {}
    for name in names:
        passes = VARIANTS[name]
        path = graph if not passes else out / f"dat-light_w8a8_{name}.onnx"
        info: dict[str, Any] = {"passes": list(passes), "onnx": str(path)}
        if passes:
            import onnx_ir as ir

            model = ir.load(str(graph))
            start = time.perf_counter()
            info["changes"] = run_speed_passes(model, passes)
            info["pass_seconds"] = round(time.perf_counter() - start, 2)
            if not path.exists():
                ir.save(model, str(path))
        proto = onnx.load(str(path))
        info["ops"] = dict(collections.Counter(n.op_type for n in proto.graph.node).most_common())
        info["transpose_ranks"] = dict(sorted(collections.Counter(
            len(n.attribute[0].ints) for n in proto.graph.node if n.op_type == "Transpose").items()))
        ort_engine, ir_path = out / f"dat-light_w8a8_{name}.ort.onnx", out / f"dat-light_w8a8_{name}.ov.xml"
        if not ort_engine.exists():  # the variant's passes only (not the builders' default ones on top)
            build_ort_engine(path, ort_engine, graph_passes=())
        if not ir_path.exists():
            build_openvino_engine(path, ir_path, graph_passes=())
        info.update(ort_engine=str(ort_engine), openvino_engine=str(ir_path),
                    bytes={"onnx": path.stat().st_size, "ort": ort_engine.stat().st_size,
                           "openvino": ir_path.stat().st_size + ir_path.with_suffix(".bin").stat().st_size})
        variants[name] = info
    return variants


def speed_parser(doc: str, tile_rounds: int) -> argparse.ArgumentParser:
    """The options every CPU speed benchmark here shares (its own ones are added by the caller)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for exports and engines (reused)")
    parser.add_argument("--threads", type=int, default=1, help="inference threads (default: %(default)s)")
    parser.add_argument("--tile-rounds", type=int, default=tile_rounds, help="interleaved rounds for the tile "
                        "timing (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    return parser


def time_tile(runners: dict[str, Any], tile: torch.Tensor, rounds: int, baselines: Sequence[str]) -> dict[str, Any]:
    """Every runner on ``tile`` in ``rounds`` interleaved rounds: medians (ms) and ratios to the fastest of
    ``baselines`` (the FP32 runtimes)."""
    seconds = time_rounds({k: (lambda r=r: r(tile)) for k, r in runners.items()}, rounds)
    best = min(baselines, key=lambda k: seconds[k])
    return {"ms": {k: round(1000 * v, 2) for k, v in seconds.items()}, "best_fp32": best,
            "x_vs_best_fp32": {k: round(seconds[best] / v, 3) for k, v in seconds.items()}}


def agreement(runners: dict[str, Any], tile: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each lever variant's output against the baseline's on the same engine."""
    outputs = {key: runner(tile).numpy() for key, runner in runners.items()}
    found = {}
    for key, output in outputs.items():
        engine = key.split(":")[0]
        if ":" not in key or key == f"{engine}:baseline":
            continue
        base = outputs[f"{engine}:baseline"]
        found[key] = {"max_abs": float(np.abs(output - base).max()), "identical": float(np.mean(output == base))}
    return found


def _fused_attentions(compiled: Any) -> set[str]:
    """Names of the runtime graph's fused attention kernels: ``Subgraph`` nodes of three or more inputs with a
    4-D output (``q @ k^T -> softmax -> @ v`` in one kernel, OpenVINO's MHA snippets)."""
    fused = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if (info["layerType"].astype(str) == "Subgraph" and op.get_input_size() >= 3
                and len(op.output(0).get_partial_shape()) == 4):
            fused.add(op.get_friendly_name())
    return fused


def openvino_profile(ir_path: str, threads: int, calls: int = 7) -> dict[str, float]:
    """OpenVINO's per-node times on one tile, ms summed by node type (median over ``calls``), most first; fused
    attention kernels apart from the other ``Subgraph``s. ``ir_path``: an engine's IR, or (not ending in
    ``.xml``) a float ONNX graph, compiled in f32 as :class:`FloatOpenVino` does."""
    if str(ir_path).endswith(".xml"):
        runner = OpenVinoTileRunner(ir_path, threads=threads, batch=1, profile=True)
        compiled, request = runner.compiled, runner.request
    else:
        compiled = FloatOpenVino(Path(ir_path), threads, batch=1, profile=True).compiled
        request = compiled.create_infer_request()
    attentions = _fused_attentions(compiled)
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(3))
    request.infer({0: tile.numpy()})
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(calls):
        request.infer({0: tile.numpy()})
        totals: collections.Counter = collections.Counter()
        for info in request.profiling_info:
            kind = "attention, fused" if info.node_name in attentions else info.node_type
            totals[f"{kind} ({info.exec_type})"] += info.real_time.total_seconds() * 1000
        totals["total"] = sum(totals.values())
        for key in totals:
            samples[key].append(totals[key])
    medians = {key: round(statistics.median(values), 2) for key, values in samples.items()}
    return dict(sorted(medians.items(), key=lambda item: -item[1])[:14])


def main() -> None:
    parser = speed_parser(__doc__, tile_rounds=9)
    parser.add_argument("--image-rounds", type=int, default=3,
                        help="interleaved rounds for the 256x256 image (0: skip it)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated lever variants timed on the tile (default: all of them)")
    parser.add_argument("--image-variants", default="baseline,compose_movements",
                        help="comma-separated variants timed on the image (default: %(default)s)")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    import onnxruntime
    import openvino

    graph, artifact = export_w8a8(out)
    floats = export_float(out)
    names = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or "baseline" not in names:
        parser.error(f"--variants: unknown {unknown} or no 'baseline'; choose among {list(VARIANTS)}")
    variants = build_variants(graph, out, names)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                          "load_before": os.getloadavg()},
                              "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version()},
                              "threads": args.threads, "artifact": str(artifact), "variants": variants}
    t = args.threads
    runners: dict[str, Any] = {
        "ort-fp32-plain": PlainOrt(floats["fp32-plain"], t, 4, 1),
        "ort-fp32": PlainOrt(floats["fp32"], t, 4, 1),
        "openvino-fp32": FloatOpenVino(floats["fp32"], t, 1),
        "openvino-fp32-passes": FloatOpenVino(floats["fp32-passes"], t, 1),
    }
    for name, info in variants.items():
        runners[f"openvino:{name}"] = OpenVinoTileRunner(info["openvino_engine"], threads=t, batch=1)
        runners[f"ort:{name}"] = OrtTileRunner(info["ort_engine"], threads=t)
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    result["agreement_vs_baseline"] = agreement(runners, tile)
    print(json.dumps(result["agreement_vs_baseline"], indent=1), flush=True)
    result["tile"] = time_tile(runners, tile, args.tile_rounds, FP32_BASELINES)
    print(json.dumps(result["tile"], indent=1), flush=True)
    del runners

    if args.image_rounds > 0:
        image = np.random.default_rng(2).random((IMAGE, IMAGE, 3), dtype=np.float32)
        upscalers = {}
        for per_call in TILES_PER_CALL:
            upscalers[f"openvino-fp32@{per_call}"] = TiledUpscaler(FloatOpenVino(floats["fp32"], t, per_call),
                                                                   overlap=OVERLAP, batch=per_call)
            for name in args.image_variants.split(","):
                ov_runner = OpenVinoTileRunner(variants[name]["openvino_engine"], threads=t, batch=per_call)
                upscalers[f"openvino:{name}@{per_call}"] = TiledUpscaler(ov_runner, overlap=OVERLAP, batch=per_call)
                ort_runner = OrtTileRunner(variants[name]["ort_engine"], threads=t)
                upscalers[f"ort:{name}@{per_call}"] = TiledUpscaler(ort_runner, overlap=OVERLAP, batch=per_call)
        image_s = time_rounds({k: (lambda u=u: u.upscale(image)) for k, u in upscalers.items()}, args.image_rounds)
        best_image = min((k for k in image_s if k.startswith("openvino-fp32")), key=lambda k: image_s[k])
        result["image"] = {"ms": {k: round(1000 * v, 1) for k, v in image_s.items()}, "best_fp32": best_image,
                           "x_vs_best_fp32": {k: round(image_s[best_image] / v, 3) for k, v in image_s.items()}}
        print(json.dumps(result["image"], indent=1), flush=True)
        del upscalers
    result["openvino_profile_ms"] = {"openvino-fp32": openvino_profile(str(floats["fp32"]), t),
                                     "openvino-fp32-passes": openvino_profile(str(floats["fp32-passes"]), t),
                                     **{name: openvino_profile(variants[name]["openvino_engine"], t)
                                        for name in variants}}
    result["machine"]["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
