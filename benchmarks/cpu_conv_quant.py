"""Benchmark: what quantizing the convolutions too buys on CPU (issue 23 item 4, a lever that changes the model).

DAT-light x4 (official weights) at W8A8, MinMax bounds on the shipped calibration images (as
``cpu_levers.py``), exported twice: the default placement (``--quantize linear,matmul``: DAT's 116
convolutions, among them the depth-wise ones of every block, stay float) and with the convolutions
quantized (``--quantize linear,matmul,conv``). Both are built into the ORT engine and the OpenVINO IR
``2dq-build-engine`` makes (default graph passes) and timed in the same interleaved rounds with the best
FP32 runtime here (OpenVINO f32 on our float export) and ORT on the plain export: one 64x64 tile, one
thread, medians. Also the OpenVINO per-node profile of both engines and how many layers run in int8.

The PSNR cost is measured apart, with the console scripts (see ``cpu_speed.md``).

    cd benchmarks && python cpu_conv_quant.py --out-dir /tmp/sp --json results/cpu_conv_quant.json
"""
from __future__ import annotations

import json
import os
import platform

import torch

from cpu_levers import FloatOpenVino, export_float, export_w8a8, openvino_profile, speed_parser, time_tile
from cpu_speed import TILE, PlainOrt
from engines.openvino_engine import OpenVinoTileRunner, build_openvino_engine
from engines.ort_engine import OrtTileRunner, build_ort_engine

PLACEMENTS = {"linear,matmul": ("linear", "matmul"), "linear,matmul,conv": ("linear", "matmul", "conv")}


def main() -> None:
    args = speed_parser(__doc__, tile_rounds=41).parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    floats = export_float(args.out_dir)
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "load_before": os.getloadavg()}, "threads": args.threads, "placements": {}}
    runners = {"ort-fp32-plain": PlainOrt(floats["fp32-plain"], args.threads, 4, 1),
               "openvino-fp32": FloatOpenVino(floats["fp32"], args.threads, 1)}
    for name, quantize in PLACEMENTS.items():
        graph, artifact = export_w8a8(args.out_dir, quantize)
        ov_path, ort_path = graph.with_suffix(".ov.xml"), graph.with_suffix(".ort.onnx")
        ov_build = build_openvino_engine(graph, ov_path, threads=args.threads)
        ort_build = build_ort_engine(graph, ort_path, threads=args.threads)
        result["placements"][name] = {"onnx": str(graph), "artifact": str(artifact), "openvino_engine": str(ov_path),
                                      "openvino_int8_layers": ov_build.int8_layers,
                                      "ort_integer_kernels": ort_build.integer_kernels}
        runners[f"openvino:{name}"] = OpenVinoTileRunner(ov_path, threads=args.threads, batch=1)
        runners[f"ort:{name}"] = OrtTileRunner(ort_path, threads=args.threads)
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    result["tile"] = time_tile(runners, tile, args.tile_rounds, ("openvino-fp32",))
    print(json.dumps(result["tile"], indent=1), flush=True)
    result["openvino_profile_ms"] = {name: openvino_profile(info["openvino_engine"], args.threads)
                                     for name, info in result["placements"].items()}
    result["machine"]["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
