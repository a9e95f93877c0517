"""A real DQC run on the tiny SwinIR, as a script, for the subprocess tests (kill/resume, torchrun).

Builds the tiny SwinIR x2 (spandrel's class, ``tests/tiny_models.py``: embed 12, depths [2, 2],
heads [2, 2], window 8) with seeded random weights, attaches W4A4 quantizers, runs DOBI on 8 training patches, then
:func:`calib.dqc_run.run_dqc` with the DQC options given on the command line, and writes every
rank's final bounds to ``--bounds-out`` (``{rank}`` in the name is replaced by the rank).

    python tests/calib/dqc_worker.py --calib-images DIR --bounds-out OUT.safetensors --dqc-checkpoint C ...
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from calib.distributed import is_main_process
from calib.dobi import calibrate_dobi
from calib.dqc_cli import add_dqc_arguments, dqc_configs_from_args
from calib.dqc_run import run_dqc
from calib.observers import batch_forward_loop
from toolchain.data.patches import sample_patches
from toolchain.models import info_of
from toolchain.quant import QuantConfig, bounds_state, quantize_model


def _tiny_models():
    """``tests/tiny_models.py``, loaded by path: this file also runs as a script, outside any package."""
    spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).resolve().parents[1] / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_quantized_model(calib_images, patch_size: int = 16, seed: int = 0) -> torch.nn.Module:
    """The tiny SwinIR x2 with fixed random weights, W4A4 quantizers, DOBI bounds from 8 patches."""
    model = _tiny_models().tiny_swinir(scale=2, seed=seed)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    lr, _ = sample_patches(calib_images, 8, patch_size, info_of(model).scale, seed=seed)
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
    config, data, run = dqc_configs_from_args(args, images=images)
    options = run_dqc(model, config, data, run, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    save_file({k: v.contiguous() for k, v in bounds_state(model).items()}, args.bounds_out.replace("{rank}", str(rank)))
    if is_main_process():
        print(json.dumps(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
