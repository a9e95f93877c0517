"""2dq-upscale end to end: a real image of a size unrelated to the tile, through an ORT engine and
through the fake-quant checkpoint; alpha, 16-bit and grayscale inputs kept; the command line's usage errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engines.cli_upscale import engine_backend, main
from engines.ort_engine import OrtTileRunner
from toolchain.backends import TiledUpscaler
from toolchain.cli.common import UsageError
from toolchain.data.benchmark import benchmark_pairs, load_pair
from toolchain.data.imresize import imresize
from toolchain.data.io import read_image, to_uint8, write_image
from toolchain.metrics import psnr
from toolchain.tolerances import ORT_MIN_PSNR

#: LR side of the synthetic mode tests: one engine tile
SIDE = 16


@pytest.fixture(scope="module")
def small_image(datasets_dir, tmp_path_factory):
    """A real LR image, 45x38 (not a multiple of the 16-pixel tile or the window), written as PNG."""
    lr, _ = load_pair(benchmark_pairs(datasets_dir, "Set5", 2)[2])
    path = tmp_path_factory.mktemp("upscale") / "small.png"
    write_image(path, lr[:38, :45])
    return path


def test_upscale_with_ort_engine(built, loud_float_engine, perturbed, small_image, tmp_path, capsys):
    """On the loud model, where the floor tells the quantized model from broken engines (the plain tiny model's
    float engine lands on it: measured 59.6 dB, 62.3 dB in review): the float engine (measured 32.4 dB) and the
    export with one scale one step wider (37.5 dB) fail it."""
    made = built(loud=True, w_bits=4, a_bits=4)
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
    assert psnr(read_image(fake_quant), sr, data_range=1.0) >= ORT_MIN_PSNR
    for engine in (loud_float_engine, perturbed(made).engine):
        broken = tmp_path / f"{engine.stem}.png"
        assert main([str(small_image), "--engine", str(engine), "--out", str(broken), "--overlap", "4", "-q"]) == 0
        assert psnr(read_image(fake_quant), read_image(broken), data_range=1.0) < ORT_MIN_PSNR, engine.name


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


def engine_sr(made, rgb: np.ndarray) -> np.ndarray:
    """What the CLI's engine run computes for these RGB planes (same tiles, overlap 4)."""
    return TiledUpscaler(OrtTileRunner(made.engine), overlap=4, batch=4).upscale(rgb)


def run(image, out, made, *extra: str) -> int:
    return main([str(image), "--engine", str(made.engine), "--out", str(out), "--overlap", "4", *extra])


def smooth_rgb8() -> np.ndarray:
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    return np.stack([x * 17, y * 17, (x + y) * 8], axis=2).astype(np.uint8)


def test_rgba_keeps_its_alpha_upscaled_bicubic(built, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    rgb = smooth_rgb8()
    block = np.full((SIDE, SIDE), 255, np.uint8)
    block[4:12, 8:16] = 64  # a half-transparent region touching the right edge
    for name, alpha in (("block", block), ("constant", np.full((SIDE, SIDE), 128, np.uint8))):
        Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / f"{name}.png")
        out = tmp_path / f"{name}_x2.png"
        assert run(tmp_path / f"{name}.png", out, made) == 0
        assert "kept alpha" in capsys.readouterr().err
        with Image.open(out) as img:
            assert img.mode == "RGBA"
            sr = np.asarray(img)
        assert sr.shape == (2 * SIDE, 2 * SIDE, 4)
        np.testing.assert_array_equal(sr[:, :, :3], to_uint8(engine_sr(made, rgb / np.float32(255))))
        bicubic = np.clip(imresize(alpha / 255.0, 2), 0, 1)
        np.testing.assert_array_equal(sr[:, :, 3], to_uint8(bicubic))
        if name == "constant":
            assert np.all(sr[:, :, 3] == 128)
        else:  # in place: HR rows 12..20 and columns 20..32 see only the block's LR pixels through the kernel
            assert np.all(sr[12:20, 20:, 3] == 64)
            assert np.all(sr[:4, :, 3] == 255) and np.all(sr[28:, :, 3] == 255) and np.all(sr[:, :12, 3] == 255)


def test_16bit_grayscale_stays_16bit_grayscale(built, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    fine = (x * 3000 + y * 1000 + np.random.default_rng(0).integers(0, 3000, (SIDE, SIDE))).astype(np.uint16)
    coarse = np.round(fine / 257).astype(np.uint8)
    Image.fromarray(fine).save(tmp_path / "fine.png")
    Image.fromarray(coarse.astype(np.uint16) * 257).save(tmp_path / "widened.png")  # 8-bit samples in 16 bits
    Image.fromarray(coarse).save(tmp_path / "coarse.png")
    outputs = {}
    for name in ("fine", "widened", "coarse"):
        assert run(tmp_path / f"{name}.png", tmp_path / f"{name}_x2.png", made) == 0
        log = capsys.readouterr().err
        assert "kept grayscale" in log and ("16-bit output" in log) == (name != "coarse")
        with Image.open(tmp_path / f"{name}_x2.png") as img:
            assert img.mode == ("L" if name == "coarse" else "I;16")
            outputs[name] = np.asarray(img).astype(np.int64)
        assert outputs[name].shape == (2 * SIDE, 2 * SIDE)
    # all 16 bits read (x / 65535) and written (round(y * 65535)): the engine's output on the 16-bit values
    gray = np.repeat((fine / np.float32(65535)).astype(np.float32)[:, :, None], 3, axis=2)
    mean = engine_sr(made, gray).mean(axis=2, dtype=np.float32)
    np.testing.assert_array_equal(outputs["fine"], np.round(np.clip(mean.astype(np.float64), 0, 1) * 65535))
    for name in ("fine", "widened"):
        assert np.any(outputs[name] % 257 != 0)  # not an 8-bit image widened
    # the same samples at 8 and 16 bits give the model the same floats; only the output rounding differs
    assert np.abs(outputs["widened"] / 65535 - outputs["coarse"] / 255).max() <= 1 / 255


def test_grayscale_stays_gray_unless_color(built, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    gray = smooth_rgb8()[:, :, 2]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    sr = engine_sr(made, np.repeat((gray / np.float32(255))[:, :, None], 3, axis=2))
    assert run(tmp_path / "gray.png", tmp_path / "gray_x2.png", made) == 0
    assert run(tmp_path / "gray.png", tmp_path / "rgb_x2.png", made, "--color") == 0
    assert "grayscale input written as RGB (--color)" in capsys.readouterr().err
    with Image.open(tmp_path / "gray_x2.png") as one, Image.open(tmp_path / "rgb_x2.png") as three:
        assert (one.mode, three.mode) == ("L", "RGB")
        np.testing.assert_array_equal(np.asarray(one), to_uint8(sr.mean(axis=2, dtype=np.float32)))
        np.testing.assert_array_equal(np.asarray(three), to_uint8(sr))


def test_outputs_that_would_lose_alpha_or_16_bits_are_refused(built, tmp_path, capsys):
    made = built(w_bits=4, a_bits=4)
    Image.fromarray(np.dstack([smooth_rgb8(), np.full((SIDE, SIDE), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(smooth_rgb8()[:, :, 0].astype(np.uint16) * 200).save(tmp_path / "gray16.png")
    outs = tmp_path / "out"
    refused = [("rgba.png", "sr.jpg", ()), ("rgba.png", "sr.bmp", ()), ("gray16.png", "sr.jpeg", ()),
               ("gray16.png", "sr.tif", ("--color",))]
    for image, out, extra in refused:
        assert run(tmp_path / image, outs / out, made, *extra) == 2, (image, out)
        err = capsys.readouterr().err
        assert f"--out {outs / out}" in err and "cannot store" in err and "expected a suffix that can: .png" in err
    assert run(tmp_path / "rgba.png", outs / "sr.gif", made) == 2
    assert "unknown image suffix" in capsys.readouterr().err
    # refused before the engine is even loaded: a missing engine would otherwise fail first (exit 1)
    assert main([str(tmp_path / "rgba.png"), "--engine", str(tmp_path / "missing.onnx"),
                 "--out", str(outs / "sr.jpg")]) == 2
    assert not outs.exists()  # nothing written, not even the folder
    assert run(tmp_path / "gray16.png", outs / "sr.tif", made) == 0  # TIFF stores plain 16-bit grayscale


def test_engine_runs_import_no_model_loader(built, small_image, datasets_dir, tmp_path):
    """``2dq-upscale --engine`` and ``2dq-eval --engine`` never read a checkpoint, so they leave spandrel (and the
    torchvision it brings, about 1.3 s of every launch) unimported; a checkpoint run in the same process does
    import it (the check can see it)."""
    import json
    import subprocess
    import sys

    made = built(w_bits=4, a_bits=4)
    script = (
        "import json, sys\n"
        "from engines.cli_upscale import main as upscale\n"
        "from toolchain.cli.eval import main as evaluate\n"
        "def loaded():\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in ('spandrel', 'torchvision'))[:3]\n"
        "image, engine, weights, data, out = sys.argv[1:6]\n"
        "seen = []\n"
        "assert upscale([image, '--engine', engine, '--out', out + '/e.png', '--overlap', '4', '-q']) == 0\n"
        "assert evaluate(['--engine', engine, '--data', data, '--sets', 'Set5', '--overlap', '4', '--no-progress', '-q']) == 0\n"
        "seen.append(loaded())\n"
        "assert upscale([image, '--weights', weights, '--out', out + '/w.png', '--overlap', '4', '--tile', '16', '-q']) == 0\n"
        "seen.append(loaded())\n"
        "print(json.dumps(seen))\n")
    done = subprocess.run([sys.executable, "-c", script, str(small_image), str(made.engine), str(made.checkpoint),
                           str(datasets_dir), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    engine_only, with_checkpoint = json.loads(done.stdout.strip().splitlines()[-1])
    assert engine_only == []
    assert with_checkpoint != []
