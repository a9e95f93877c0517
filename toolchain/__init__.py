"""2dq toolchain: SR transformer models, checkpoint loading and the quantizer arithmetic.

The bottom layer. It owns what every other package shares: loading checkpoints through spandrel
(:mod:`toolchain.loading`, :mod:`toolchain.models`), the quantizer math and its modules
(:mod:`toolchain.quant`), images and benchmark data (:mod:`toolchain.data`), metrics, tiling, the
shipped defaults, and the upscaler interfaces (:mod:`toolchain.backends`). It imports no other 2dq
package (``tests/test_layers.py``); its command-line modules (:mod:`toolchain.cli`) may.

>>> from toolchain import load_model
>>> from toolchain.defaults import DEFAULT_WEIGHTS
>>> model = load_model(DEFAULT_WEIGHTS)     # the shipped DAT-light x4; any checkpoint path works
>>> type(model).__name__
'DAT'
"""
from .loading import CheckpointError, load_model, read_state_dict

__all__ = ["CheckpointError", "load_model", "read_state_dict"]
