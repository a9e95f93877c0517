"""DQC on the tiny SwinIR (real architecture, seeded random weights) and on real NGswin weights.

What is checked: the distillation loss goes down; only bounds change (every other tensor bit-identical);
bounds stay ordered at every step; the feature term is of the L1 term's order on a real model (and the
released 2DQuant normalization is not); a NaN in the data stops DQC with ``DQCDivergedError`` and
leaves the last checkpoint intact and resumable; an inf-producing bound does too; the options and
config validate.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from calib.dqc import DQCConfig, DQCDivergedError, FeatureTap, distill, distillation_loss, feature_distance
from calib.dqc_cli import add_dqc_arguments, dqc_configs_from_args
from calib.dqc_state import global_indices, load_checkpoint
from calib.feature_taps import feature_modules
from toolchain.defaults import DEFAULT_CALIB_IMAGES
from toolchain.quant import bound_parameters, bounds_state, float_mode, load_bounds, quantizers
from toolchain.quant.grid import BOUND_EPS

WORKER = Path(__file__).with_name("dqc_worker.py")
#: the feature term (times lambda) must be within this factor of the L1 term at the start, either way
COMPARABLE = 10.0
#: ... and 2DQuant's released normalization is below this share of its own pixel term
NEGLIGIBLE = 0.02


def _worker():
    spec = importlib.util.spec_from_file_location("dqc_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Same arithmetic in every run, and no oversubscription on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def t91(datasets_dir: Path) -> list[Path]:
    from toolchain.data.patches import list_images

    return list_images(datasets_dir / "train" / "T91")


@pytest.fixture
def tiny(t91, one_thread):
    """Tiny SwinIR x2, W4A4, DOBI bounds."""
    return _worker().tiny_quantized_model(t91[:40])


def _patches(files, length, seed=1):
    from toolchain.data.patches import PatchDataset

    return PatchDataset(files, 16, 2, seed=seed, length=length)


def test_dqc_lowers_the_distillation_loss_and_changes_only_bounds(tiny, t91):
    data = _patches(t91[40:60], length=4)  # one fixed batch of 4: the loss must go down on it
    val_batch = torch.stack([data[i][0] for i in range(4)])
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    bound_ids = {id(p) for p in bound_parameters(tiny)}
    bound_names = {k for k, v in tiny.state_dict(keep_vars=True).items() if id(v) in bound_ids}
    assert len(bound_names) == len(bound_ids) == 2 * len(quantizers(tiny))
    gaps: list[float] = []

    def record_gap(module, inputs):  # runs before every forward: bounds as the last step left them
        gaps.append(min(float((q.upper - q.lower).detach().min()) for q in quantizers(module).values()))

    hook = tiny.register_forward_pre_hook(record_gap)
    # lr 3e-3: the bounds of this random-weight model are small; 1e-2 (the paper's, for trained
    # SwinIR-light) oscillates on it
    result = distill(tiny, data, DQCConfig(iters=20, batch=4, lr=3e-3, val_every=5, checkpoint_every=0),
                     val_batch=val_batch, progress=False)
    hook.remove()

    first, best = result.validations[0], min(result.validations[1:], key=lambda v: v["val_loss"])
    assert best["val_loss"] < 0.8 * first["val_loss"]
    assert best["val_psnr"] > first["val_psnr"]
    assert result.best_iteration == best["iteration"] > 0
    # the model ends with the best validation step's bounds, and those differ from DOBI's
    after = tiny.state_dict()
    changed = [k for k in bound_names if not torch.equal(after[k], before[k])]
    assert changed
    for name, tensor in after.items():
        if name not in bound_names:
            assert torch.equal(tensor, before[name]), f"{name} changed"
    assert len(gaps) >= 20 and min(gaps) >= BOUND_EPS * 0.99
    # every parameter's requires_grad flag is back to what it was
    assert all(p.requires_grad for p in tiny.parameters())
    # the logged training terms are both non-zero
    assert all(l1 > 0 and feature > 0 for l1, feature in result.train_losses)


def test_bounds_stay_ordered_when_a_step_would_cross_them(tiny, t91):
    quantizer = next(q for q in quantizers(tiny).values() if q.kind == "activation")
    # a grid 1e-5 wide: one Adam step (about lr = 1e-2 per bound) pushes the bounds through each other
    quantizer.set_bounds(quantizer.lower.detach(), quantizer.lower.detach() + 1e-5)
    distill(tiny, _patches(t91[40:60], 8), DQCConfig(iters=3, batch=4, val_every=0, checkpoint_every=0),
            progress=False)
    for q in quantizers(tiny).values():
        # exactly what grid.order_bounds_ keeps, in the bounds' float32: upper >= fl(lower + eps). (The gap
        # itself may be below eps by rounding: at |lower| = 1.9, as here, fl(lower + 1e-6) - lower = 9.5e-7.)
        assert bool((q.upper > q.lower).all() and (q.upper >= q.lower + BOUND_EPS).all()), q.name


def test_a_separate_float_teacher_gives_the_float_mode_result(tiny, t91):
    """The default teacher (the student with quantizers off) and a float copy are the same function."""
    import copy

    from toolchain.quant import set_quant_enabled

    teacher = copy.deepcopy(tiny)
    set_quant_enabled(teacher, False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dobi = bounds_state(tiny)
    data = _patches(t91[40:60], 16)
    config = DQCConfig(iters=3, batch=4, val_every=0, checkpoint_every=0)
    distill(tiny, data, config, progress=False)
    float_mode_bounds = bounds_state(tiny)
    load_bounds(tiny, dobi)
    distill(tiny, data, config, teacher=teacher, progress=False)
    for name, tensor in bounds_state(tiny).items():
        assert torch.equal(tensor, float_mode_bounds[name]), name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), name


def test_feature_distance_is_the_scaled_cosine_distance():
    torch.manual_seed(0)
    s, t = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)
    assert torch.allclose(feature_distance(s, t), (2 * (1 - cos) / 6).mean(), atol=1e-6)
    assert feature_distance(s, 7.0 * s).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    total, l1, feature = distillation_loss(s, t, [s, s], [t, 2 * s], 5.0)
    assert total.item() == pytest.approx(l1.item() + 5.0 * feature.item(), rel=1e-6)
    with pytest.raises(ValueError, match="one per residual group"):
        distillation_loss(s, t, [s], [], 5.0)


@pytest.mark.slow
def test_feature_term_is_comparable_to_l1_on_real_weights(shared_dir, datasets_dir, one_thread):
    """NGswin x2 (official weights), W4A4 after DOBI: lambda * feature within 10x of L1, either way."""
    from calib.dobi import calibrate_dobi
    from calib.observers import batch_forward_loop
    from toolchain import load_model
    from toolchain.data.patches import list_images, sample_patches
    from toolchain.quant import QuantConfig, quantize_model

    weights = shared_dir / "models" / "NGswin" / "NGswin_x2.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} not found")
    model = quantize_model(load_model(weights), QuantConfig(w_bits=4, a_bits=4))
    images = list_images(datasets_dir / "train" / "DIV2K_valid_256")[:20]
    lr, _ = sample_patches(images, 4, 64, 2, seed=0)  # NGswin needs 64x64 at least
    calibrate_dobi(model, batch_forward_loop(lr, 4, progress=False), candidates=20)
    taps = feature_modules(model)
    assert [path for path, _ in taps] == ["encoder_layer1", "encoder_layer2", "encoder_layer3", "decoder_layer1"]
    with FeatureTap([m for _, m in taps]) as tap, torch.no_grad():
        with float_mode(model):
            teacher = model(lr)
        teacher_features = tap.take()
        student = model(lr)
        student_features = tap.take()
    _, l1, feature = distillation_loss(student, teacher, student_features, teacher_features, 5.0)
    weighted = 5.0 * feature.item()
    assert 1 / COMPARABLE < weighted / l1.item() < COMPARABLE, (l1.item(), weighted)
    # 2DQuant's released code: unit-norm features, mean MSE divided by the element count again,
    # against an L1 divided by the per-sample element count
    released = sum(F.mse_loss(F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1)) / s.numel()
                   for s, t in zip(student_features, teacher_features))
    released_pixel = l1.item() / student[0].numel()
    assert 5.0 * released.item() < NEGLIGIBLE * released_pixel


def test_nan_in_the_data_stops_dqc_and_keeps_the_last_checkpoint(tiny, t91, tmp_path):
    clean = _patches(t91[40:60], length=64)
    config = DQCConfig(iters=8, batch=4, val_every=0, checkpoint_every=2, schedule="constant")
    poisoned_step = 5
    poisoned = PoisonedPatches(clean, set(global_indices(config.seed, poisoned_step, config.batch, len(clean))))
    dobi = bounds_state(tiny)
    checkpoint = tmp_path / "dqc.safetensors"
    with pytest.raises(DQCDivergedError, match="step 5"):
        distill(tiny, poisoned, config, checkpoint_path=checkpoint, progress=False)
    saved = load_checkpoint(checkpoint)
    assert saved.iteration == 4
    # the failing step changed no bound: the model holds the step-4 bounds the checkpoint holds
    for name, tensor in bounds_state(tiny).items():
        assert torch.equal(tensor, saved.bounds[name])
    # the checkpoint resumes (with clean data) to exactly the bounds of an uninterrupted clean run
    load_bounds(tiny, dobi)
    distill(tiny, clean, config, checkpoint_path=checkpoint, resume=True, progress=False)
    resumed = bounds_state(tiny)
    load_bounds(tiny, dobi)
    distill(tiny, clean, config, checkpoint_path=tmp_path / "fresh.safetensors", progress=False)
    for name, tensor in bounds_state(tiny).items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_bound_that_overflows_the_step_stops_dqc(tiny, t91, tmp_path):
    quantizer = next(iter(quantizers(tiny).values()))
    quantizer.set_bounds(torch.tensor(-3e38), torch.tensor(3e38))  # step = inf -> 0 * inf = NaN
    with pytest.raises(DQCDivergedError, match="step 1"):
        distill(tiny, _patches(t91[40:60], 8), DQCConfig(iters=3, batch=4, val_every=0),
                checkpoint_path=tmp_path / "c.safetensors", progress=False)
    assert not (tmp_path / "c.safetensors").exists()
    assert torch.equal(quantizer.upper.detach(), torch.tensor(3e38))  # untouched


def test_dqc_refuses_uncalibrated_models_and_stray_checkpoints(tiny, t91, tmp_path, tiny_swinir):
    from toolchain.quant import QuantConfig, quantize_model

    fresh = quantize_model(tiny_swinir(0), QuantConfig())
    data = _patches(t91[40:60], 8)
    with pytest.raises(ValueError, match="run DOBI first"):
        distill(fresh, data, DQCConfig(iters=1), progress=False)
    config = DQCConfig(iters=1, batch=4, val_every=0)
    with pytest.raises(FileNotFoundError, match="no DQC checkpoint"):
        distill(tiny, data, config, checkpoint_path=tmp_path / "c.safetensors", resume=True, progress=False)
    distill(tiny, data, config, checkpoint_path=tmp_path / "c.safetensors", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        distill(tiny, data, config, checkpoint_path=tmp_path / "c.safetensors", progress=False)
    with pytest.raises(ValueError, match="different DQC run"):
        distill(tiny, data, DQCConfig(iters=1, batch=4, val_every=0, lr=0.02),
                checkpoint_path=tmp_path / "c.safetensors", resume=True, progress=False)
    with pytest.raises(ValueError, match="does not split"):
        distill(tiny, data, DQCConfig(iters=1, batch=3, accumulation=2), progress=False)


def test_config_and_options_validate():
    with pytest.raises(ValueError, match="schedule"):
        DQCConfig(schedule="step")
    with pytest.raises(ValueError, match="lr"):
        DQCConfig(lr=0.0)
    parser = argparse.ArgumentParser()
    add_dqc_arguments(parser, common=True)
    args = parser.parse_args(["--dqc-iters", "7", "--dqc-batch", "6", "--dqc-lr", "0.02", "--feature-weight", "1",
                              "--val-every", "3", "--checkpoint-every", "2"])
    images = sorted(DEFAULT_CALIB_IMAGES.glob("*.png"))
    config, _, run = dqc_configs_from_args(args, images=images)
    assert (config.iters, config.batch, config.lr, config.feature_weight, config.val_every,
            config.checkpoint_every) == (7, 6, 0.02, 1.0, 3, 2)
    assert run.checkpoint is None  # neither --dqc-checkpoint nor --out
    with pytest.raises(ValueError, match="multiple of processes"):
        dqc_configs_from_args(args, world=4, images=images)
    args.out = "run/w4a4.safetensors"
    assert dqc_configs_from_args(args, images=images)[2].checkpoint == Path("run/w4a4.dqc-checkpoint.safetensors")


class PoisonedPatches:
    """``PatchDataset`` items, with NaN in the LR patch at the given indices (a corrupt input)."""

    def __init__(self, dataset, bad: set[int]) -> None:
        self.dataset, self.bad = dataset, bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        lr, hr = self.dataset[index]
        if index in self.bad:
            lr = lr.clone()
            lr[:, 0, 0] = float("nan")
        return lr, hr
