"""2dq toolchain: SR transformer models, checkpoint loading and the quantizer arithmetic.

>>> from toolchain import load_model
>>> model = load_model("SwinIR-light_x4.pth")     # doctest: +SKIP
"""
from .loading import CheckpointError, load_model, read_state_dict

__all__ = ["CheckpointError", "load_model", "read_state_dict"]
