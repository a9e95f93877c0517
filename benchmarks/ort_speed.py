"""Benchmark: ONNX Runtime (CPU) speed of our INT8 engines against FP32 and ORT's own quantize_static.

One run, one machine, one process; every model is timed in the same interleaved rounds (model A,
model B, ..., then again) so that load from other processes falls on all of them alike:

- ``fp32``: the float model through our exporter (same graph simplification, no Q/DQ);
- ``fp32-plain``: the float model through the TorchScript exporter, as exported without any work
  (the ~4,900-node graph), for reference;
- ``ours-w8a8`` / ``ours-w4a4``: our QDQ export of the fake-quant model (MinMax bounds on real
  calibration patches) built into an ORT engine (:func:`engines.ort_engine.build_ort_engine`);
- ``ort-quantize_static``: ONNX Runtime's ``quantize_static`` on the ``fp32`` graph (QDQ format,
  int8 activations and weights, per tensor, MinMax on the same patches).

Timed: the median latency of one 64x64 tile (batch 1), and of a 256x256 image upscaled through
overlapping 64x64 tiles (overlap 16, 4 tiles per call, :class:`toolchain.backends.TiledUpscaler`).
Also reported: file sizes of the FP32 graph, the W8A8 QDQ graph and the trt-int4 (weight-only,
packed int4) graph, the engines' integer kernels, the machine's load average.

Example (SwinIR-light x4 with random weights: no trained SwinIR-light exists here)::

    python benchmarks/ort_speed.py --out-dir /tmp/ort_speed --threads 2 --json /tmp/ort_speed/result.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from calib.baselines import calibrate_minmax
from calib.observers import batch_forward_loop
from engines.ort_engine import build_ort_engine, session_options
from export.onnx_export import ExportOptions, Provenance, export_model
from toolchain.backends import TiledUpscaler
from toolchain.data.patches import sample_patches
from toolchain.files import sha256_file
from random_models import swinir_light
from toolchain.quant import QuantConfig, quantize_model

TILE, IMAGE, OVERLAP, TILES_PER_CALL = 64, 256, 16, 4


class SessionRunner:
    """A tile runner over any ONNX file (metadata given here, so ORT's own model works too)."""

    def __init__(self, path: Path, threads: int, scale: int, multiple: int) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options("all", threads), providers=["CPUExecutionProvider"])
        self.tile, self.scale, self.multiple = TILE, scale, multiple
        self.input = self.session.get_inputs()[0].name

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: tiles.numpy()})[0])


def export_float(model: torch.nn.Module, path: Path, checkpoint_sha: str) -> None:
    export_model(model, path, ExportOptions(tile=TILE), Provenance(checkpoint_sha, "", {}))


def export_quantized(checkpoint: Path, seed: int, patches: torch.Tensor, config: QuantConfig, path: Path) -> None:
    model = make_model(seed)
    quantize_model(model, config)
    calibrate_minmax(model, batch_forward_loop(patches, batch_size=8, progress=False))
    export_model(model, path, ExportOptions(tile=TILE), Provenance(sha256_file(checkpoint), "", config.to_dict()))


def export_plain(model: torch.nn.Module, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(1, 3, TILE, TILE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def quantize_static_model(fp32: Path, out: Path, patches: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": p[None].numpy()} for p in patches])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=False)


def make_model(seed: int) -> torch.nn.Module:
    return swinir_light(4, seed)


def time_rounds(runs: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, measured in interleaved rounds after one warm-up call each."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the models and engines")
    parser.add_argument("--calib-images", default="../shared/datasets/train", help="images for calibration patches")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads (default: 2)")
    parser.add_argument("--tile-rounds", type=int, default=15, help="interleaved rounds for the tile timing")
    parser.add_argument("--image-rounds", type=int, default=3, help="interleaved rounds for the 256x256 image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random SwinIR-light weights")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    model = make_model(args.seed)
    checkpoint = out / "swinir_light_x4_random.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    patches, _ = sample_patches(args.calib_images, 16, TILE, 4, seed=0)
    files = {"fp32": out / "fp32.onnx", "fp32-plain": out / "fp32_plain.onnx", "ours-w8a8": out / "w8a8.onnx",
             "ours-w4a4": out / "w4a4.onnx", "ort-quantize_static": out / "ort_qdq.onnx", "int4": out / "w4_int4.onnx"}
    export_float(model, files["fp32"], sha256_file(checkpoint))
    export_plain(model, files["fp32-plain"])
    export_quantized(checkpoint, args.seed, patches, QuantConfig(w_bits=8, a_bits=8), files["ours-w8a8"])
    export_quantized(checkpoint, args.seed, patches, QuantConfig(w_bits=4, a_bits=4), files["ours-w4a4"])
    export_quantized(checkpoint, args.seed, patches, QuantConfig(w_bits=4, a_bits=4, target="trt-int4"), files["int4"])
    quantize_static_model(files["fp32"], files["ort-quantize_static"], patches)
    engines = {"fp32": files["fp32"], "fp32-plain": files["fp32-plain"],
               "ort-quantize_static": files["ort-quantize_static"]}
    builds = {}
    for name in ("ours-w8a8", "ours-w4a4"):
        engines[name] = out / f"{name}.ort.onnx"
        builds[name] = build_ort_engine(files[name], engines[name], threads=args.threads).integer_kernels

    runners = {name: SessionRunner(path, args.threads, 4, 8) for name, path in engines.items()}
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    tile_times = time_rounds({name: (lambda r=r: r(tile)) for name, r in runners.items()}, args.tile_rounds)
    image = np.random.default_rng(2).random((IMAGE, IMAGE, 3), dtype=np.float32)
    upscalers = {name: TiledUpscaler(r, overlap=OVERLAP, batch=TILES_PER_CALL) for name, r in runners.items()}
    image_times = time_rounds({name: (lambda u=u: u.upscale(image)) for name, u in upscalers.items()},
                              args.image_rounds)
    load_after = os.getloadavg()

    sizes = {name: files[name].stat().st_size for name in ("fp32", "ours-w8a8", "int4")}
    nodes = {name: len(onnx.load(str(path), load_external_data=False).graph.node) for name, path in engines.items()}
    result = {"threads": args.threads, "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
              "ort_version": __import__("onnxruntime").__version__, "tile_ms": {k: 1000 * v for k, v in tile_times.items()},
              "image_256_ms": {k: 1000 * v for k, v in image_times.items()},
              "speedup_vs_fp32_tile": {k: tile_times["fp32"] / v for k, v in tile_times.items()},
              "speedup_vs_fp32_image": {k: image_times["fp32"] / v for k, v in image_times.items()},
              "file_bytes": sizes, "engine_nodes": nodes, "integer_kernels": builds}
    print(f"| model | nodes | 64x64 tile (ms) | x vs fp32 | 256x256 image (ms) | x vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name in engines:
        print(f"| {name} | {nodes[name]} | {1000 * tile_times[name]:.1f} | {result['speedup_vs_fp32_tile'][name]:.2f} | "
              f"{1000 * image_times[name]:.0f} | {result['speedup_vs_fp32_image'][name]:.2f} |")
    print(f"sizes: {sizes}; load average {load_before} -> {load_after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
