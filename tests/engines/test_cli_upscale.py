"""2dq-upscale end to end: a real image of a size unrelated to the tile, through an ORT engine and
through the fake-quant checkpoint, and the command line's usage errors."""
from __future__ import annotations

import numpy as np
import pytest

from engines.cli_upscale import engine_backend, main
from engines.ort_engine import OrtTileRunner
from toolchain.backends import TiledUpscaler
from toolchain.cli.common import UsageError
from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.io import read_image, to_uint8, write_image
from toolchain.metrics import psnr

#: engine vs fake-quant checkpoint on the same tiles (ARCHITECTURE.md s. 7)
MIN_PSNR_DB = 60.0


@pytest.fixture(scope="module")
def small_image(datasets_dir, tmp_path_factory):
    """A real LR image, 45x38 (not a multiple of the 16-pixel tile or the window), written as PNG."""
    lr, _ = load_pair(benchmark_pairs(datasets_dir, "Set5", 2)[2])
    path = tmp_path_factory.mktemp("upscale") / "small.png"
    write_image(path, lr[:38, :45])
    return path


def test_upscale_with_ort_engine(built, small_image, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    out = tmp_path / "sr.png"
    assert main([str(small_image), "--engine", str(made.engine), "--out", str(out), "--overlap", "4", "-q"]) == 0
    assert "x2, ort" in capsys.readouterr().out
    sr = read_image(out)
    lr = read_image(small_image)
    assert sr.shape == (76, 90, 3)
    expected = TiledUpscaler(OrtTileRunner(made.engine), overlap=4, batch=4).upscale(lr)
    np.testing.assert_array_equal(to_uint8(sr), to_uint8(expected))
    fake_quant = tmp_path / "fq.png"
    assert main([str(small_image), "--weights", str(made.checkpoint), "--calib", str(made.artifact), "--tile", "16",
                 "--overlap", "4", "--out", str(fake_quant), "-q"]) == 0
    assert psnr(read_image(fake_quant), sr, data_range=1.0) >= MIN_PSNR_DB


def test_usage_errors(built, small_image, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    out = str(tmp_path / "x.png")
    both = [str(small_image), "--engine", str(made.engine), "--weights", str(made.checkpoint), "--out", out]
    assert main(both) == 2
    assert main([str(small_image), "--engine", str(made.engine), "--tile", "32", "--out", out]) == 2
    assert main([str(small_image), "--engine", str(made.engine), "--calib", str(made.artifact), "--out", out]) == 2
    assert main([str(tmp_path / "missing.png"), "--engine", str(made.engine), "--out", out]) == 1
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(UsageError, match="unknown engine suffix"):
        engine_backend("model.bin")
    assert engine_backend("a.plan") == engine_backend("a.engine") == "trt"
    assert engine_backend("a.onnx") == engine_backend("a.ORT") == "ort"
