"""ATD's token categories at low bits: how many argmax rows are ties within float rounding, and what that does to
the engine's agreement per tile (tiny ATD of tests/tiny_models.py, random weights, W4A4 / W8A8 DOBI on the shipped
calibration images).

ATD picks each token's category by an argmax over attention probabilities computed from quantized products. Where
the two largest entries of a row differ by less than ``1e-6`` (or not at all) in the fake-quant reference, the
engine's integer products can decide the row otherwise and regroup the token. Printed per configuration: the share
of such rows over one forward of 4 calibration patches, and the PSNR of the ORT engine against the reference on
each of those 4 tiles.

    python benchmarks/atd_ties.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import calib  # noqa: E402
import export  # noqa: E402
from engines.ort_engine import OrtTileRunner, build_ort_engine  # noqa: E402
from tests import tiny_models  # noqa: E402
from toolchain.data.patches import list_images, sample_patches  # noqa: E402
from toolchain.defaults import DEFAULT_CALIB_IMAGES  # noqa: E402
from toolchain.metrics import output_difference  # noqa: E402
from toolchain.quant import QuantConfig  # noqa: E402

CONFIGS = ((tiny_models.LOUD_GAIN, 4), (1.0, 4), (tiny_models.LOUD_GAIN, 8))


class ArgmaxGaps(torch.overrides.TorchFunctionMode):
    """Records, for every argmax call, the gap between each row's two largest entries."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.argmax, torch.Tensor.argmax):
            top = torch.topk(args[0], 2, dim=-1).values
            self.gaps.append((top[..., 0] - top[..., 1]).flatten())
        return func(*args, **(kwargs or {}))


def main() -> None:
    lr, _ = sample_patches(list_images(DEFAULT_CALIB_IMAGES), 8, 32, 2, seed=0)
    tiles = lr[:4]
    with tempfile.TemporaryDirectory() as folder:
        for gain, bits in CONFIGS:
            qmodel = calib.quantize(tiny_models.make_loud(tiny_models.tiny_atd(), gain),
                                    QuantConfig(w_bits=bits, a_bits=bits), lambda m: [m(b) for b in lr.split(4)])
            spy = ArgmaxGaps()
            with torch.no_grad(), spy:
                reference = qmodel(tiles)
            gaps = torch.cat(spy.gaps)
            graph, engine = Path(folder) / "atd.onnx", Path(folder) / "atd.ort.onnx"
            export.export_onnx(qmodel, graph, tile=32)
            build_ort_engine(graph, engine)
            out = OrtTileRunner(engine, threads=1)(tiles)
            psnr = [output_difference(out[i], reference[i]).psnr for i in range(len(tiles))]
            print(f"linears x{gain:g}, W{bits}A{bits}: {gaps.numel()} argmax rows, exact ties "
                  f"{(gaps == 0).float().mean():.2%}, gap < 1e-6 {(gaps < 1e-6).float().mean():.2%}; "
                  f"engine vs reference per tile (dB): {', '.join(f'{p:.1f}' for p in psnr)}", flush=True)


if __name__ == "__main__":
    main()
