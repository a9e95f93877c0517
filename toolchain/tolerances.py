"""Every named tolerance and floor of the project, each with why it has its value.

The library (the verification criterion of ``2dq-build-engine --verify``, the Polygraphy comparators)
and the tests import them from here, so that a floor is written once. The criterion itself is
ARCHITECTURE.md section 7; the published figures section 8. Units: dB for PSNR, SSIM as a fraction,
absolute errors in the output's units (images in [0, 1]) unless the name says otherwise.
"""
from __future__ import annotations

# --- the verification criterion (ARCHITECTURE.md s. 7): engine vs the fake-quant reference --------

#: ONNX Runtime on the QDQ graph vs fake-quant (dB): the same integer arithmetic, only float layers differ
ORT_MIN_PSNR = 60.0
#: ... and its share of identical uint8 values: float layers (LayerNorm, softmax, GELU) may differ in the
#: last ulp and flip a rounding now and then, not more
ORT_MIN_IDENTICAL = 0.99
#: a TensorRT plan with fp32 float layers (dB): its float kernels (fused, chosen per GPU) stray further than ORT's
TRT_MIN_PSNR = 50.0
#: any engine with fp16 float layers (dB): fp16 rounding in LayerNorm / softmax / GELU flips more codes
FP16_MIN_PSNR = 45.0
#: the reference's own noise floor is measured at this input noise (standard deviation, images in [0, 1]):
#: float-sized, the size of the last-bit differences between engines' float layers
DEFAULT_NOISE_SIGMA = 1e-6
#: ... and for an engine with fp16 float layers at this one: fp16's unit roundoff 2**-11, the bound of the relative
#: error of one fp16 rounding (|fl(x) - x| <= u |x|). An fp16 body rounds every float activation by up to this much,
#: at every float layer, while the noise draw moves the input once: measured, an input noise of the uniform rounding
#: spread alone (u / sqrt(3) on [0.5, 1)) left the fp16 engine of the loud tiny W4A4 model 2.4 dB below that noise
#: floor, DAT-light x4 W4A4 0.13 dB below it
FP16_NOISE_SIGMA = 2.0 ** -11
#: noise draws of the reference against itself: the first sets the PSNR floor, all of them the task spread
NOISE_DRAWS = 4
#: the engine may sit this far (dB) below the reference's own noise floor (a deep quantized model
#: disagrees with itself under float noise more than any fixed floor allows)
NOISE_FLOOR_MARGIN = 1.0
#: the task check: engine and reference PSNR-Y against HR equal within this (dB; tables give two decimals)
TASK_PSNR_TOLERANCE = 0.02
#: ... and SSIM-Y within this (tables give four decimals)
TASK_SSIM_TOLERANCE = 0.0005
#: the task tolerance widens to this many times the RMS of the reference's own task differences under
#: noise when that is larger than the fixed tolerance (a sensitive 4-bit model on 5 images: DAT-light x4
#: W4A4 moves its own Set5 PSNR by +0.024 dB under 2e-6 input noise)
TASK_NOISE_FACTOR = 3.0
#: integer codes of a quantizer given the same float input (steps): ONNX's QuantizeLinear and
#: toolchain.quant.grid round alike, so exact
CODE_ATOL = 0

# --- Polygraphy comparators ----------------------------------------------------------------------

#: engines.compare.polygraphy_compare: the 99th percentile of |engine - reference| ...
POLYGRAPHY_QUANTILE = 0.99
#: ... below half a uint8 level: such an error moves a value by at most one 8-bit level
POLYGRAPHY_ATOL = 0.5 / 255
#: engines.trt.verify.polygraphy_compare: median |TensorRT - ONNX Runtime| on random tiles (a debugging
#: aid that localizes a disagreement; the verification criterion above is what an engine must pass)
TRT_ORT_MEDIAN_ATOL = 1e-2

# --- published figures (ARCHITECTURE.md s. 8) ----------------------------------------------------

#: reproducing a published PSNR (dB): the figures are given to two decimals
PUBLISHED_PSNR_TOLERANCE = 0.02
#: reproducing a published SSIM: the figures are given to four decimals
PUBLISHED_SSIM_TOLERANCE = 0.0005
#: reproducing an SSIM computed in MATLAB, which rounds Y to 8 bits (we do not, as BasicSR)
MATLAB_SSIM_TOLERANCE = 0.001

# --- numerical agreement of our own components (float rounding, not method error) ----------------

#: SSIM through the separable filter vs the per-window formula (float64)
SSIM_ATOL = 1e-10
#: vectorized bicubic resize vs the per-pixel reference (float64)
IMRESIZE_REFERENCE_ATOL = 1e-12
#: resize in float and round once vs MATLAB's LR (which rounds after each axis): measured 85.6 / 88.3 /
#: 89.7 % exact pixels on Set5 x2 / x3 / x4 ...
IMRESIZE_FLOAT_PATH_MIN_EXACT = 0.85
#: ... and at most 2 uint8 levels apart
IMRESIZE_FLOAT_PATH_MAX_LEVELS = 2
#: JPEG round trips are lossy: mean |read - written| allowed on a smooth test image (in [0, 1] units)
JPEG_MEAN_ERROR = 0.02
#: tiled vs whole-image output of a position-independent operator: blending must be exact up to fp32
TILE_BLEND_ATOL = 1e-6
#: spandrel's SwinIR vs the official architecture's golden outputs (tiny random model, float32)
SWINIR_GOLDEN_ATOL = 1e-5
#: NGswin vs the authors' code's golden outputs with their pretrained weights (float32 outputs in [0, 1])
NGSWIN_GOLDEN_ATOL = 1e-4
#: eager export view vs fake-quant model: same grids, matmul vs linear kernels may round differently
EXPORT_VIEW_ATOL = 1e-5
#: the exported graph (ORT, no optimizations) vs the fake-quant model; measured 7.2e-7 on the tiny W4A4
#: SwinIR at batches 1-8 (a batch fixed at the trace's 2 gave 1e-3)
EXPORT_GRAPH_ATOL = 1e-5
#: TensorRT's integer convolution vs ONNX Runtime's float one on identical codes: rounding only
TRT_MAX_ABS_ERROR = 1e-3
#: relative slack on DOBI's "within one candidate step" (float32 bounds vs float64 candidates)
DOBI_STEP_SLACK = 1e-4
#: DQC bounds after 4 steps, two half-batch gradients (two ranks) vs one whole-batch gradient: the float32
#: sums differ in the last bits and Adam's first steps (about sign(grad) * lr) carry that into the bounds;
#: measured up to 2e-5 on the project's former SwinIR copy and up to 1.05e-4 on spandrel's tiny SwinIR on an
#: AMD EPYC, up to 4.4e-4 on an Intel Xeon (8 of 96 bounds above 2e-4; its kernels add in another order),
#: against steps of 1e-2: 1e-3 is 10% of one step (the ranks against the half batches stay bit for bit)
WHOLE_BATCH_ATOL = 1e-3
#: tests of folds: the float model with random smoothing factors (in [1/e, e]) or shift offsets vs without,
#: max |difference| / output range
FLOAT_FOLD_RTOL = 1e-5
#: shifted grid vs 2DQuant's lower + k * step: max |difference| in steps (fp32 rounding of the offset algebra)
GRID_TOL_STEPS = 1e-4
#: calib.transforms.trace: per-channel sums (float64 sums of fp32 values) that agree to this, relative to
#: their magnitude, are "the same tensor"
CHANNEL_MATCH_RTOL = 1e-6
#: calib.transforms.trace.verify_folds: a fold passes when the float output moves by at most this fraction
#: of its range
FOLD_VERIFY_RTOL = 1e-4
