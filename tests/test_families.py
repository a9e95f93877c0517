"""The other SR models spandrel loads, each through placement, export and an ORT engine that passes the verification
criterion (ARCHITECTURE.md s. 7), with nothing written for any of them.

The transformers Swin2SR, OmniSR, GRL, RGT, DRCT, FDAT, CRAFT, DITN, DCTLSA and ATD (linears and attention products
quantized), and SAFMN and PLKSR, which have neither (their convolutions quantized): tiny, random weights, loud where
that keeps them sane (linears x10, so that 4-bit quantization shows), W4A4 DOBI on the shipped calibration images,
exported as a QDQ graph and built as an ORT engine. The engine must reach the floor of the reference's own noise
on a crop of a shipped Set5 LR image, and the float model must not (negative control: a graph that lost its
quantizers fails). Every placed linear, matmul and convolution call is a node whose two inputs are dequantized
(OmniSR's einsum attention included), and every transformer's softmax attention is found. SwinIR, DAT, HAT and
SRFormer run the whole chain through the console scripts in tests/test_chain.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import calib
import export
from engines.compare import Verdict, compare_upscalers, reference_upscaler, verify_engine
from engines.noise import noise_floor
from engines.ort_engine import OrtTileRunner, build_ort_engine
from toolchain import load_model
from toolchain.data.io import read_image
from toolchain.data.patches import list_images, sample_patches
from toolchain.defaults import DEFAULT_CALIB_IMAGES, DEFAULT_DATA
from toolchain.quant import QuantConfig, quantizers
from toolchain.tolerances import NOISE_FLOOR_MARGIN, ORT_MIN_PSNR

from . import tiny_models
from .test_chain import _both_inputs_dequantized, placed_calls
from .tiny_models import LOUD_GAIN

#: family -> (builder, tile, gain of make_loud, what to quantize); GRL pads its input by up to 32 pixels with
#: reflection, which needs tiles of 64; DCTLSA's random output grows to 1e10 with every linear x10 (x3: 478): as it
#: is, W4A4 already moves it; ATD picks each token's category by an argmax over 4-bit attention products, and
#: loud, 2.6% of those rows are (near) ties within float rounding, which the engine's integer products decide
#: otherwise than the reference's float ones (41-59 dB on tiles against the floor of 60; benchmarks/atd_ties.py):
#: as it is, 1.1%; SAFMN and PLKSR have no attention and no linear: their convolutions are quantized
ATTENTION = ("linear", "matmul")
FAMILIES = {
    "swin2sr": (tiny_models.tiny_swin2sr, 32, LOUD_GAIN, ATTENTION),
    "omnisr": (tiny_models.tiny_omnisr, 32, LOUD_GAIN, ATTENTION),
    "grl": (tiny_models.tiny_grl, 64, LOUD_GAIN, ATTENTION),
    "rgt": (tiny_models.tiny_rgt, 32, LOUD_GAIN, ATTENTION),
    "drct": (tiny_models.tiny_drct, 32, LOUD_GAIN, ATTENTION),
    "fdat": (tiny_models.tiny_fdat, 32, LOUD_GAIN, ATTENTION),
    "craft": (tiny_models.tiny_craft, 32, LOUD_GAIN, ATTENTION),
    "ditn": (tiny_models.tiny_ditn, 32, LOUD_GAIN, ATTENTION),
    "dctlsa": (tiny_models.tiny_dctlsa, 32, 1.0, ATTENTION),
    "atd": (tiny_models.tiny_atd, 32, 1.0, ATTENTION),
    "safmn": (tiny_models.tiny_safmn, 32, 1.0, ("conv",)),
    "plksr": (tiny_models.tiny_plksr, 32, 1.0, ("conv",)),
}
SCALE = 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_engine_passes_verification(family: str, tmp_path: Path) -> None:
    build, tile, gain, selection = FAMILIES[family]
    checkpoint = tiny_models.save_checkpoint(tiny_models.make_loud(build(scale=SCALE), gain),
                                             tmp_path / "model.safetensors")
    model = load_model(checkpoint)
    lr, _ = sample_patches(list_images(DEFAULT_CALIB_IMAGES), 8, tile, SCALE, seed=0)
    qmodel = calib.quantize(model, QuantConfig(w_bits=4, a_bits=4, quantize=selection),
                            lambda m: [m(b) for b in lr.split(4)])
    roles = {q.role for q in quantizers(qmodel).values()}
    if selection == ATTENTION:
        assert {"attn_probs", "attn_v"} <= roles, f"{family}: no softmax attention found, roles {sorted(roles)}"
    artifact = tmp_path / "q.safetensors"
    calib.save(qmodel, artifact, checkpoint=checkpoint)

    onnx_path, engine = tmp_path / "q.onnx", tmp_path / "q.ort.onnx"
    export.export_onnx(qmodel, onnx_path, tile=tile)
    assert _both_inputs_dequantized(onnx_path) == placed_calls(qmodel, tile)
    build_ort_engine(onnx_path, engine)

    image = read_image(DEFAULT_DATA / "Set5" / "LR_bicubic" / f"X{SCALE}" / f"babyx{SCALE}.png")
    images = [("baby", np.ascontiguousarray(image[:64, :64]))]
    reference = reference_upscaler(checkpoint, artifact, tile)
    agreement = verify_engine(OrtTileRunner(engine, threads=1), checkpoint, artifact, images, reference=reference)
    (own,) = noise_floor(checkpoint, artifact, images, tile, reference=reference)
    verdict = Verdict(agreement, ORT_MIN_PSNR, own.psnr_vs_reference, NOISE_FLOOR_MARGIN)
    assert verdict.psnr_passes, f"{family}: {agreement.psnr_vs_reference:.2f} dB below the floor {verdict.floor:.2f}"

    unquantized = compare_upscalers(reference_upscaler(checkpoint, None, tile), reference, images)
    assert unquantized.psnr_vs_reference < verdict.floor, (
        f"{family}: the float model passes too ({unquantized.psnr_vs_reference:.2f} dB, floor {verdict.floor:.2f})")
