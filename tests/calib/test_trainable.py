"""calib.trainable.backward: gradient steps on a model whose forward writes in place fail with a clear error."""
from __future__ import annotations

import pytest
import torch

from calib.baselines import calibrate_minmax
from calib.reconstruct import ReconstructConfig, reconstruct_blocks
from toolchain.quant import QuantConfig, quantize_model

from .. import tiny_models


def test_block_reconstruction_of_an_in_place_forward_names_the_cause():
    """PLKSR's eval-mode partial convolution writes its result into a slice of its input: autograd refuses that,
    and the error says which model and what to calibrate it with instead (DOBI-like methods need no gradients)."""
    model = quantize_model(tiny_models.tiny_plksr(), QuantConfig(w_bits=4, a_bits=4, quantize=("conv",)))
    lr = torch.rand(4, 3, 32, 32)
    calibrate_minmax(model, lambda m: m(lr))
    with torch.no_grad():
        model(lr)   # the forward itself is fine
    with pytest.raises(RuntimeError, match="forward writes into a tensor in place .* cannot train through it"):
        reconstruct_blocks(model, lr, ReconstructConfig(iters=1, batch=2, rounding=True), progress=False)


def test_other_errors_pass_through():
    from calib.trainable import backward

    with pytest.raises(RuntimeError, match="does not require grad"):
        backward(torch.ones(2).sum(), torch.nn.Identity())
