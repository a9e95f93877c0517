"""``2dq-report``: what calibration did, in pictures and tables.

- :mod:`.stats`: per-quantizer calibration data, streamed through the quantizers' observer hook
  (histograms, exact in-range counts, DOBI bounds), and the "most affected" ranking;
- :mod:`.sources`: artifacts, their labels, the DOBI source, the calibration patches rebuilt;
- :mod:`.figures`: matplotlib figures (histograms with bounds, per-block small multiples, overview);
- :mod:`.tables`: PSNR/SSIM of every method through ``evaluate_set``, the paper's Table 3 rows;
- :mod:`.crops`: the crop window where the models' outputs differ most;
- :mod:`.html` / :mod:`.sections`: the self-contained page; :mod:`.cli`: the command.
"""
