"""Benchmark: peer PTQ tools against ours on the shipped DAT-light x4, same data, same machine, one run.

Issue 22 item 4. Every row quantizes the official DAT-light x4 (``DEFAULT_WEIGHTS``) on the same
calibration patches (``sample_patches(DEFAULT_CALIB_IMAGES, 32, 64, 4, seed=0)``, exactly what
``2dq-calibrate`` draws by default) and is evaluated on Set5 x4 (PSNR/SSIM on Y, crop = scale) through
64x64 tiles, overlap 16, 4 tiles per call (what ``2dq-eval --backend ort`` does):

- **ours**: ``2dq-calibrate`` (``--method minmax``, ``dobi``, ...) -> ``2dq-export --onnx`` ->
  ``2dq-build-engine --backend ort`` -> ``2dq-eval --backend ort`` (the console scripts, as a user runs
  them). Placement: every linear and both operands of every attention matmul (252 quantizers).
- **ORT**: ``onnxruntime.quantization.quantize_static`` on our float export of the same model
  (opset 21, the graph our QDQ exports start from), QDQ format, per tensor, ``op_types_to_quantize
  ["MatMul"]`` (the 72 linears and 54 attention matmuls; convolutions stay float, the 54 ``Gemm`` of
  DAT's position-bias MLP see only constants), W8A8 = QInt8 weights / QUInt8 activations, W4A4 =
  QInt4 / QUInt4; calibration MinMax, Entropy, Percentile with ORT's defaults. The engine is the QDQ
  model loaded by ORT (level ``all``).
- **ModelOpt**: ``mtq.quantize(model, cfg, forward_loop)`` on CPU with ``INT8_DEFAULT_CFG`` (W8A8), and
  the same config with ``num_bits=4`` for its weight and input quantizers (W4A4); variant ``no-conv``
  disables its ``nn.Conv2d`` quantizers (closer to our placement). Evaluated as the PyTorch fake-quant
  model, and as an ORT engine where its ONNX export (``torch.onnx.export``, TorchScript) runs.
- **FP**: our float export on ORT.

Then every engine is timed in the same interleaved rounds: one 64x64 tile, ``--threads`` ORT threads,
median. Steps that fail are recorded with their error, not hidden. Per-row results are cached in
``--out-dir/rows`` (rerun resumes; ``--force`` redoes).

    python benchmarks/peer_ptq.py --out-dir /tmp/peer_ptq --json benchmarks/results/peer_ptq.json \\
        --modelopt-site /work/peer_site
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ort_speed import time_rounds
from toolchain.backends import TiledUpscaler, TorchUpscaler
from toolchain.data.patches import sample_patches
from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_WEIGHTS
from toolchain.evaluate import evaluate_set
from toolchain.files import atomic_path, sha256_file
from toolchain.inference import TileSpec
from toolchain.loading import load_model

log = logging.getLogger("peer_ptq")

TILE, OVERLAP, TILES_PER_CALL, SCALE, SET = 64, 16, 4, 4, "Set5"
WIDTHS = {"w8a8": 8, "w4a4": 4}
OURS = {"minmax": ["--method", "minmax"], "dobi": ["--method", "dobi"],
        "dobi+pc+smooth+shifts": ["--method", "dobi", "--granularity", "per-channel", "--smooth", "all", "--shifts"]}
#: ORT rows: name -> (CalibrationMethod, quantize the MatMul outputs too). ORT's QDQ quantizer also puts Q/DQ on
#: every MatMul output by default; the rows without ``+outputs`` exclude them (OpTypesToExcludeOutputQuantization),
#: which quantizes the same 180 activation tensors and 72 weights as our placement
ORT_METHODS = {"MinMax": ("MinMax", False), "Entropy": ("Entropy", False), "Percentile": ("Percentile", False),
               "MinMax+outputs": ("MinMax", True)}
MODELOPT_VARIANTS = ("default", "no-conv")


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) < 600 else text[:600] + " ..."


class OnnxTiles:
    """Any ONNX graph with one input ``(N, 3, T, T)`` as a tile runner; a graph that refuses a batch runs tile by tile."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort
        from engines.ort_engine import session_options

        self.session = ort.InferenceSession(str(path), session_options("all", threads), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.tile, self.scale, self.multiple = TILE, SCALE, 1
        # a graph traced for one tile (TorchScript fixes DAT's window batch arithmetic) may accept a batch
        # and mix its tiles up: batched only where two different tiles come out as they do one by one
        probe = np.random.default_rng(0).random((2, 3, TILE, TILE), dtype=np.float32)
        try:
            together = self._run(probe)
            alone = np.concatenate([self._run(probe[i:i + 1]) for i in range(2)])
            self.batched = together.shape == alone.shape and float(np.abs(together - alone).max()) < 1e-3
        except Exception:  # ORT's own exception types: a graph that refuses a batch of 2
            self.batched = False

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(tiles.numpy(), dtype=np.float32)
        if self.batched:
            return torch.from_numpy(self._run(x))
        return torch.from_numpy(np.concatenate([self._run(x[i:i + 1]) for i in range(len(x))]))


def evaluate(upscaler: Any, data: Path) -> dict[str, float]:
    result = evaluate_set(upscaler, data, SET, SCALE, progress=True)
    return {"psnr": result.psnr, "ssim": result.ssim}


def engine_ops(path: Path, out: Path) -> dict[str, int]:
    """Op counts of what ORT makes of a graph (level ``extended``, as ``2dq-build-engine`` saves): integer kernels, Q/DQ."""
    import collections

    import onnx
    import onnxruntime as ort
    from engines.ort_engine import INTEGER_OPS, session_options

    options = session_options("extended", 1)
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    out.unlink()
    return {"integer_kernels": sum(counts[k] for k in INTEGER_OPS),
            **{k: counts[k] for k in (*INTEGER_OPS, "QuantizeLinear", "DequantizeLinear", "MatMul") if counts[k]}}


# ---------------------------------------------------------------- rows


def run_ours(key: str, flags: list[str], bits: int, args: argparse.Namespace) -> dict[str, Any]:
    """Our console scripts, as a user runs them: calibrate, export, build the ORT engine, evaluate it."""
    out, bin_dir, t = args.out_dir, Path(sys.executable).parent, str(args.work_threads)
    artifact, onnx_file, engine = out / f"{key}.safetensors", out / f"{key}.onnx", out / f"{key}.ort.onnx"
    steps = [("calibrate", ["2dq-calibrate", *flags, "--bits", str(bits), "--out", str(artifact), "--threads", t,
                            "--patches", str(args.patches), "--batch", str(args.batch), "--seed", "0", "--no-progress"]),
             ("export", ["2dq-export", "--onnx", str(onnx_file), "--calib", str(artifact), "--tile", str(TILE)]),
             ("build", ["2dq-build-engine", "--backend", "ort", "--onnx", str(onnx_file), "--out", str(engine),
                        "--threads", t]),
             ("eval", ["2dq-eval", "--backend", "ort", "--engine", str(engine), "--data", str(args.data), "--sets", SET,
                       "--threads", t, "--no-progress"])]
    row: dict[str, Any] = {"commands": [], "errors": {}, "seconds": {}}
    for step, cmd in steps:
        report = out / f"{key}_{step}.json"
        cmd = [str(bin_dir / cmd[0]), *cmd[1:], "--json", str(report)]
        row["commands"].append(" ".join([Path(cmd[0]).name, *cmd[1:]]))
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        row["seconds"][step] = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            row["errors"][step] = f"exit {done.returncode}: {done.stderr.strip()[-600:]}"
            return row
        summary = json.loads(report.read_text())
        if step == "calibrate":
            row["calib_s"] = summary["seconds"]
        elif step == "eval":
            row.update(psnr=summary["results"][0]["psnr"], ssim=summary["results"][0]["ssim"])
    row["engine"] = str(engine)
    row["engine_ops"] = engine_ops(engine, out / f"{key}.tmp.onnx")
    return row


def run_ort(key: str, name: str, bits: int, fp32: Path, patches: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        """Batches of ``--ort-chunk`` patches; ``set_range`` serves ORT's strided collection (CalibStridedMinMax)."""

        def __init__(self) -> None:
            self.batches = [{"input": b.numpy()} for b in patches.split(args.ort_chunk)]
            self.items = iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(self.batches[start_index:end_index])

        def get_next(self):
            return next(self.items, None)

    weight_type, activation_type = ((QuantType.QInt8, QuantType.QUInt8) if bits == 8
                                    else (QuantType.QInt4, QuantType.QUInt4))
    out = args.out_dir / f"{key}.onnx"
    method, outputs = ORT_METHODS[name]
    extra = {"CalibStridedMinMax": 1, **({} if outputs else {"OpTypesToExcludeOutputQuantization": ["MatMul"]})}
    settings = {"extra_options": extra, "quant_format": "QDQ", "op_types_to_quantize": ["MatMul"], "per_channel": False,
                "weight_type": weight_type.name, "activation_type": activation_type.name, "calibrate_method": method,
                "calibration batches": f"{len(patches)} patches in batches of {args.ort_chunk}, collected one "
                "batch at a time (extra_options CalibStridedMinMax=1)"}
    row: dict[str, Any] = {"settings": settings, "errors": {}}
    started = time.perf_counter()
    try:
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=False, reduce_range=False, activation_type=activation_type,
                        weight_type=weight_type, calibrate_method=getattr(CalibrationMethod, method),
                        extra_options=extra)
    except Exception as err:  # ORT raises many types; the row records it
        row["errors"]["quantize_static"] = error_text(err)
        return row
    row["calib_s"] = round(time.perf_counter() - started, 1)
    return finish_onnx_row(row, out, args)


def finish_onnx_row(row: dict[str, Any], path: Path, args: argparse.Namespace, step: str = "eval") -> dict[str, Any]:
    """Load a peer's ONNX in ORT, count its kernels, evaluate it on Set5 through tiles."""
    try:
        runner = OnnxTiles(path, args.work_threads)
        row["engine"], row["engine_batched"] = str(path), runner.batched
        row["engine_ops"] = engine_ops(path, path.with_suffix(".tmp.onnx"))
        scores = evaluate(TiledUpscaler(runner, overlap=OVERLAP, batch=TILES_PER_CALL), args.data)
        row.update(scores if step == "eval" else {f"engine_{k}": v for k, v in scores.items()})
    except Exception as err:  # ORT refusing a graph is a result
        row["errors"][step] = error_text(err)
    return row


def modelopt_config(mtq: Any, bits: int, variant: str) -> dict[str, Any]:
    """``INT8_DEFAULT_CFG``; at 4 bits its weight and input quantizers take ``num_bits=4``; ``no-conv``: Conv2d off."""
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = config["quant_cfg"]
    if bits != 8:
        for entry in entries:
            if entry.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "cfg" in entry:
                entry["cfg"]["num_bits"] = bits
    if variant == "no-conv":
        entries.append({"quantizer_name": "*", "parent_class": "nn.Conv2d", "enable": False})
    return config


def run_modelopt(key: str, variant: str, bits: int, patches: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    import collections

    row: dict[str, Any] = {"errors": {}}
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.nn import TensorQuantizer
    except Exception as err:  # not installed, or a missing dependency
        row["errors"]["import"] = error_text(err)
        return row
    row["version"] = modelopt.__version__
    model = load_model(DEFAULT_WEIGHTS).eval()
    config = modelopt_config(mtq, bits, variant)
    row["config"] = [e for e in config["quant_cfg"][:3]] + config["quant_cfg"][-1:] + [{"algorithm": config["algorithm"]}]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in patches.split(args.batch):
                m(batch)

    started = time.perf_counter()
    try:
        model = mtq.quantize(model, config, forward_loop)
    except Exception as err:
        row["errors"]["quantize"] = error_text(err)
        return row
    row["calib_s"] = round(time.perf_counter() - started, 1)
    enabled = collections.Counter()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            parent = type(modules[name.rsplit(".", 1)[0]]).__name__
            enabled[f"{parent}.{name.rsplit('.', 1)[1]}"] += 1
    row["enabled_quantizers"] = dict(enabled)
    try:
        row.update(evaluate(TorchUpscaler(model, "cpu", TileSpec(TILE, OVERLAP, TILES_PER_CALL)), args.data))
    except Exception as err:
        row["errors"]["eval_fake_quant"] = error_text(err)
    path = args.out_dir / f"{key}.onnx"
    started = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (torch.zeros(1, 3, TILE, TILE),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        row["export_s"] = round(time.perf_counter() - started, 1)
    except Exception as err:
        row["errors"]["onnx_export"] = error_text(err)
        return row
    return finish_onnx_row(row, path, args, step="engine_eval")


# ---------------------------------------------------------------- driver


def selected(spec: str, width: str, known: Any, option: str) -> list[str]:
    """Names of ``spec`` (``a,b@w4a4,c@w8a8+w4a4``) that run at ``width``; an unknown name exits with a usage error."""
    names = []
    for item in (i.strip() for i in spec.split(",")):
        name, _, only = item.partition("@")
        if not name:
            continue
        if name not in known or (only and set(only.split("+")) - set(WIDTHS)):
            raise SystemExit(f"{option}: unknown entry {item!r}; names are {', '.join(known)}, widths {', '.join(WIDTHS)}")
        if not only or width in only.split("+"):
            names.append(name)
    return names


def cached(key: str, args: argparse.Namespace, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = args.out_dir / "rows" / f"{key}.json"
    if path.exists() and not args.force:
        log.info("%s: cached (%s)", key, path)
        return json.loads(path.read_text())
    log.info("%s: running", key)
    started = time.perf_counter()
    row = {"key": key, **make(), "row_s": 0.0}
    row["row_s"] = round(time.perf_counter() - started, 1)
    for step, err in row.get("errors", {}).items():
        log.warning("%s: %s failed: %s", key, step, err)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(row, indent=2) + "\n")
    return row


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import onnx
    import onnxruntime

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # uncommitted edits of tracked files (a shared working tree): what the rows ran that the commit does not say
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.split("\n")
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "git_commit": commit,
            "git_uncommitted": [line.strip() for line in dirty if line.strip()],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def latency(rows: list[dict[str, Any]], threads: int, rounds: int) -> dict[str, float]:
    """Median ms of one 64x64 tile per engine, all engines in the same interleaved rounds."""
    from engines.ort_engine import OrtTileRunner

    runners = {}
    for row in rows:
        if not row.get("engine"):
            continue
        try:
            path = Path(row["engine"])
            runners[row["key"]] = (OrtTileRunner(path, threads=threads) if row["key"].startswith("ours")
                                   else OnnxTiles(path, threads))
        except Exception as err:
            row.setdefault("errors", {})["latency"] = error_text(err)
    tile = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    seconds = time_rounds({k: (lambda r=r: r(tile)) for k, r in runners.items()}, rounds)
    return {k: round(1000 * v, 1) for k, v in seconds.items()}


def table(rows: list[dict[str, Any]]) -> str:
    fp_ms = next((r.get("latency_ms") for r in rows if r["key"] == "fp32"), None)
    lines = ["| tool | method | W/A | Set5 PSNR / SSIM (engine) | Set5 PSNR / SSIM (PyTorch fake-quant) | calibrate (s) | "
             "1 tile, 1 thread (ms) | x vs FP32 | integer kernels | failed |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        def pair(p: str, s: str) -> str:
            return f"{r[p]:.2f} / {r[s]:.4f}" if r.get(p) is not None else "–"
        engine = pair("engine_psnr", "engine_ssim") if r["tool"] == "ModelOpt" else pair("psnr", "ssim")
        fake = pair("psnr", "ssim") if r["tool"] == "ModelOpt" else "–"
        ms, calib = r.get("latency_ms"), r.get("calib_s")
        lines.append(f"| {r['tool']} | {r['method']} | {r['width']} | {engine} | {fake} | "
                     f"{f'{calib:.0f}' if calib is not None else '–'} | "
                     f"{ms if ms is not None else '–'} | {f'{fp_ms / ms:.2f}' if ms and fp_ms else '–'} | "
                     f"{r.get('engine_ops', {}).get('integer_kernels', '–')} | "
                     f"{'; '.join(f'{k}: {v[:120]}' for k, v in r.get('errors', {}).items()) or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for exports, engines and cached rows")
    parser.add_argument("--json", type=Path, help="write every row, the machine and the versions as JSON")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"), help="benchmark root with Set5 (default: %(default)s)")
    parser.add_argument("--patches", type=int, default=32, help="calibration LR patches 64x64 for every method")
    parser.add_argument("--batch", type=int, default=8, help="calibration patches per forward (every tool)")
    parser.add_argument("--ort-chunk", type=int, default=4,
                        help="patches per ORT calibration batch, collected one batch at a time: ORT's histogram "
                        "calibrators (Entropy, Percentile) keep every intermediate tensor of what they collect at "
                        "once, and all 32 patches at once took more than this machine's 23 GiB (default: %(default)s)")
    parser.add_argument("--ours", default="minmax,dobi,dobi+pc+smooth+shifts@w4a4",
                        help=f"our methods, from {', '.join(OURS)}; NAME@w4a4 runs one at that width only "
                        "(default: %(default)s)")
    parser.add_argument("--ort-methods", default=",".join(ORT_METHODS),
                        help="ORT calibration methods; +outputs: also ORT's default Q/DQ on every MatMul output "
                        "(default: %(default)s)")
    parser.add_argument("--modelopt-variants", default="default,no-conv",
                        help=f"ModelOpt variants, from {', '.join(MODELOPT_VARIANTS)} (default: %(default)s)")
    parser.add_argument("--widths", default=",".join(WIDTHS), help="comma-separated: w8a8, w4a4")
    parser.add_argument("--modelopt-site", help="folder where nvidia-modelopt was installed with pip --target (appended "
                        "to sys.path, so that the project's packages win any clash)")
    parser.add_argument("--work-threads", type=int, default=1,
                        help="torch threads and our tools' --threads for calibration and evaluation, ORT threads of "
                        "the evaluation (ORT's calibration session takes ORT's default); on this shared 2-core VM "
                        "2 threads made 2dq-calibrate --method dobi 14x slower than 1 (452 s vs 31 s) "
                        "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads of the latency timing (default: 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    parser.add_argument("--force", action="store_true", help="recompute cached rows")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    # the exporters' own INFO logs run to thousands of lines: only this script's progress at INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.modelopt_site:
        sys.path.append(str(Path(args.modelopt_site).resolve()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.data = args.data.resolve()
    torch.set_num_threads(args.work_threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    if not widths or set(widths) - set(WIDTHS):
        parser.error(f"--widths: expected a comma-separated subset of {', '.join(WIDTHS)}, got {args.widths!r}")
    patches, _ = sample_patches(DEFAULT_CALIB_IMAGES, args.patches, TILE, SCALE, seed=0)

    fp32 = args.out_dir / "fp32.onnx"

    def fp_row() -> dict[str, Any]:
        from export.onnx_export import ExportOptions, export_float_onnx

        t0 = time.perf_counter()
        export_float_onnx(DEFAULT_WEIGHTS, fp32, ExportOptions(tile=TILE))   # = 2dq-export --float
        return finish_onnx_row({"errors": {}, "export_s": round(time.perf_counter() - t0, 1)}, fp32, args)

    rows = [{"tool": "FP", "method": "our float export", "width": "FP32", **cached("fp32", args, fp_row)}]
    for width in widths:
        bits = WIDTHS[width]
        for method in selected(args.ours, width, OURS, "--ours"):
            key = f"ours_{method}_{width}"
            rows.append({"tool": "ours", "method": method, "width": width.upper(),
                         **cached(key, args, lambda k=key, m=method: run_ours(k, OURS[m], bits, args))})
        for method in selected(args.ort_methods, width, ORT_METHODS, "--ort-methods"):
            key = f"ort_{method.lower().replace('+', '_')}_{width}"
            rows.append({"tool": "ORT quantize_static", "method": method, "width": width.upper(),
                         **cached(key, args, lambda k=key, m=method: run_ort(k, m, bits, fp32, patches, args))})
        for variant in selected(args.modelopt_variants, width, MODELOPT_VARIANTS, "--modelopt-variants"):
            key = f"modelopt_{variant}_{width}"
            rows.append({"tool": "ModelOpt", "method": f"mtq {variant}", "width": width.upper(),
                         **cached(key, args, lambda k=key, v=variant: run_modelopt(k, v, bits, patches, args))})
    log.info("latency: %d rounds, %d thread(s), one %dx%d tile", args.rounds, args.threads, TILE, TILE)
    load_timing = os.getloadavg()
    for key, ms in latency(rows, args.threads, args.rounds).items():
        next(r for r in rows if r["key"] == key)["latency_ms"] = ms
    result = {"machine": {**machine(), "load_before": load_before, "load_before_timing": load_timing,
                          "load_after": os.getloadavg()},
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "setup": {"weights": str(DEFAULT_WEIGHTS), "weights_sha256": sha256_file(DEFAULT_WEIGHTS),
                        "calib_images": str(DEFAULT_CALIB_IMAGES), "patches": args.patches, "patch_size": TILE,
                        "seed": 0, "batch": args.batch, "data": str(args.data), "set": SET, "scale": SCALE,
                        "tiles": {"tile": TILE, "overlap": OVERLAP, "per_call": TILES_PER_CALL},
                        "work_threads": args.work_threads, "latency_threads": args.threads, "rounds": args.rounds},
              "total_s": round(time.perf_counter() - started, 1), "rows": rows}
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
