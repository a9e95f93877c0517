"""Engines: build, run and verify deployments of a 2dq QDQ export.

The top layer. It owns the runtimes (ONNX Runtime :mod:`engines.ort_engine`, OpenVINO
:mod:`engines.openvino_engine`, TensorRT :mod:`engines.trt`), the choice among them by name
(:mod:`engines.upscalers`), and the verification of an engine against the PyTorch fake-quant
reference (:mod:`engines.compare`, :mod:`engines.noise`). It may import every other 2dq package;
none of them imports it (``tests/test_layers.py``). Every module imports without TensorRT, CUDA or
OpenVINO installed.
"""
