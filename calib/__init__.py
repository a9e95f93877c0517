"""Calibration: DOBI, MinMax/Percentile, DQC, artifacts, and the Python API (:mod:`calib.api`).

>>> from calib import quantize, distill, save, load, DQCConfig
>>> quantize.__module__, DQCConfig.__module__
('calib.api', 'calib.dqc')
"""
from __future__ import annotations

from typing import Any

_API = {"quantize", "distill", "save", "load", "METHODS"}


def __getattr__(name: str) -> Any:
    # lazy, so that importing one calib module does not import all of them
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "DQCConfig":
        from .dqc import DQCConfig

        return DQCConfig
    raise AttributeError(f"module 'calib' has no attribute {name!r}")


__all__ = sorted(_API | {"DQCConfig"})
