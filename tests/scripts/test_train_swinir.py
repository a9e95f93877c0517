"""The SwinIR training tool on CPU with a tiny model: the data pack round trip, aligned device-side
patches, the schedule, loss going down, exact resume (after --stop-after and after SIGTERM), the
time limit, fine-tuning init, and an export with exactly the official SwinIR-light layout (spandrel's
SwinIR class: every key, shape and dtype of the released files, buffers included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from toolchain import CheckpointError, load_model
from toolchain.data import read_image, to_uint8, write_image
from toolchain.models import info_of

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import pack_train_data as pack  # noqa: E402
import train_lib as lib  # noqa: E402
import train_swinir  # noqa: E402

TINY = ["--config", "tiny", "--patch", "16", "--batch", "4", "--warmup", "0", "--no-progress", "-q"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make tiny ops ~30x slower,
    and equal thread counts keep in-process and subprocess runs bitwise comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients, a few flat rectangles and mild noise: learnable structure, uint8 (h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 60 + 128
    for _ in range(4):
        top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
        image[top:top + rng.integers(4, 24), left:left + rng.integers(4, 24)] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six structured images big enough for 16 px LR patches at x4, in two folders."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(96, 80), (80, 104), (72, 72), (88, 96), (81, 75), (100, 90)]):
        write_image(root / ("sub" if k % 2 else "") / f"img{k}.png", synthetic_image(rng, h, w))
    return root


def train(out: Path, data: Path, *extra: str) -> int:
    return train_swinir.main(["--data", str(data), "--out", str(out), *TINY, *extra])


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in log_records(out) if "loss" in r]


def exported(out: Path, name: str = "swinir_tiny_x4.safetensors") -> dict[str, torch.Tensor]:
    return load_file(out / name)


# --- data pack ----------------------------------------------------------------------------------

def test_pack_round_trip_is_exact(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    write_image(folder / "a/noise.png", rng.integers(0, 256, (13, 17, 3)).astype(np.uint8))
    write_image(folder / "gray.bmp", rng.integers(0, 256, (9, 30)).astype(np.uint8))
    write_image(folder / "z.png", synthetic_image(rng, 40, 33))
    write_image(folder / "small.png", np.zeros((5, 40, 3), np.uint8))
    data = pack.load_folder(folder, min_size=8, progress=False)
    assert data.names == ["a/noise.png", "gray.bmp", "z.png"]  # small.png (5 px) skipped
    path = pack.write_pack(tmp_path / "p.npz", data, progress=False)
    back = pack.read_pack(path)
    assert back.names == data.names and back.sha256 == data.sha256
    for name, image in zip(back.names, back.images):
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, to_uint8(read_image(folder / name)))
    # a pack and its folder have the same data identity (a run may resume from either); other data not
    assert pack.load_images(path).sha256 == data.sha256 != pack.load_images(folder, progress=False).sha256


def test_pack_detects_damage_and_refuses_test_sets(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    write_image(tmp_path / "src/a.png", rng.integers(0, 256, (16, 16, 3)).astype(np.uint8))
    data = pack.load_folder(tmp_path / "src", progress=False)
    forged = pack.ImageSet(data.names, [data.images[0] ^ 1], data.sha256)  # pixels that do not match
    with pytest.raises(ValueError, match="checksum"):
        pack.read_pack(pack.write_pack(tmp_path / "forged.npz", forged, progress=False))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        pack.read_pack(tmp_path / "junk.npz")
    write_image(tmp_path / "Set5/HR/baby.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="test set Set5"):
        pack.load_folder(tmp_path / "Set5", progress=False)
    with pytest.raises(ValueError, match="expected an image folder or a .npz"):
        pack.load_images(tmp_path / "src/a.png")


def test_codec_round_trip_on_real_training_images(datasets_dir: Path) -> None:
    files = sorted((datasets_dir / "train").rglob("*.*"))[::97][:4]
    for path in files:
        image = to_uint8(read_image(path))
        residual = pack.encode(image)
        assert residual.shape == (3, *image.shape[:2]) and residual.dtype == np.uint8
        np.testing.assert_array_equal(pack.decode(residual), image)


# --- sampling and schedule ----------------------------------------------------------------------

def dihedral(patch: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a square (n, n, 3) patch, in a fixed order."""
    rotations = [np.rot90(patch, k) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


def test_sampler_cuts_aligned_pairs_with_one_shared_orientation() -> None:
    rng = np.random.default_rng(3)
    pairs = lib.make_pairs([rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in [(24, 30), (21, 20), (8, 40)]], 2)
    sampler = lib.PairSampler(pairs, patch=6, scale=2, device="cpu")  # (8, 40) -> LR 4 px high: unused
    assert sampler.count == 2
    lr, hr = sampler.sample(24, torch.Generator().manual_seed(0))
    assert lr.shape == (24, 3, 6, 6) and hr.shape == (24, 3, 12, 12) and lr.dtype == torch.float32
    for lr_patch, hr_patch in zip(lr, hr):
        lr8 = np.round(lr_patch.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        hr8 = np.round(hr_patch.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        found = [
            (d, t, l)
            for hr_image, lr_image in pairs[:2]
            for t in range(lr_image.shape[0] - 5) for l in range(lr_image.shape[1] - 5)
            for d, (a, b) in enumerate(zip(dihedral(lr_image[t:t + 6, l:l + 6]),
                                           dihedral(hr_image[2 * t:2 * t + 12, 2 * l:2 * l + 12])))
            if np.array_equal(a, lr8) and np.array_equal(b, hr8)
        ]
        assert found, "a patch pair is not an aligned, identically oriented crop of one image"
    again = sampler.sample(24, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], lr) and torch.equal(again[1], hr)


def test_learning_rate_warms_up_then_decays_to_one_percent() -> None:
    rates = [lib.learning_rate(i, 2e-4, 1000, 100) for i in range(1000)]
    assert rates[0] == pytest.approx(2e-6) and rates[99] == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))
    assert rates[-1] == pytest.approx(2e-6, rel=1e-3)
    assert lib.learning_rate(550, 2e-4, 1000, 100) == pytest.approx((2e-4 + 2e-6) / 2)


# --- training runs ------------------------------------------------------------------------------

def test_loss_decreases(tmp_path: Path, image_dir: Path) -> None:
    assert train(tmp_path, image_dir, "--iters", "30", "--lr", "2e-3", "--log-every", "1", "--val-every", "30") == 0
    loss = losses(tmp_path)
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5])
    val = [r for r in log_records(tmp_path) if "val_psnr_y" in r]
    assert len(val) == 1 and val[0]["iter"] == 30 and 10 < val[0]["val_psnr_y"] < 60


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert train(out, image_dir, "--iters", "10", "--log-every", "1", "--val-every", "5") == 0
    return out


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, image_dir: Path, uninterrupted: Path) -> None:
    assert train(tmp_path, image_dir, "--iters", "10", "--log-every", "1", "--val-every", "5", "--stop-after", "4") == 0
    state = lib.load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 4 and not (tmp_path / "swinir_tiny_x4.safetensors").exists()
    # a run killed after its checkpoint left log lines of lost iterations: resuming drops them
    lib.JsonLog(tmp_path / "train_log.jsonl").write(iter=5, loss=123.0)
    assert train(tmp_path, image_dir, "--iters", "10", "--log-every", "1", "--val-every", "5", "--resume") == 0
    assert losses(tmp_path) == losses(uninterrupted)
    whole, resumed = exported(uninterrupted), exported(tmp_path)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    val = [r["val_psnr_y"] for r in log_records(tmp_path) if "val_psnr_y" in r]
    assert val == [r["val_psnr_y"] for r in log_records(uninterrupted) if "val_psnr_y" in r]


def test_sigterm_checkpoints_then_resume_continues_exactly(tmp_path: Path, image_dir: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(image_dir), "--out", str(out), *TINY, "--iters", "5000", "--log-every", "1",
            "--val-every", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train_swinir.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = out / "train_log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.exists() and sum("loss" in line for line in log_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped = lib.load_checkpoint(out / "last.pt")["iteration"]
    assert 3 <= stopped < 5000
    assert log_records(out)[-1] == {**log_records(out)[-1], "event": "stop", "reason": "sigterm", "iter": stopped}
    # resume for 3 more iterations == one uninterrupted call of stopped + 3 iterations
    assert train_swinir.main([*args, "--resume", "--stop-after", "3"]) == 0
    reference = tmp_path / "reference"
    assert train(reference, image_dir, "--iters", "5000", "--log-every", "1", "--val-every", "0",
                 "--stop-after", str(stopped + 3)) == 0
    a, b = lib.load_checkpoint(out / "last.pt"), lib.load_checkpoint(reference / "last.pt")
    assert a["iteration"] == b["iteration"] == stopped + 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(out) == losses(reference)


def test_time_limit_stops_cleanly(tmp_path: Path, image_dir: Path) -> None:
    began = time.monotonic()
    assert train(tmp_path, image_dir, "--iters", "100000", "--time-limit-min", "0.03", "--val-every", "0") == 0
    assert time.monotonic() - began < 0.03 * 60 + 2.0
    state = lib.load_checkpoint(tmp_path / "last.pt")
    assert 0 < state["iteration"] < 100000
    assert log_records(tmp_path)[-1]["reason"] == "time_limit"
    # nothing exported before the end, but --export writes the current weights on request
    assert not (tmp_path / "swinir_tiny_x4.safetensors").exists()
    assert train(tmp_path, image_dir, "--export") == 0
    model = load_model(tmp_path / "swinir_tiny_x4.safetensors")
    assert all(torch.equal(p, state["model"][k]) for k, p in model.named_parameters())


def test_export_has_exactly_the_official_light_layout(tmp_path: Path, image_dir: Path, shared_dir: Path) -> None:
    args = ["--config", "light", "--iters", "1", "--batch", "1", "--val-every", "0"]
    assert train_swinir.main(["--data", str(image_dir), "--out", str(tmp_path), *TINY, *args]) == 0
    path = tmp_path / "swinir_light_x4.safetensors"
    reference = json.loads((shared_dir / "reference/swinir_light_state_dict.json").read_text())["x4"]
    tensors = exported(tmp_path, path.name)
    assert len(tensors) == len(reference) == 366
    assert {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()} == {
        k: (v["shape"], v["dtype"]) for k, v in reference.items()}
    model = load_model(path)
    info = info_of(model)
    assert (info.arch, info.scale) == ("SwinIR", 4)
    config = lib.model_config("light", 4)
    assert {k: info.hyperparameters[k] for k in config} == config
    assert sum(p.numel() for p in model.parameters()) == 929_628  # SwinIR-light x4 as released
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_init_copies_all_but_the_upsampler(tmp_path: Path, image_dir: Path, uninterrupted: Path) -> None:
    x4 = uninterrupted / "swinir_tiny_x4.safetensors"
    model = lib.build_model(lib.model_config("tiny", 2))
    fresh = lib.init_from(model, x4)
    assert fresh == ["upsample.0.bias", "upsample.0.weight"]
    source = exported(uninterrupted)
    for key, param in model.named_parameters():
        assert torch.equal(param, source[key]) != key.startswith("upsample.")
    with pytest.raises(CheckpointError, match="does not fit"):
        lib.init_from(lib.build_model(lib.model_config("light", 2)), x4)
    out = tmp_path / "x2"
    assert train(out, image_dir, "--scale", "2", "--init", str(x4), "--iters", "2", "--val-every", "2") == 0
    assert log_records(out)[0]["init"] == str(x4)
    assert info_of(load_model(out / "swinir_tiny_x2.safetensors")).scale == 2


def test_refuses_to_overwrite_or_resume_with_other_settings(tmp_path: Path, image_dir: Path, uninterrupted: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert train(uninterrupted, image_dir, "--iters", "10") == 2
    assert "--resume" in capsys.readouterr().err
    assert train(uninterrupted, image_dir, "--iters", "10", "--resume", "--lr", "1e-3") == 2
    assert "other settings" in capsys.readouterr().err
    assert train(tmp_path, image_dir, "--iters", "10", "--warmup", "10") == 2
    assert train(tmp_path, image_dir, "--export") == 2
