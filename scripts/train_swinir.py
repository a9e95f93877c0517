"""Train the project's reference SwinIR-light checkpoints (a project tool, not part of the user CLI).

SwinIR-light as released (spandrel's copy of the official architecture code, so the official state-dict
layout), L1 loss, Adam (lr 2e-4 as the paper), random
64x64 LR patches with flips/rotations from ``../shared/datasets/train`` (a held-out split validates;
the test sets never enter), LR made with the project's MATLAB bicubic. The paper halves the rate at
milestones over 500k iterations; a GPU budget of ~25 minutes allows a few percent of that, for
which a linear warmup then cosine decay (to 1% of the peak) is the better-behaved schedule.

Runs are resumable and chainable across short device calls: ``--time-limit-min`` stops cleanly
(checkpoint written) before a wall-clock limit counted from the start of the process, SIGTERM
does the same, and ``--resume`` continues from ``OUT/last.pt`` (or starts fresh if there is none,
so every chunk runs the same command). At the end (or with ``--export``) the weights are written
as ``OUT/swinir_<config>_x<scale>.safetensors`` with the official keys (buffers included), readable by
``toolchain.load_model``. See ``models/README.md`` for the GPU recipe.

    python scripts/train_swinir.py --data runs/train_x4.npz --out runs/swinir_light_x4 \\
        --device cuda --iters 20000 --batch 32 --time-limit-min 9 --resume

Exit codes: 0 finished or stopped at the time limit / --stop-after (resumable), 143 stopped by
SIGTERM (checkpoint written), 1 failure, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import train_lib as lib
from pack_train_data import load_images
from toolchain.cli.common import UsageError, add_logging_arguments, run_cli
from toolchain.data import split_train_val

log = logging.getLogger("train_swinir")
EXIT_SIGTERM = 128 + signal.SIGTERM
# Arguments that define a run: a resumed run must use the same ones (others may change per chunk).
RUN_KEYS = ("config", "scale", "patch", "batch", "lr", "warmup", "seed", "val_fraction")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_swinir.py", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 done or cleanly stopped, 143 SIGTERM, 1 failure, 2 usage.")
    p.add_argument("--data", default="../shared/datasets/train", help="image folder or .npz pack (default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder: last.pt, train_log.jsonl, exported weights")
    p.add_argument("--config", choices=sorted(lib.CONFIGS), default="light", help="model size (default: %(default)s)")
    p.add_argument("--scale", type=int, choices=[2, 3, 4], default=4)
    p.add_argument("--patch", type=int, default=64, help="LR patch size, a multiple of 8 (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="patches per iteration (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20000, help="total iterations; sets the schedule (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="linear warmup iterations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init, patch sampling and split seed")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the images (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=1000, help="validate every N iterations and at the end; 0: never")
    p.add_argument("--log-every", type=int, default=100, help="log the mean loss every N iterations")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N iterations")
    p.add_argument("--time-limit-min", type=float, help="stop cleanly before this many minutes since start")
    p.add_argument("--stop-after", type=int, help="stop cleanly after N iterations in this call")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--init", metavar="CKPT", help="start from these weights, except the upsampler (x4 -> x2)")
    p.add_argument("--export", action="store_true", help="only export OUT/last.pt's weights, then exit")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--fp32", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_logging_arguments(p)
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("patch", "batch", "iters", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.patch % 8:
        raise UsageError(f"--patch {args.patch} must be a multiple of the window size 8")
    if not 0 <= args.warmup < args.iters:
        raise UsageError(f"--warmup {args.warmup} must be in [0, --iters {args.iters})")
    if args.val_every < 0 or (args.stop_after is not None and args.stop_after < 1):
        raise UsageError("--val-every must be >= 0 and --stop-after >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")


def _export(model, config: dict, out: Path, run: dict, iteration: int, val_psnr: float | None) -> Path:
    path = out / f"swinir_{run['config']}_x{run['scale']}.safetensors"
    meta = {"arch": "SwinIR", "config": config, "iterations": iteration, "val_psnr_y": val_psnr,
            "data_sha256": run["data_sha256"], "run": run, "trained_by": "scripts/train_swinir.py"}
    lib.export_weights(model, path, meta)
    log.info("exported %s (iteration %d, validation PSNR-Y %s)", path, iteration, val_psnr)
    return path


def _model_rng(device: torch.device) -> dict:
    """The global RNG states that stochastic depth draws from (saved so that a resume is exact)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def _set_model_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    _check(args)
    out, device = Path(args.out), torch.device(args.device)
    ckpt_path = out / "last.pt"
    state = lib.load_checkpoint(ckpt_path) if (args.resume or args.export) and ckpt_path.exists() else None
    if args.export:
        if state is None:
            raise UsageError(f"--export: no checkpoint {ckpt_path}")
        model = lib.build_model(state["model_config"])
        model.load_state_dict(state["model"])
        print(_export(model, state["model_config"], out, state["run"], state["iteration"], state.get("val_psnr_y")))
        return 0
    if ckpt_path.exists() and not args.resume:
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")

    data = load_images(args.data, progress=not args.no_progress)
    train_names, val_names = split_train_val(data.names, args.val_fraction, seed=args.seed)
    by_name = dict(zip(data.names, data.images))
    train_pairs = lib.make_pairs([by_name[n.as_posix()] for n in train_names], args.scale, not args.no_progress)
    val_pairs = lib.make_pairs([by_name[n.as_posix()] for n in val_names], args.scale)
    sampler = lib.PairSampler(train_pairs, args.patch, args.scale, device)
    run = {key: getattr(args, key) for key in RUN_KEYS} | {"data_sha256": data.sha256}
    log.info("data ready in %.1f s (%s)", time.monotonic() - start, args.data)

    torch.manual_seed(args.seed)
    config = lib.model_config(args.config, args.scale)
    model = lib.build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=lib.ADAM_BETAS)
    generator = torch.Generator().manual_seed(args.seed)
    iteration, val_psnr = 0, None
    out.mkdir(parents=True, exist_ok=True)
    journal = lib.JsonLog(out / "train_log.jsonl")
    if state is not None:
        changed = {k: (state["run"].get(k), v) for k, v in run.items() if state["run"].get(k) != v}
        if changed:
            raise UsageError(f"--resume: {ckpt_path} was trained with other settings (checkpoint, now): {changed}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["sampler_rng"])
        _set_model_rng(state, device)
        iteration, val_psnr = state["iteration"], state.get("val_psnr_y")
        if args.iters < iteration:
            raise UsageError(f"--iters {args.iters} is below the checkpoint's iteration {iteration}")
        if args.iters != state["iters"]:
            log.warning("--iters changed from %d to %d: the cosine schedule stretches from here", state["iters"], args.iters)
        if args.init:
            log.info("--init %s ignored: resuming %s", args.init, ckpt_path)
        journal.truncate_after(iteration)
        journal.write(event="resume", iter=iteration)
    else:
        if args.init:
            fresh = lib.init_from(model, args.init)
            log.info("initialized from %s; fresh: %s", args.init, ", ".join(fresh))
        journal.write(event="start", iter=0, run=run, model=config, train_images=len(train_pairs),
                      val_images=len(val_pairs), init=args.init,
                      data_s=time.monotonic() - start)
    log.info("%s x%d: %d parameters, %d training / %d validation images, device %s",
             args.config, args.scale, sum(p.numel() for p in model.parameters()), sampler.count,
             len(val_pairs), device)

    def checkpoint() -> float:
        began = time.monotonic()
        lib.save_checkpoint(ckpt_path, {
            "format": lib.CHECKPOINT_FORMAT, "iteration": iteration, "iters": args.iters, "run": run,
            "model_config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler_rng": generator.get_state(), "val_psnr_y": val_psnr, **_model_rng(device),
        })
        return time.monotonic() - began

    amp = device.type == "cuda" and not args.fp32
    forward = torch.compile(model) if args.compile else model
    model.train()
    stop_signal: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.append(signum))
    stop_reason, first = "done", iteration
    step_s, ckpt_s, val_s, loss_sum, window_start = 0.0, 0.0, 0.0, torch.zeros((), device=device), time.monotonic()
    bar = tqdm(total=args.iters, initial=iteration, unit="it", disable=args.no_progress, dynamic_ncols=True)
    try:
        while iteration < args.iters:
            validating = args.val_every and ((iteration + 1) % args.val_every == 0 or iteration + 1 == args.iters)
            reserve = 3 * step_s + ckpt_s + (val_s if validating else 0.0)
            if stop_signal:
                stop_reason = "sigterm"
            elif args.stop_after is not None and iteration - first >= args.stop_after:
                stop_reason = "stop_after"
            elif args.time_limit_min is not None and time.monotonic() - start + reserve > 60 * args.time_limit_min:
                stop_reason = "time_limit"
            if stop_reason != "done":
                break
            began = time.monotonic()
            rate = lib.learning_rate(iteration, args.lr, args.iters, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = rate
            lr_batch, hr_batch = sampler.sample(args.batch, generator)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.l1_loss(forward(lr_batch).float(), hr_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            iteration += 1
            bar.update()
            step_s = time.monotonic() - began if step_s == 0.0 else 0.9 * step_s + 0.1 * (time.monotonic() - began)
            if iteration % args.log_every == 0 or iteration == args.iters:
                count = (iteration - 1) % args.log_every + 1
                mean_loss, now = loss_sum.item() / count, time.monotonic()
                journal.write(iter=iteration, loss=mean_loss, lr=rate, it_per_s=count / (now - window_start),
                              elapsed_s=now - start)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                window_start = now
            if validating:
                began = time.monotonic()
                val_psnr = lib.validate(model, val_pairs, args.scale, device)
                val_s = time.monotonic() - began
                journal.write(iter=iteration, val_psnr_y=val_psnr, val_images=len(val_pairs), val_s=val_s)
                log.info("iteration %d: validation PSNR-Y %.3f dB", iteration, val_psnr)
            if iteration % args.ckpt_every == 0:
                ckpt_s = checkpoint()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    checkpoint()
    journal.write(event="stop", iter=iteration, reason=stop_reason, elapsed_s=time.monotonic() - start)
    if iteration == args.iters:
        _export(model, config, out, run, iteration, val_psnr)
    else:
        log.info("stopped (%s) at iteration %d of %d; continue with --resume", stop_reason, iteration, args.iters)
    print(json.dumps({"iteration": iteration, "iters": args.iters, "stopped": stop_reason, "val_psnr_y": val_psnr}))
    return EXIT_SIGTERM if stop_reason == "sigterm" else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
