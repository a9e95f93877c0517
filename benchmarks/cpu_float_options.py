"""Benchmark: the float arithmetic between the int8 kernels on OpenVINO (issue 23 item 4): bf16, and
denormals flushed to zero.

DAT-light x4 (official weights) at W8A8, MinMax bounds on the shipped calibration images (the export of
``cpu_levers.py``), built by ``build_openvino_engine`` with the default graph passes twice: float layers in
f32 (the reference's arithmetic, the default) and in bf16 (``--float-precision bf16``, a lever that changes the
model: LayerNorm, GELU, softmax, the depth-wise convolutions and the quantize/dequantize scaling with 8-bit
mantissas). Each also compiled with ``CPU_DENORMALS_OPTIMIZATION`` (denormal floats flushed to zero: DAT's
shifted-window mask of -100 puts exp(-100) ~ 4e-44, a denormal, into every masked softmax entry), and the
FP32 baseline the same way, so that the best FP32 runtime is the faster of OpenVINO f32 with and without it.
OpenVINO's bf16 on the float export is listed for information. Timed in the same interleaved rounds (one 64x64
tile, one thread, medians); OpenVINO's per-node profile of the two engines.

Whether an engine still computes the quantized model is measured apart, with the console scripts
(``2dq-build-engine --verify``; see ``cpu_speed.md``).

    cd benchmarks && python cpu_float_options.py --out-dir /tmp/sp --json results/cpu_float_options.json
"""
from __future__ import annotations

import json
import os
import platform

import torch

from cpu_levers import FloatOpenVino, export_float, export_w8a8, openvino_profile, speed_parser, time_tile
from cpu_speed import TILE
from engines.openvino_engine import FLOAT_PRECISIONS, OpenVinoTileRunner, build_openvino_engine

#: the FP32 runtimes the best FP32 is chosen from
FP32 = ("openvino-fp32", "openvino-fp32+ftz")


def main() -> None:
    args = speed_parser(__doc__, tile_rounds=41).parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t = args.threads
    floats = export_float(args.out_dir)
    graph, artifact = export_w8a8(args.out_dir)
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "load_before": os.getloadavg()}, "threads": t, "artifact": str(artifact), "engines": {}}
    runners = {"openvino-fp32": FloatOpenVino(floats["fp32"], t, 1),
               "openvino-fp32+ftz": FloatOpenVino(floats["fp32"], t, 1, denormals=True),
               "openvino-fp32-bf16": FloatOpenVino(floats["fp32"], t, 1, "bf16")}
    for precision in FLOAT_PRECISIONS:
        engine = graph.with_name(f"{graph.stem}_{precision}.ov.xml")
        build = build_openvino_engine(graph, engine, threads=t, float_precision=precision)
        result["engines"][precision] = {"engine": str(engine), "int8_layers": build.int8_layers,
                                        "graph_passes": build.graph_passes}
        runners[f"ours-w8a8-{precision}"] = OpenVinoTileRunner(engine, threads=t, batch=1)
        runners[f"ours-w8a8-{precision}+ftz"] = FloatOpenVino(engine, t, 1, precision, denormals=True)
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    outputs = {key: runner(tile) for key, runner in runners.items() if key.startswith("ours-")}
    exact = outputs["ours-w8a8-f32"]
    result["vs_default_engine"] = {key: {"max_abs": float((out - exact).abs().max()),
                                         "identical": float((out == exact).float().mean())}
                                   for key, out in outputs.items()}
    print(json.dumps(result["vs_default_engine"], indent=1), flush=True)
    result["tile"] = time_tile(runners, tile, args.tile_rounds, FP32)
    print(json.dumps(result["tile"], indent=1), flush=True)
    del runners
    result["openvino_profile_ms"] = {p: openvino_profile(info["engine"], t) for p, info in result["engines"].items()}
    result["machine"]["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
