"""Ablation of the calibrations beyond 2DQuant (issue 10): DOBI bounds with per-channel weights,
folded channel smoothing and folded shifts, on a fake-quant model, PSNR-Y on benchmark sets.

Each variant: load the float checkpoint, attach quantizers, add its transforms, run DOBI on
calibration patches from the training split, set the shift offsets from the bounds, then measure
(1) PSNR of its output against the float output on held-out training patches (used to choose
SmoothQuant's alpha; never the test sets) and (2) PSNR-Y on the test sets. Results go to a JSON file
after every variant (a rerun skips variants already there).

``explicit`` variants are measurements, not deployable models: they smooth the inputs of linears
that no fold reaches (NGswin's residual stream into qkv and fc1) with an explicit per-channel
multiply, which the exported graph does not have.

    python benchmarks/beyond_2dquant.py --weights ../shared/models/NGswin/NGswin_x2.pth \\
        --out benchmarks/results/ngswin_x2_w4a4.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from calib.dobi import calibrate_dobi
from calib.observers import batch_forward_loop
from calib.transforms import (add_shifts, add_smoothing, calibrate_shifts, find_shift_sites, find_smoothing_groups,
                              init_shifts, init_smoothquant)
from toolchain import load_model
from toolchain.backends import TorchUpscaler
from toolchain.data.patches import sample_patches, split_train_val
from toolchain.evaluate import evaluate_set
from toolchain.files import atomic_path
from toolchain.metrics import psnr_from_mse
from toolchain.quant import QuantConfig, QuantLinear, float_mode, quantize_model

log = logging.getLogger("beyond_2dquant")

#: name -> (weight granularity, folded smoothing, shift offsets (None, "init": DOBI's bounds made
#: exact, "search": DOBI re-scored on the shifted grid), explicit smoothing)
VARIANTS = {
    "dobi": ("per-tensor", False, None, False),
    "dobi+per-channel": ("per-channel", False, None, False),
    "dobi+smoothing": ("per-tensor", True, None, False),
    "dobi+shifts-init": ("per-tensor", False, "init", False),
    "dobi+shifts": ("per-tensor", False, "search", False),
    "dobi+per-channel+smoothing": ("per-channel", True, None, False),
    "dobi+all": ("per-channel", True, "search", False),
    "dobi+explicit": ("per-tensor", False, None, True),
    "dobi+all+explicit": ("per-channel", True, "search", True),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two outputs clamped to [0, 1], the MSE in their dtype."""
    return psnr_from_mse(float((a.clamp(0, 1) - b.clamp(0, 1)).square().mean()), 1.0)


def explicit_smoothing(model: nn.Module, forward_loop, alpha: float, covered: set[str]) -> int:
    """Smooth every input-quantized linear outside ``covered`` with a forward pre-hook ``x / s`` and
    ``W * s`` (SmoothQuant rule); a measurement of what an explicit Mul in the graph would buy."""
    targets = {p: m for p, m in model.named_modules()
               if isinstance(m, QuantLinear) and m.input_quantizer is not None and p not in covered
               and m.input_quantizer.role == "linear_input"}
    amax: dict[str, torch.Tensor] = {}

    def record(path):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[path] = torch.maximum(amax.get(path, torch.zeros_like(x)), x)
        return hook

    handles = [m.register_forward_pre_hook(record(p)) for p, m in targets.items()]
    with torch.no_grad(), float_mode(model):
        forward_loop(model)
    for handle in handles:
        handle.remove()
    for path, module in targets.items():
        columns = module.weight.detach().abs().amax(0).clamp_min(1e-5)
        scale = amax[path].clamp_min(1e-5).pow(alpha) / columns.pow(1 - alpha)
        with torch.no_grad():
            module.weight.mul_(scale)
        module.register_forward_pre_hook(lambda m, args, s=scale: (args[0] / s,))
    return len(targets)


def build(args, variant: str, alpha: float, calib: torch.Tensor) -> tuple[nn.Module, dict]:
    granularity, smoothing, shifts, explicit = VARIANTS[variant]
    model = load_model(args.weights)
    quantize_model(model, QuantConfig(w_bits=args.bits, a_bits=args.bits, weight_granularity=granularity))
    example = calib[:1]
    facts: dict = {}
    loop = batch_forward_loop(calib, args.batch_size, progress=False)
    groups = find_smoothing_groups(model, example) if smoothing else []
    sites = find_shift_sites(model, example) if shifts else []
    if groups:
        add_smoothing(model, groups)
        init_smoothquant(model, loop, alpha)
    facts["smoothing_groups"] = {k: sum(g.kind == k for g in groups) for k in ("norm", "value")}
    if explicit:
        covered = {p for g in groups for p in g.linears}
        facts["explicit_linears"] = explicit_smoothing(model, loop, alpha, covered)
    if sites:
        add_shifts(model, sites)
    facts["shift_sites"] = {k: sum(s.kind == k for s in sites) for k in ("norm_output", "attn_value", "attn_key")}
    calibrate_dobi(model, loop)
    if shifts == "init":
        init_shifts(model)
    elif shifts == "search":
        calibrate_shifts(model, loop)
    return model, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", default="../shared/datasets")
    parser.add_argument("--out", required=True, help="JSON results (updated after every variant)")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits (default 4)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ",".join(VARIANTS))
    parser.add_argument("--alphas", default="0.5,0.7", help="SmoothQuant alphas to choose from on held-out patches")
    parser.add_argument("--sets", default="Set5", help="comma-separated test sets")
    parser.add_argument("--calib-patches", type=int, default=16)
    parser.add_argument("--val-patches", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("calib").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    fp = load_model(args.weights)
    scale = fp.scale
    train, val = split_train_val(Path(args.data) / "train", 0.1, seed=0)
    calib, _ = sample_patches(train, args.calib_patches, args.patch_size, scale, seed=0)
    held_out, _ = sample_patches(val, args.val_patches, args.patch_size, scale, seed=1)
    with torch.no_grad():
        fp_held_out = fp(held_out)
    sets = [s for s in args.sets.split(",") if s]
    results.setdefault("setup", {
        "weights": str(args.weights), "bits": args.bits, "calib_patches": args.calib_patches,
        "val_patches": args.val_patches, "patch_size": args.patch_size, "torch": torch.__version__,
        "threads": args.threads})

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=2))

    if "fp" not in results:
        results["fp"] = {s: evaluate_set(TorchUpscaler(fp), args.data, s, scale, progress=False).psnr for s in sets}
        save()
    log.info("fp: %s", results["fp"])
    alphas = [float(a) for a in args.alphas.split(",")]
    for variant in args.variants.split(","):
        if variant in results:
            continue
        start = time.perf_counter()
        smooths = VARIANTS[variant][1] or VARIANTS[variant][3]
        tried = {}
        best = None
        for alpha in (alphas if smooths else [None]):
            model, facts = build(args, variant, alpha if alpha is not None else 0.5, calib)
            with torch.no_grad():
                tried[str(alpha)] = psnr(model(held_out), fp_held_out)
            log.info("%s alpha %s: held-out %.3f dB", variant, alpha, tried[str(alpha)])
            if best is None or tried[str(alpha)] > best[0]:
                best = (tried[str(alpha)], alpha, model, facts)
        held, alpha, model, facts = best
        entry = {"held_out_psnr_vs_fp": held, "alpha": alpha, "alphas_tried": tried, **facts}
        for s in sets:
            entry[s] = evaluate_set(TorchUpscaler(model), args.data, s, scale, progress=False).psnr
        entry["seconds"] = round(time.perf_counter() - start)
        results[variant] = entry
        save()
        log.info("%s: %s", variant, entry)


if __name__ == "__main__":
    main()
