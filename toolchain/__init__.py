"""2dq toolchain: SR transformer models, checkpoint loading and the quantizer arithmetic.

>>> from toolchain import load_model
>>> from toolchain.defaults import DEFAULT_WEIGHTS
>>> model = load_model(DEFAULT_WEIGHTS)     # the shipped DAT-light x4; any checkpoint path works
>>> type(model).__name__
'DAT'
"""
from .loading import CheckpointError, load_model, read_state_dict

__all__ = ["CheckpointError", "load_model", "read_state_dict"]
