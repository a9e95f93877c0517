"""``2dq-build-engine``: build an engine from a QDQ export, optionally verify it against the reference.

Examples::

    2dq-build-engine --backend ort --onnx w4a4.onnx --out w4a4.ort.onnx --json build.json
    2dq-build-engine --backend ort --onnx w4a4.onnx --out w4a4.ort.onnx \\
        --verify --weights x2.pth --calib w4a4.safetensors --data ../shared/datasets --sets Set5 --polygraphy
    2dq-build-engine --backend trt --onnx w4a4.onnx --out w4a4.plan --precision int8

``--verify`` applies the verification criterion of ARCHITECTURE.md section 7: the engine passes when
its PSNR against the fake-quant reference reaches min(fixed floor, the reference's own noise floor
under input noise the size of the engine's float rounding - 1 dB: sigma 1e-6 for fp32 float layers, fp16's
unit roundoff 2**-11 for fp16 ones) and its task PSNR/SSIM against HR equal the reference's (same tiles)
within 0.02 dB / 0.0005; both are reported. It upscales the LR images of ``--sets`` with the engine and with the PyTorch fake-quant
model through the same tiles and reports ``psnr_vs_reference``, ``identical_pixels`` and
``max_abs_error`` (:mod:`engines.compare`); the command fails (exit 1) below the thresholds
(ONNX Runtime: 60 dB and 99% identical uint8 pixels; TensorRT: 50 dB, 45 dB for fp16 graphs).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from export.metadata import ExportMetadata
from export.speed_passes import DEFAULT_PASSES, PASSES
from toolchain import defaults
from toolchain.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, add_json_argument, add_logging_arguments, run_cli

from toolchain.tolerances import (
    DEFAULT_NOISE_SIGMA,
    FP16_MIN_PSNR,
    FP16_NOISE_SIGMA,
    NOISE_DRAWS,
    NOISE_FLOOR_MARGIN,
    ORT_MIN_IDENTICAL,
    ORT_MIN_PSNR,
    TRT_MIN_PSNR,
)

from .compare import (
    Verdict,
    agreement_summary,
    benchmark_images,
    check_provenance,
    cut_tiles,
    polygraphy_compare,
    reference_model,
    reference_upscaler,
    verify_engine,
)
from .noise import noise_floor, noise_sigma, task_noise
from .openvino_engine import FLOAT_PRECISIONS, PRECISION
from .ort_engine import BUILD_LEVEL, LEVELS, OrtTileRunner, build_ort_engine

log = logging.getLogger("2dq-build-engine")

#: (min PSNR dB, min identical uint8 share) by backend and float dtype (ARCHITECTURE.md s. 7)
#: (OpenVINO, a CPU runtime computing the same integer arithmetic, is held to ONNX Runtime's floors)
THRESHOLDS = {("ort", "fp32"): (ORT_MIN_PSNR, ORT_MIN_IDENTICAL), ("ort", "fp16"): (FP16_MIN_PSNR, 0.0),
              ("openvino", "fp32"): (ORT_MIN_PSNR, ORT_MIN_IDENTICAL), ("openvino", "fp16"): (FP16_MIN_PSNR, 0.0),
              ("trt", "fp32"): (TRT_MIN_PSNR, 0.0), ("trt", "fp16"): (FP16_MIN_PSNR, 0.0)}


def trt_backend() -> Optional[ModuleType]:
    """``engines.trt`` if it can be imported (it imports without TensorRT itself), else None."""
    try:
        import engines.trt as module
    except ImportError as err:
        log.debug("engines.trt unavailable: %s", err)
        return None
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="2dq-build-engine",
        allow_abbrev=False,  # one name per flag: no prefix stands in for it
        description="Build an inference engine from a 2dq QDQ ONNX export (ONNX Runtime: an optimized model whose "
        "Q/DQ node units run as integer kernels; TensorRT: a plan), and optionally verify it against the "
        "PyTorch fake-quant model on real images.",
        epilog="Exit codes: 0 ok, 1 failure (build error, mismatched files, verification below threshold), 2 usage error.",
    )
    parser.add_argument("--backend", choices=("ort", "openvino", "trt"), default="ort",
                        help="engine kind: ONNX Runtime (CPU), OpenVINO IR (CPU plugin) or TensorRT (default: %(default)s)")
    parser.add_argument("--onnx", metavar="IN.onnx", help="QDQ graph written by 2dq-export (default: "
                        "runs/dat_light_x4_w4a4.onnx, what 2dq-export writes by default)")
    parser.add_argument("--out", metavar="ENGINE",
                        help="engine to write (ort: .onnx, or .ort for ORT format; trt: .plan/.engine; default for ort: "
                        "<onnx stem>.ort.onnx)")
    add_json_argument(parser, "the build (and verification) report")
    ort = parser.add_argument_group("ONNX Runtime build (--backend ort)")
    ort.add_argument("--level", choices=LEVELS, default=BUILD_LEVEL,
                     help="ORT graph optimization level saved into the engine (default: %(default)s; 'all' adds "
                     "machine-specific layouts)")
    ort.add_argument("--graph-passes", default=",".join(DEFAULT_PASSES), metavar="LIST",
                     help="ort/openvino: graph passes run on the QDQ graph before the build, comma-separated "
                     f"from {{{','.join(PASSES)}}}, or 'none' (default: %(default)s: one Transpose where a chain of "
                     "transposes and reshapes moves the same elements, the shifted-window mask added without "
                     "a 5-D view so OpenVINO fuses those attentions, and a head split's q/k/v sliced before its "
                     "transpose; the engine is bit-identical, DAT-light x4 W8A8 1.8-1.9x the best FP32 on OpenVINO; the others are measured options, benchmarks/cpu_speed.md: "
                     "quantize_before_movement keeps OpenVINO bit-identical, not ORT)")
    ort.add_argument("--threads", type=int, help="CPU threads of the engine (ONNX Runtime intra-op, OpenVINO) for "
                     "building and verifying (default: all cores)")
    ort.add_argument("--float-precision", choices=FLOAT_PRECISIONS, default=PRECISION,
                     help="openvino: what the float layers between the int8 kernels run in (default: %(default)s, "
                     "the reference's arithmetic; bf16 changes the model and is verified against the same "
                     "criterion, benchmarks/cpu_speed.md)")
    verify = parser.add_argument_group("verification against the fake-quant reference")
    verify.add_argument("--verify", action="store_true", help="run the engine and the reference on real images")
    verify.add_argument("--weights", metavar="CKPT", help="float checkpoint the export came from (default: the shipped "
                        "DAT-light x4)")
    verify.add_argument("--calib", metavar="ARTIFACT", help="calibration artifact the export came from (default: the "
                        "ONNX file's name with .safetensors)")
    verify.add_argument("--data", metavar="ROOT", help="benchmark root holding <Set>/LR_bicubic/X<s> (default: the "
                        "shipped Set5)")
    verify.add_argument("--sets", default="Set5", help="comma-separated test sets (default: %(default)s, also with "
                        "--data: verification runs the reference several times)")
    verify.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default: %(default)s)")
    verify.add_argument("--batch", type=int, default=4, help="tiles per model call, engine and reference "
                        "(default: %(default)s)")
    verify.add_argument("--device", default="cpu", help="torch device of the reference (default: %(default)s)")
    verify.add_argument("--min-psnr", type=float,
                        help="fixed PSNR floor vs the reference in dB (default: ORT 60, TensorRT 50; 45 for fp16 float "
                        "layers); the floor applied is min(this, noise floor - margin)")
    verify.add_argument("--min-identical", type=float,
                        help="also require this share of identical uint8 pixels (default: reported, not required)")
    verify.add_argument("--polygraphy", action="store_true",
                        help="also compare through Polygraphy's comparator (ORT engines; 99th percentile of the "
                        "error within half a uint8 level)")
    verify.add_argument("--noise-floor", type=float, metavar="SIGMA",
                        help="the reference's own noise floor: its PSNR against itself on inputs moved by Gaussian "
                        f"noise of this standard deviation (default: the size of the engine's float rounding: "
                        f"{DEFAULT_NOISE_SIGMA:g} for fp32 float layers, fp16's unit roundoff {FP16_NOISE_SIGMA:.3g} for "
                        "fp16 ones; 0 skips "
                        "it and applies the fixed floor alone)")
    verify.add_argument("--noise-draws", type=int, default=NOISE_DRAWS, metavar="N",
                        help="noise draws of the reference against itself (default: %(default)s): the first sets the "
                        "PSNR floor; the task tolerance (0.02 dB / 0.0005) widens to 3x the RMS of their task "
                        "differences where the reference itself moves more than that")
    verify.add_argument("--floor-margin", type=float, metavar="DB", default=NOISE_FLOOR_MARGIN,
                        help="the engine may sit this far below the noise floor (default: %(default)g dB); a deep "
                        "quantized model disagrees with itself under float noise more than any fixed floor allows")
    verify.add_argument("--codes", type=int, default=0, metavar="TILES",
                        help="ORT: compare the int8 codes of every quantizer on this many tiles of the first "
                        "image (where engine and reference start to differ)")
    verify.add_argument("--no-progress", action="store_true", help="hide progress bars")
    module = trt_backend()
    if module is not None and hasattr(module, "add_trt_arguments"):
        module.add_trt_arguments(parser)
    add_logging_arguments(parser)
    return parser


def graph_passes_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """``--graph-passes``: the pass names, checked (``none``: no pass)."""
    names = tuple(name.strip() for name in args.graph_passes.split(",") if name.strip())
    if names == ("none",):
        return ()
    unknown = [name for name in names if name not in PASSES]
    if unknown:
        raise UsageError(f"--graph-passes: unknown pass {', '.join(unknown)}; expected names from "
                         f"{', '.join(PASSES)} or 'none'")
    return names


def _build(args: argparse.Namespace) -> dict[str, Any]:
    passes = graph_passes_from_args(args)
    if args.backend == "openvino":
        from .openvino_engine import build_openvino_engine

        built = build_openvino_engine(args.onnx, args.out, args.threads, passes, args.float_precision)
        print(f"built {built.engine} + {Path(built.weights).name} ({built.seconds:.1f} s, OpenVINO "
              f"{built.openvino_version.split('-')[0]}, float layers in {built.float_precision})")
        print(f"layers running in int8 on this CPU: {built.int8_layers or 'none'}")
        print(f"graph passes (changes): {built.graph_passes or 'none'}")
        return built.to_dict()
    if args.backend == "ort":
        build = build_ort_engine(args.onnx, args.out, args.level, args.threads, passes)
        print(f"built {build.engine} ({sum(build.engine_ops.values())} nodes, {build.seconds:.1f} s)")
        print(f"integer kernels: {build.integer_kernels or 'none'}")
        print(f"standalone Q/DQ: {build.standalone_qdq or 'none'}")
        print(f"bias adds fused into integer kernels: {build.fused_bias_adds}")
        print(f"graph passes (changes): {build.graph_passes or 'none'}")
        return build.to_dict()
    module = trt_backend()
    if module is None or not hasattr(module, "run_trt_build"):
        raise UsageError("--backend trt needs the engines.trt module (TensorRT backend), which is not available here")
    options = module.trt_options_from_args(args)
    try:
        result = module.run_trt_build(options, args.onnx, args.out)
    except ImportError as err:  # TensorRT itself (or pycuda) missing: a failure, not a crash
        raise RuntimeError(f"--backend trt: {err}") from err
    print(f"built {args.out}")
    return {key: str(value) for key, value in vars(result).items()} if hasattr(result, "__dict__") else {"result": str(result)}


def _runner(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """The engine's tile runner, its provenance metadata, the export's float dtype (``fp32`` / ``fp16``).

    A TensorRT plan must have been built from ``--onnx`` (the runner checks its sidecar's ONNX hash).
    """
    if args.backend == "ort":
        runner = OrtTileRunner(args.out, threads=args.threads)
        return runner, dataclasses.asdict(runner.export), runner.export.float_dtype
    if args.backend == "openvino":
        from .openvino_engine import OpenVinoTileRunner

        runner = OpenVinoTileRunner(args.out, threads=args.threads, batch=args.batch)
        return runner, dataclasses.asdict(runner.export), runner.export.float_dtype
    from engines.trt.runner import TrtTileRunner
    from engines.trt.sidecar import read_sidecar

    record = read_sidecar(args.out)
    device = args.device if args.device != "cpu" else "cuda"
    runner = TrtTileRunner(args.out, device, onnx_path=args.onnx)
    return runner, record, plan_float_dtype(record, args.onnx)


def plan_float_dtype(record: dict[str, Any], onnx_path: str) -> str:
    """The float dtype (``fp32`` / ``fp16``) a TensorRT plan's float layers run in: the floor it is held to.

    The export's own ``float_dtype`` metadata, which the sidecar ``record`` copies, not a guess from
    the build precision (an int8 plan of an fp16 export is held to the fp16 floor); sidecars written
    before they carried it: read from ``onnx_path`` (the plan's source, its hash checked by the
    runner). A weakly typed build with the ``FP16`` builder flag may run an fp32 export's float
    layers in fp16, so it is held to the fp16 floor too.
    """
    if "FP16" in record.get("build_mode", {}).get("builder_flags", ()):
        return "fp16"
    return record.get("float_dtype") or ExportMetadata.read(onnx_path).float_dtype


def _verify(args: argparse.Namespace) -> dict[str, Any]:
    """The verification criterion of ARCHITECTURE.md s. 7 (:class:`engines.compare.Verdict`)."""
    args.weights = args.weights or str(defaults.DEFAULT_WEIGHTS)
    args.data = args.data or str(defaults.DEFAULT_DATA)
    if any(value is not None and value < 0 for value in (args.noise_floor, args.floor_margin)):
        raise UsageError("--noise-floor and --floor-margin must be non-negative")
    if args.noise_draws < 1:
        raise UsageError(f"--noise-draws must be positive, got {args.noise_draws}")
    runner, meta, float_dtype = _runner(args)
    if meta.get("artifact_sha256"):   # else a float export (2dq-export --float): its reference is the float model
        args.calib = args.calib or str(defaults.existing(defaults.artifact_of_onnx(args.onnx), "--calib"))
    check_provenance(meta, args.weights, args.calib, where=str(args.out))
    sets = [name.strip() for name in args.sets.split(",") if name.strip()]
    images = benchmark_images(args.data, sets, runner.scale)
    reference = reference_upscaler(args.weights, args.calib, runner.tile, overlap=args.overlap, batch=args.batch,
                                   device=args.device)   # one clean pass, shared by the engine check and the noise
    agreement = verify_engine(runner, args.weights, args.calib, images, overlap=args.overlap, batch=args.batch,
                              progress=not args.no_progress, reference=reference)
    fixed, _ = THRESHOLDS[(args.backend, float_dtype)]
    fixed = args.min_psnr if args.min_psnr is not None else fixed
    sigma = args.noise_floor if args.noise_floor is not None else noise_sigma(float_dtype)
    floor = None
    report: dict[str, Any] = {"sets": sets}
    spread = None
    if sigma > 0:
        draws = noise_floor(args.weights, args.calib, images, runner.tile, sigma=sigma,
                            progress=not args.no_progress, draws=args.noise_draws, reference=reference)
        own = draws[0]
        spread = task_noise(draws)
        print(f"noise floor (reference vs itself, input noise sigma {sigma:g}): {agreement_summary(own)}")
        if spread is not None:
            print(f"reference's own task spread over {len(draws)} noise draws (RMS): {spread[0]:.4f} dB PSNR, "
                  f"{spread[1]:.5f} SSIM")
        report["noise"] = {"sigma": sigma, "draws": len(draws),
                           **{k: v for k, v in own.to_dict().items() if k != "images"},
                           "task_differences": [d.task for d in draws]}
        floor = float(own.psnr_vs_reference)
    verdict = Verdict(agreement, fixed, floor, args.floor_margin, args.min_identical or 0.0, spread)
    print(f"verification on {','.join(sets)}: {verdict.summary()}")
    report.update(verdict.to_dict())
    if args.polygraphy:
        report["polygraphy"] = _polygraphy(args, runner, images)
    if args.codes:
        report["codes"] = _codes(args, runner, images)
    return report


def _check_float_export(args: argparse.Namespace) -> None:
    """Before building: the options --verify refuses for a float export (no artifact recorded), whose engine is
    compared with the float model of --weights."""
    try:
        artifact = ExportMetadata.read(args.onnx).artifact_sha256
    except ValueError:
        return   # not a 2dq export: the build reports it
    if artifact:
        return
    if args.calib:
        raise UsageError(f"--calib {args.calib}: {args.onnx} is a float export (2dq-export --float); --verify "
                         "compares its engine with the float model of --weights")
    if args.codes:
        raise UsageError(f"--codes compares quantizer codes; {args.onnx} is a float export and has none")


def _codes(args: argparse.Namespace, runner: Any, images: list) -> dict[str, Any]:
    if args.backend != "ort":
        raise UsageError("--codes reads the QuantizeLinear outputs of ORT engines")
    from calib.artifact import load_quantized_model

    from .code_agreement import code_agreement

    model = load_quantized_model(args.weights, args.calib, device="cpu")
    tiles = cut_tiles(images[0][1], runner.tile, runner.multiple, args.overlap)[: args.codes]
    rows = code_agreement(args.out, model, tiles, args.threads)
    first = next((row.node for row in rows if row.identical < 1.0), None)
    worst = min(rows, key=lambda row: row.identical)
    print(f"codes on {len(tiles)} tile(s): {sum(row.identical == 1.0 for row in rows)}/{len(rows)} quantizer calls "
          f"identical; first difference at {first or '-'}; worst {worst.node} ({100 * worst.identical:.2f}% identical)")
    return {"tiles": len(tiles), "first_difference": first, "per_call": [row.to_dict() for row in rows]}


def _polygraphy(args: argparse.Namespace, runner: Any, images: list) -> dict[str, Any]:
    if args.backend != "ort":
        raise UsageError("--polygraphy compares ORT engines; for TensorRT use engines.trt.verify")
    model = reference_model(args.weights, args.calib, args.device)
    tiles = [cut_tiles(lr, runner.tile, runner.multiple, args.overlap) for _, lr, *_ in images]
    batches = [chunk for t in tiles for chunk in t.split(args.batch)]
    passed, stats = polygraphy_compare(args.out, lambda x: model(x.to(args.device)), batches)
    worst = max(s["max_abs_error"] for s in stats)
    print(f"polygraphy: {len(batches)} tile batches, worst max abs error {worst:.3g} -> {'PASS' if passed else 'FAIL'}")
    return {"passed": passed, "batches": len(batches), "stats": stats}


def _main(args: argparse.Namespace) -> int:
    if args.onnx is None:
        args.onnx = str(defaults.existing(defaults.MAIN_ONNX, "--onnx",
                                          "export first: 2dq-export --onnx"))
    if not Path(args.onnx).is_file():
        raise UsageError(f"--onnx {args.onnx}: no such file")
    if args.float_precision != PRECISION and args.backend != "openvino":
        raise UsageError(f"--float-precision {args.float_precision} is an OpenVINO option (--backend openvino)")
    if args.out is None:
        if args.backend == "trt":
            raise UsageError("--out is required with --backend trt (a .plan file)")
        args.out = str(defaults.engine_path(args.onnx, args.backend))
    if args.verify:
        _check_float_export(args)
    report: dict[str, Any] = {"backend": args.backend, "build": _build(args)}
    ok = True
    if args.verify:
        report["verification"] = _verify(args)
        ok = report["verification"]["passed"] and report["verification"].get("polygraphy", {}).get("passed", True)
    elif args.polygraphy:
        raise UsageError("--polygraphy is part of --verify")
    if args.json:
        args.json.write(report)
    return EXIT_OK if ok else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
