"""A real DQC run on the tiny SwinIR, as a script, for the subprocess tests (kill/resume, torchrun).

Builds the tiny SwinIR (embed 12, depths [2, 2], heads [2, 2], window 8, x2) with seeded random
weights, attaches W4A4 quantizers, runs DOBI on 8 training patches, then
:func:`calib.dqc_cli.run_dqc` with the DQC options given on the command line, and writes every
rank's final bounds to ``--bounds-out`` (``{rank}`` in the name is replaced by the rank).

    python tests/calib/dqc_worker.py --calib-images DIR --bounds-out OUT.safetensors --dqc-checkpoint C ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from safetensors.torch import save_file

from calib.distributed import is_main_process
from calib.dobi import calibrate_dobi
from calib.dqc_cli import add_dqc_arguments, run_dqc
from calib.observers import batch_forward_loop
from toolchain.data.patches import sample_patches
from toolchain.models.swinir import SwinIR
from toolchain.quant import QuantConfig, bounds_state, quantize_model

TINY = dict(scale=2, embed_dim=12, depths=[2, 2], num_heads=[2, 2], window_size=8)


def tiny_quantized_model(calib_images, patch_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """The tiny SwinIR x2 with fixed random weights, W4A4 quantizers, DOBI bounds from 8 patches."""
    torch.manual_seed(seed)
    model = SwinIR(**TINY).eval()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    lr, _ = sample_patches(calib_images, 8, patch_size, model.scale, seed=seed)
    calibrate_dobi(model, batch_forward_loop(lr, 8, progress=False))
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib-images", required=True)
    parser.add_argument("--bounds-out", required=True)
    parser.add_argument("--dobi-out", help="also write the DOBI bounds DQC starts from here")
    add_dqc_arguments(parser, common=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.set_num_threads(1)  # the same arithmetic in every process of a comparison
    from toolchain.data.patches import list_images

    images = list_images(args.calib_images)
    model = tiny_quantized_model(images, args.patch_size)
    if args.dobi_out and is_main_process():
        save_file({k: v.contiguous() for k, v in bounds_state(model).items()}, args.dobi_out)
    options = run_dqc(args, model, images=images, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    save_file({k: v.contiguous() for k, v in bounds_state(model).items()}, args.bounds_out.replace("{rank}", str(rank)))
    if is_main_process():
        print(json.dumps(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
