"""Where a calibrated model still loses: quantizer groups switched on alone, and switched off alone.

Loads the fake-quant model of a calibration artifact (``load_quantized_model``: transforms re-created
and baked, exactly what ``2dq-eval`` and the export see), takes the held-out patches DQC validates on
(the same ``split_train_val`` split and seed of the training images; no test set is touched), and
measures the PSNR of the quantized output against the float output for:

- ``all``: every quantizer on (what the artifact deploys);
- each group **alone**: only that group's quantizers on (the damage it does by itself);
- everything **but** each group: that group float, the rest on (what making it lossless would give).

Groups are the quantizer role (``weight``, ``linear_input``, ``mlp_hidden``, ``attn_q``, ...), the
site kind (the layer and slot, e.g. ``qkv.input``, ``fc2.weight``, ``attn.matmul.0.a``; a product is
named by its owner, so DAT's spatial ``attns`` and channel ``attn`` products are told apart), the stage
(the top-level module, e.g. NGswin's ``encoder_layer1`` or SwinIR's ``layers.0``) and the block (the
path through ``blocks.<i>``).

    python benchmarks/quantizer_sensitivity.py --weights ../shared/models/NGswin/NGswin_x2.pth \\
        --artifact all240=runs/all240.safetensors --threads 1 \\
        --out benchmarks/results/ngswin_x2_sensitivity.json --markdown benchmarks/quantizer_sensitivity.md
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from calib.artifact import load_quantized_model
from calib.dqc_run import validation_batch
from toolchain.data.patches import list_images, split_train_val
from toolchain.loading import load_model
from toolchain.metrics import psnr
from toolchain.models import info_of
from toolchain.quant import quantizers

log = logging.getLogger("quantizer_sensitivity")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
GROUPINGS = ("role", "site", "stage", "block")


def group_of(name: str, role: str, grouping: str) -> str:
    """The group a quantizer belongs to: ``grouping`` is one of :data:`GROUPINGS`.

    >>> group_of("encoder_layer1.blocks.0.mlp.fc1.input", "linear_input", "site")
    'fc1.input'
    >>> group_of("layers.0.residual_group.blocks.1.attn.matmul.0.a", "attn_q", "site")
    'attn.matmul.0.a'
    >>> group_of("layers.0.blocks.2.attn.attns.1.matmul.1.a", "attn_probs", "site")
    'attns.matmul.1.a'
    >>> group_of("layers.0.blocks.2.attn.attns.1.matmul.1.a", "attn_probs", "block")
    'layers.0.blocks.2'
    """
    if grouping == "role":
        return role
    parts = name.split(".")
    if grouping == "site":
        if len(parts) > 3 and parts[-3] == "matmul":
            # a product is named by its owner (``<owner>[.<i>].matmul.<call>.a``) and its call order
            owner = parts[-5] if parts[-4].isdigit() and len(parts) > 4 else parts[-4]
            return ".".join([owner, *parts[-3:]])
        return ".".join(parts[-2:])
    if grouping == "block":
        if "blocks" in parts[:-1]:
            at = parts.index("blocks")
            return ".".join(parts[:at + 2])
        grouping = "stage"  # outside any block: its stage
    # the top-level module, with its index when it is a ModuleList (SwinIR's ``layers.0``)
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def held_out_patches(images: Path, val_fraction: float, seed: int, n: int, patch: int, scale: int) -> torch.Tensor:
    """``(n, 3, patch, patch)`` LR patches: DQC's validation batch for these options."""
    _, val_files = split_train_val(list_images(images), val_fraction, seed)
    return validation_batch(val_files, patch, scale, seed, n)[0]


@torch.no_grad()
def measure(model: torch.nn.Module, lr: torch.Tensor, batch: int, progress: bool,
            reference: Optional[torch.Tensor] = None) -> list[dict]:
    """One row per (grouping, group, mode) with the PSNR (dB) of the output against ``reference``: the float
    model's output on ``lr`` (clamped to [0, 1]); by default ``model`` with every quantizer off. An artifact of
    learned rounding stores its weights rounded, so there every quantizer off is not the float model: pass the
    float checkpoint's output, and the row ``none`` says what the stored weights cost."""
    found = quantizers(model)
    enabled = {name: q.enabled for name, q in found.items()}

    def run(on: set[str]) -> torch.Tensor:
        for name, quantizer in found.items():
            quantizer.enabled = name in on
        return torch.cat([model(chunk) for chunk in lr.split(batch)]).clamp(0, 1)

    jobs = [("all", "all", "all", set(found), len(found))]
    for grouping in GROUPINGS:
        members: dict[str, set[str]] = {}
        for name, quantizer in found.items():
            members.setdefault(group_of(name, quantizer.role, grouping), set()).add(name)
        for group, names in sorted(members.items()):
            jobs.append((grouping, group, "alone", names, len(names)))
            jobs.append((grouping, group, "all but", set(found) - names, len(names)))
    try:
        none = run(set())
        reference = none if reference is None else reference
        rows = [{"grouping": "none", "group": "none", "mode": "none", "quantizers": 0,
                 "psnr": round(psnr(none, reference, data_range=1.0), 3)}]
        for grouping, group, mode, on, count in tqdm(jobs, desc="groups", disable=not progress):
            rows.append({"grouping": grouping, "group": group, "mode": mode, "quantizers": count,
                         "psnr": round(psnr(run(on), reference, data_range=1.0), 3)})
    finally:
        for name, quantizer in found.items():
            quantizer.enabled = enabled[name]
    return rows


def markdown(data: dict) -> str:
    """One table per artifact: each group's PSNR alone and with everything else on but it."""
    out = []
    for name, entry in data["artifacts"].items():
        rows = entry["rows"]
        (total,) = [r["psnr"] for r in rows if r["mode"] == "all"]
        off = [r["psnr"] for r in rows if r["mode"] == "none"]   # absent in results from before it was measured
        stored = f"; every quantizer off {off[0]:.2f} dB (the weights as stored)" if off and off[0] != float("inf") \
            else ""
        out += [f"### {name} (`{entry['artifact']}`): all quantizers on {total:.2f} dB{stored}", "",
                "| grouping | group | quantizers | alone (dB) | all but this group (dB) | gain if lossless (dB) |",
                "|---|---|---|---|---|---|"]
        alone = {(r["grouping"], r["group"]): r for r in rows if r["mode"] == "alone"}
        but = {(r["grouping"], r["group"]): r for r in rows if r["mode"] == "all but"}
        for key in sorted(alone, key=lambda k: (GROUPINGS.index(k[0]), alone[k]["psnr"])):
            out.append(f"| {key[0]} | {key[1]} | {alone[key]['quantizers']} | {alone[key]['psnr']:.2f} | "
                       f"{but[key]['psnr']:.2f} | {but[key]['psnr'] - total:+.2f} |")
        out.append("")
    return "\n".join(out)


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="calibration artifact to analyse (repeatable)")
    parser.add_argument("--calib-images", type=Path, default=SHARED / "datasets/train")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as 2dq-calibrate's DQC (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="as 2dq-calibrate (default 0)")
    parser.add_argument("--patches", type=int, default=16, help="held-out patches (DQC validates on 16)")
    parser.add_argument("--patch-size", type=int, default=48, help="LR patch size (DQC's default 48)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (artifacts already there are skipped)")
    parser.add_argument("--markdown", type=Path, help="also render the tables here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.weights).is_file():
        parser.error(f"--weights: no file {args.weights}")
    data = json.loads(args.out.read_text()) if args.out.exists() else {"artifacts": {}}
    # every artifact is measured on the same patches against the float checkpoint's output (an artifact of learned
    # rounding stores rounded weights, so its model with every quantizer off is not the float model)
    float_model = load_model(args.weights).eval()
    lr = held_out_patches(args.calib_images, args.val_fraction, args.seed, args.patches, args.patch_size,
                          info_of(float_model).scale)
    with torch.no_grad():
        reference = torch.cat([float_model(chunk) for chunk in lr.split(args.batch)]).clamp(0, 1)
    for spec in args.artifact:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--artifact {spec!r}: expected NAME=PATH of an existing artifact file")
        if name in data["artifacts"]:
            log.info("%s: already in %s, skipped", name, args.out)
            continue
        model = load_quantized_model(args.weights, path)
        start = time.perf_counter()
        rows = measure(model, lr, args.batch, progress=not args.no_progress, reference=reference)
        data["artifacts"][name] = {
            "artifact": path, "weights": args.weights, "patches": list(lr.shape), "rows": rows,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
            "machine": {"platform": platform.platform(), "processor": platform.processor()}}
        save(args.out, data)
        log.info("%s: all quantizers on %.2f dB", name, next(r["psnr"] for r in rows if r["mode"] == "all"))
    if args.markdown:
        args.markdown.write_text(markdown(data))


if __name__ == "__main__":
    main()
