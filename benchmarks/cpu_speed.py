"""Benchmark: CPU speed of our engines (ONNX Runtime and OpenVINO) against the best FP32 runtime here.

One process, one machine. For each model (DAT-light x4, the shipped official weights; SwinIR-light
x4, random weights: speed does not depend on them) it exports:

- ``fp32``: the float model through our exporter (same graph simplification as the QDQ exports);
- ``fp32-plain``: the float model through the TorchScript exporter, no work done on the graph;
- ``fp32-passes``: ``fp32`` after the CPU builders' default graph passes (:data:`export.speed_passes.DEFAULT_PASSES`,
  exact movement rewrites that help a float graph as much as ours);
- ``w8a8`` / ``w4a4`` / ``w4a8``: our QDQ exports (MinMax bounds on the shipped calibration images;
  speed does not depend on how the bounds were found).

and times these runtimes, every one in the same interleaved rounds (A, B, C, ..., then again), so
that load from other processes falls on all of them alike:

- FP32 baselines: ORT on ``fp32-plain`` and on ``fp32`` (level ``all``), OpenVINO on ``fp32``
  (``INFERENCE_PRECISION_HINT=f32``); the best of them is "best FP32". OpenVINO's default on a CPU
  with bf16 runs float layers in bf16: reported as ``openvino-fp32-bf16`` for information, never as
  an FP32 baseline (it is not FP32 arithmetic). The same two runtimes on ``fp32-passes`` are a second set
  of baselines: "FP32 with our passes" is the fastest of all five, so the ratio against it is what the
  integer arithmetic alone buys, the graph passes being given to both sides.
- Ours: ``2dq-build-engine``'s ORT engine and OpenVINO IR of each QDQ export (the engines
  ``--verify`` checks).

Timed: one 64x64 tile (batch 1), and a 256x256 image through overlapping 64x64 tiles (overlap 16, 4
tiles per call, :class:`toolchain.backends.TiledUpscaler`), at each ``--threads`` count; medians.
Also: on-disk size of every engine (an IR counts its ``.bin``) and the process's resident memory
growth when the engine is loaded.

    python benchmarks/cpu_speed.py --out-dir /tmp/cpu_speed --json benchmarks/results/cpu_speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
import torch

from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine, ir_weights
from engines.ort_engine import OrtTileRunner, build_ort_engine, session_options
from export.metadata import ExportMetadata
from export.onnx_export import ExportOptions, Provenance, export_model
from export.speed_passes import apply_speed_passes
from ort_speed import time_rounds
from random_models import swinir_light
from rotation_ablation import cpu_name
from toolchain.backends import TiledUpscaler
from toolchain.data.patches import sample_patches
from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_WEIGHTS
from toolchain.files import atomic_path, sha256_file
from toolchain.loading import load_model
from toolchain.quant import QuantConfig, quantize_model

TILE, IMAGE, OVERLAP, TILES_PER_CALL = 64, 256, 16, 4
WIDTHS = {"w8a8": (8, 8), "w4a4": (4, 4), "w4a8": (4, 8)}
FP32_BASELINES = ("ort-fp32-plain", "ort-fp32", "openvino-fp32")
#: the float graph after our default passes: with FP32_BASELINES, "FP32 with our passes"
FP32_PASSES_BASELINES = ("ort-fp32-passes", "openvino-fp32-passes")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PlainOrt:
    """ORT on any float ONNX (no 2dq metadata needed): the FP32 baselines."""

    def __init__(self, path: Path, threads: int, scale: int, multiple: int) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options("all", threads), providers=["CPUExecutionProvider"])
        self.tile, self.scale, self.multiple = TILE, scale, multiple

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": tiles.numpy()})[0])


class FloatOpenVino:
    """OpenVINO on a float ONNX (any graph with one input named ``input``: an engine's IR too) compiled for a fixed
    ``batch`` of tiles (shorter calls are padded). ``precision``: ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``;
    None: the plugin's default, bf16 on a CPU with bf16); ``denormals``: flush denormal floats to zero
    (``CPU_DENORMALS_OPTIMIZATION``); ``profile``: per-node counters on (``PERF_COUNT``)."""

    def __init__(self, path: Path, threads: int, batch: int, precision: Optional[str] = "f32", *, scale: int = 4,
                 multiple: int = 1, denormals: bool = False, profile: bool = False) -> None:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                  "CPU_DENORMALS_OPTIMIZATION": denormals, "PERF_COUNT": profile}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"input": [batch, 3, TILE, TILE]})
        self.compiled = core.compile_model(model, "CPU", config)
        self.batch, self.tile, self.scale, self.multiple = batch, TILE, scale, multiple

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        from engines.ort_engine import run_in_fixed_batches

        run = lambda chunk: np.array(self.compiled(chunk)[0])  # noqa: E731
        return torch.from_numpy(run_in_fixed_batches(tiles.numpy(), self.batch, run))


class OneOrMany:
    """Two compilations of one graph: ``one`` for a single tile (tile timing), ``many`` for ``TILES_PER_CALL``
    (image timing); a call goes to the one its tile count fits."""

    def __init__(self, one: Any, many: Any) -> None:
        self.one, self.many = one, many
        self.tile, self.scale, self.multiple = one.tile, one.scale, one.multiple

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return (self.one if tiles.shape[0] == 1 else self.many)(tiles)


def PlainOpenVino(path: Path, threads: int, scale: int, multiple: int, hint: Optional[str]) -> OneOrMany:  # noqa: N802
    """OpenVINO on a float ONNX (``hint``: its precision, None: the plugin's default), batch 1 and 4 tiles."""
    return OneOrMany(*(FloatOpenVino(path, threads, batch, hint, scale=scale, multiple=multiple)
                       for batch in (1, TILES_PER_CALL)))


def OursOpenVino(path: Path, threads: int) -> OneOrMany:  # noqa: N802
    """Our OpenVINO engine, batch 1 and 4 tiles."""
    return OneOrMany(*(OpenVinoTileRunner(path, threads=threads, batch=batch) for batch in (1, TILES_PER_CALL)))


def float_with_passes(fp32: Path) -> Path:
    """``fp32`` after the CPU builders' default graph passes, beside it as ``*_passes.onnx`` (reused when present)."""
    path = fp32.with_name(fp32.stem + "_passes.onnx")
    if not path.exists():
        with atomic_path(path) as tmp:
            onnx.save(apply_speed_passes(onnx.load(str(fp32))), str(tmp))
    return path


def export_files(name: str, make: Callable[[], torch.nn.Module], checkpoint_sha: str,
                 patches: Optional[torch.Tensor], out: Path,
                 widths: dict[str, tuple[int, int]] = WIDTHS) -> dict[str, Path]:
    """The float exports and one QDQ export per entry of ``widths``, its MinMax bounds from ``patches``
    (reused when present)."""
    files = {"fp32": out / f"{name}_fp32.onnx", "fp32-plain": out / f"{name}_fp32_plain.onnx"}
    if not files["fp32"].exists():
        export_model(make(), files["fp32"], ExportOptions(tile=TILE), Provenance(checkpoint_sha, "", {}))
    if not files["fp32-plain"].exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(make(), (torch.zeros(1, 3, TILE, TILE),), str(files["fp32-plain"]), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    files["fp32-passes"] = float_with_passes(files["fp32"])
    for width, (w_bits, a_bits) in widths.items():
        files[width] = out / f"{name}_{width}.onnx"
        if files[width].exists():
            continue
        if patches is None:
            raise ValueError(f"{files[width]}: exporting {width} needs calibration patches")
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
        model = make()
        quantize_model(model, config)
        calibrate_minmax(model, batch_forward_loop(patches, batch_size=8, progress=False))
        export_model(model, files[width], ExportOptions(tile=TILE), Provenance(checkpoint_sha, "", config.to_dict()))
    return files


def load_runners(files: dict[str, Path], out: Path, name: str, threads: int, scale: int,
                 multiple: int) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Every runtime of one model, and per runtime its on-disk bytes and resident-memory growth at load."""
    makers: dict[str, tuple[Callable[[], Any], list[Path]]] = {
        "ort-fp32-plain": (lambda: PlainOrt(files["fp32-plain"], threads, scale, multiple), [files["fp32-plain"]]),
        "ort-fp32": (lambda: PlainOrt(files["fp32"], threads, scale, multiple), [files["fp32"]]),
        "openvino-fp32": (lambda: PlainOpenVino(files["fp32"], threads, scale, multiple, "f32"), [files["fp32"]]),
        "openvino-fp32-bf16": (lambda: PlainOpenVino(files["fp32"], threads, scale, multiple, None), [files["fp32"]]),
        "ort-fp32-passes": (lambda: PlainOrt(files["fp32-passes"], threads, scale, multiple), [files["fp32-passes"]]),
        "openvino-fp32-passes": (lambda: PlainOpenVino(files["fp32-passes"], threads, scale, multiple, "f32"),
                                 [files["fp32-passes"]]),
    }
    for width in WIDTHS:
        ort_engine, ir = out / f"{name}_{width}.ort.onnx", out / f"{name}_{width}.ov.xml"
        if not ort_engine.exists():
            build_ort_engine(files[width], ort_engine)
        if not ir.exists():
            build_openvino_engine(files[width], ir)
        makers[f"ort-{width}"] = (lambda e=ort_engine: OrtTileRunner(e, threads=threads), [ort_engine])
        makers[f"openvino-{width}"] = (lambda e=ir: OursOpenVino(e, threads), [ir, ir_weights(ir)])
    runners, sizes = {}, {}
    for key, (make, paths) in makers.items():
        gc.collect()
        before = rss_bytes()
        runners[key] = make()
        sizes[key] = {"disk": sum(p.stat().st_size for p in paths), "rss_growth": rss_bytes() - before}
    return runners, sizes


def measure(name: str, runners: dict[str, Any], threads: int, tile_rounds: int, image_rounds: int) -> dict[str, Any]:
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    tile_s = time_rounds({k: (lambda r=r: r(tile)) for k, r in runners.items()}, tile_rounds)
    image = np.random.default_rng(2).random((IMAGE, IMAGE, 3), dtype=np.float32)
    upscalers = {k: TiledUpscaler(r, overlap=OVERLAP, batch=TILES_PER_CALL) for k, r in runners.items()}
    image_s = time_rounds({k: (lambda u=u: u.upscale(image)) for k, u in upscalers.items()}, image_rounds)
    row: dict[str, Any] = {"model": name, "threads": threads, "tile_ms": {k: 1000 * v for k, v in tile_s.items()},
                           "image_ms": {k: 1000 * v for k, v in image_s.items()}}
    for label, baselines in (("best_fp32", FP32_BASELINES), ("fp32_passes", FP32_BASELINES + FP32_PASSES_BASELINES)):
        for what, seconds in (("tile", tile_s), ("image", image_s)):
            best = min(baselines, key=lambda k: seconds[k])
            row[f"{label}_{what}"] = best
            row[f"x_vs_{label}_{what}"] = {k: seconds[best] / v for k, v in seconds.items()}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per runtime, the tile and the image, each against the best FP32 runtime (a) and the best FP32
    with our graph passes (b); the rows that are (a) or (b) say so."""
    lines = ["| model | threads | runtime | 64x64 tile (ms) | x vs best FP32 | x vs FP32 with our passes | "
             "256x256 image (ms) | x vs best FP32 | x vs FP32 with our passes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for key in row["tile_ms"]:
            cells = [row["model"], str(row["threads"]), key]
            for what, digits in (("tile", 1), ("image", 0)):
                marks = [m for m, label in (("a", "best_fp32"), ("b", "fp32_passes")) if row[f"{label}_{what}"] == key]
                cells.append(f"{row[f'{what}_ms'][key]:.{digits}f}" + (f" ({', '.join(marks)})" if marks else ""))
                cells += [f"{row[f'x_vs_{label}_{what}'][key]:.2f}" for label in ("best_fp32", "fp32_passes")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the CPU features that decide which int8 / bf16 kernels the runtimes pick (oneDNN, MLAS)
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def int8_isa() -> list[str]:
    """Which of :data:`INT8_FLAGS` this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                  if line.startswith("flags")), []) if info.is_file() else []
    return [flag for flag in INT8_FLAGS if flag in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for exports and engines (reused)")
    parser.add_argument("--models", default="dat-light,swinir-light", help="comma-separated: dat-light, swinir-light")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: %(default)s)")
    parser.add_argument("--tile-rounds", type=int, default=7, help="interleaved rounds for the tile timing")
    parser.add_argument("--image-rounds", type=int, default=3, help="interleaved rounds for the 256x256 image")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import openvino

    result: dict[str, Any] = {"machine": {"cpu": cpu_name(), "int8_isa": int8_isa(), "cpus": os.cpu_count(),
                                          "load_before": os.getloadavg()},
                              "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version(),
                                           "torch": torch.__version__},
                              "rows": [], "sizes": {}}
    models = {"dat-light": (lambda: load_model(DEFAULT_WEIGHTS), sha256_file(DEFAULT_WEIGHTS)),
              "swinir-light": (lambda: swinir_light(4, 0), "0" * 64)}
    patches, _ = sample_patches(DEFAULT_CALIB_IMAGES, 16, TILE, 4, seed=0)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        make, checkpoint_sha = models[name]
        torch.set_num_threads(2)
        files = export_files(name, make, checkpoint_sha, patches, out)
        for threads in [int(t) for t in args.threads.split(",")]:
            export = ExportMetadata.read(files["w8a8"])
            runners, sizes = load_runners(files, out, name, threads, export.scale, export.multiple)
            result["sizes"][name] = sizes
            row = measure(name, runners, threads, args.tile_rounds, args.image_rounds)
            result["rows"].append(row)
            print(table([row]), flush=True)
            del runners
    result["machine"]["load_after"] = os.getloadavg()
    print(table(result["rows"]))
    for name, sizes in result["sizes"].items():
        print(f"{name} sizes (MB disk / MB resident growth at load): " +
              ", ".join(f"{k} {v['disk'] / 2**20:.1f} / {v['rss_growth'] / 2**20:.0f}" for k, v in sizes.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
