"""Calibration: DOBI, MinMax/Percentile, DQC, artifacts, and the Python API (:mod:`calib.api`).

Owns turning a float model into a calibrated fake-quant one: bound search, the exact transforms
(:mod:`calib.transforms`), DQC distillation, the artifact format (:mod:`calib.artifact`) and the
report. Imports :mod:`toolchain` only; its command-line modules (``cli.py``, ``report/cli.py``) may
import anything.

>>> from calib import quantize, distill, save, load, DQCConfig, DQCRun
>>> quantize.__module__, DQCConfig.__module__, DQCRun.__module__
('calib.api', 'calib.dqc', 'calib.dqc_run')
"""
from __future__ import annotations

from typing import Any

_API = {"quantize", "distill", "save", "load", "METHODS"}
#: DQC's run configs beside DQCConfig (calib.dqc_run)
_RUN_CONFIGS = {"DQCData", "DQCRun"}


def __getattr__(name: str) -> Any:
    # lazy, so that importing one calib module does not import all of them
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "DQCConfig":
        from .dqc import DQCConfig

        return DQCConfig
    if name in _RUN_CONFIGS:
        from . import dqc_run

        return getattr(dqc_run, name)
    if name == "TransformsConfig":
        from .transforms import TransformsConfig

        return TransformsConfig
    raise AttributeError(f"module 'calib' has no attribute {name!r}")


__all__ = sorted(_API | _RUN_CONFIGS | {"DQCConfig", "TransformsConfig"})
