"""DQC's distillation loss: output L1 plus the residual-group feature term, and the hooks that feed it.

The numbers behind the feature normalization (measured on NGswin x2 W4A4 after DOBI, the only real
weights here) are in ``benchmarks/dqc_speed.md``; ``tests/calib/test_dqc.py`` checks the ratio.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.metrics import psnr_from_mse
from toolchain.quant import float_mode


def feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between per-sample L2-normalized features, scaled per channel; averaged over the batch.

    ``student`` / ``teacher``: ``(B, ..., C)`` with channels last (SwinIR RSTB tokens
    ``(B, H*W, C)``, NGswin stage outputs ``(B, h, w, C)``). Each sample's feature vector is divided
    by its L2 norm and multiplied by ``sqrt(tokens)`` (so that the average token vector has unit
    norm), then the MSE is taken over all elements. The result is ``2 (1 - cos) / C`` per sample, with
    ``cos`` the cosine similarity of the two feature vectors: in ``[0, 4 / C]``, independent of the
    patch size. Why this scale (NGswin x2 W4A4 after DOBI, batch 4 of 64x64, at the start of DQC;
    ``benchmarks/dqc_speed.md``): ``5 *`` the plain mean over elements of unit-norm vectors is 0.7% of
    the L1 term, and 2DQuant's released code (which divides that mean by the element count again, and
    its L1 by the per-sample count) 0.4% of its pixel term: the term does nothing. The unscaled
    ``2 (1 - cos)`` is 215x the L1 term and drowns it. Divided by ``C`` it is 3.4x: comparable.
    """
    channels = student.shape[-1]
    s = F.normalize(student.flatten(1), dim=1)
    t = F.normalize(teacher.flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean() / channels


def distillation_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor], feature_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, l1, feature)``: L1 of the outputs ``(B, 3, sH, sW)`` and the summed feature distance.

    ``total = l1 + feature_weight * feature``; ``feature`` is unweighted.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"captured {len(student_features)} student and {len(teacher_features)} teacher "
                         f"features; expected the same non-zero number (one per residual group)")
    l1 = F.l1_loss(student_out, teacher_out)
    feature = sum(feature_distance(s, t) for s, t in zip(student_features, teacher_features))
    return l1 + feature_weight * feature, l1, feature


class FeatureTap:
    """Forward hooks collecting the outputs of ``modules`` in call order; removed on exit.

    >>> from calib.feature_taps import feature_modules
    >>> from toolchain.models.examples import tiny_swinir
    >>> model = tiny_swinir(depths=(1, 1))
    >>> with FeatureTap([m for _, m in feature_modules(model)]) as tap:   # the two residual groups
    ...     _ = model(torch.rand(1, 3, 16, 16)); features = tap.take()
    >>> [tuple(f.shape) for f in features]
    [(1, 256, 12), (1, 256, 12)]
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self._outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTap:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            output = output[0]  # a stage returning (features, extras): NGswin's (output, merged)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"feature tap {type(module).__name__} returned {type(output).__name__}, "
                            f"DQC distils tensor outputs only")
        self._outputs.append(output)

    def take(self) -> list[torch.Tensor]:
        """The outputs captured since the last call (and forget them)."""
        outputs, self._outputs = self._outputs, []
        if len(outputs) != len(self.modules):
            raise RuntimeError(f"captured {len(outputs)} residual-group outputs in one forward, "
                               f"expected {len(self.modules)}")
        return outputs


class Teacher:
    """The float reference: a separate model, or the student itself with its quantizers disabled."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        self.student, self.model = student, teacher

    def groups(self, paths: Sequence[str]) -> list[nn.Module]:
        """The teacher's modules at the student's feature-tap ``paths``."""
        modules = dict((self.model or self.student).named_modules())
        missing = [p for p in paths if p not in modules]
        if missing:
            raise ValueError(f"the teacher has no module {missing[0]} (a feature tap of the student)")
        return [modules[p] for p in paths]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            return self.model(x)
        with float_mode(self.student):
            return self.student(x)


class Validation:
    """A fixed validation batch with the teacher's outputs and features computed once."""

    def __init__(self, batch: torch.Tensor, chunk: int, teacher: Teacher, teacher_tap: FeatureTap) -> None:
        self.chunks = list(batch.split(chunk))
        self.targets: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for x in self.chunks:
            out = teacher(x)
            self.targets.append((out, teacher_tap.take()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tap: FeatureTap, feature_weight: float) -> dict[str, float]:
        """Distillation loss terms and PSNR (dB, outputs clamped to [0, 1]) of ``model`` vs the teacher."""
        l1 = feature = 0.0
        outputs, targets = [], []
        for x, (target, target_features) in zip(self.chunks, self.targets):
            out = model(x)
            _, chunk_l1, chunk_feature = distillation_loss(out, target, tap.take(), target_features, feature_weight)
            share = len(x) / sum(len(c) for c in self.chunks)
            l1 += share * chunk_l1.item()
            feature += share * chunk_feature.item()
            outputs.append(out)
            targets.append(target)
        return {"val_loss": l1 + feature_weight * feature, "val_l1": l1, "val_feature": feature,
                "val_psnr": _psnr(torch.cat(outputs), torch.cat(targets))}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two outputs clamped to [0, 1], the MSE in the outputs' dtype (as DQC logs it)."""
    return psnr_from_mse(F.mse_loss(a.clamp(0, 1), b.clamp(0, 1)).item(), 1.0)
