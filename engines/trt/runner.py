"""Run a TensorRT plan on batches of tiles: the TensorRT tile runner behind ``--backend trt``.

:class:`TrtTileRunner` implements the tile-runner contract of :mod:`toolchain.backends`: ``scale``,
``tile``, ``multiple`` and ``__call__(tiles)`` mapping float32 ``(N, 3, T, T)`` to ``(N, 3, sT, sT)``,
so :class:`toolchain.backends.TiledUpscaler` upscales any image through it with the shared tiling
code. A batch larger than the plan's optimization profile allows is split into several engine calls.

Before anything runs, the plan's sidecar is checked against this GPU, this TensorRT, the plan bytes
and (optionally) the ONNX file it must come from (:func:`engines.trt.sidecar.validate_plan`).

Execution uses TensorRT's name-based I/O: ``context.set_input_shape`` and
``context.set_tensor_address`` for the two tensors, then ``context.execute_async_v3(stream)``. Device
buffers are allocated once for the largest batch, through pycuda when it is importable (page-locked
host staging, the device's primary context shared with PyTorch) and through torch CUDA tensors
otherwise. Inputs are converted to the engine's input dtype (float32 or float16), outputs returned as
float32 on the CPU.

Written against the TensorRT Python API 10.x and 11.x (ICudaEngine: num_io_tensors, get_tensor_name,
get_tensor_mode, get_tensor_dtype, get_tensor_profile_shape; IExecutionContext: set_input_shape,
set_tensor_address, execute_async_v3; Runtime.deserialize_cuda_engine), not run on a real TensorRT
here. Doc pages used:
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html,
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html,
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
(and the name-based buffer example of the API migration guide,
https://docs.nvidia.com/deeplearning/tensorrt/migration-guide/index.html).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from toolchain.files import sha256_file

from .builder import import_tensorrt, make_trt_logger
from .sidecar import current_gpu, read_sidecar, validate_plan, validate_source

log = logging.getLogger(__name__)

#: TensorRT ``DataType`` member names the runner accepts for its I/O tensors
TRT_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16}


def split_batches(count: int, max_batch: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``max_batch`` tiles covering ``0..count``, in order."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [(start, min(start + max_batch, count)) for start in range(0, count, max_batch)]


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    """Torch dtype for a TensorRT I/O ``DataType`` name (``"FLOAT"``, ``"HALF"``)."""
    if trt_dtype_name not in TRT_TORCH_DTYPES:
        raise ValueError(
            f"engine I/O dtype {trt_dtype_name} is not supported; expected float32 (FLOAT) or float16 (HALF)"
        )
    return TRT_TORCH_DTYPES[trt_dtype_name]


def cuda_index(device: str | int | torch.device) -> int:
    """CUDA device index of ``device`` (``"cuda"`` means the current device)."""
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"TensorRT runs on a CUDA device, got device {str(dev)!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def pick_buffers(requested: str, pycuda_available: bool) -> str:
    """``"pycuda"`` or ``"torch"``: ``"auto"`` prefers pycuda when it is importable."""
    if requested not in ("auto", "pycuda", "torch"):
        raise ValueError(f"buffers must be auto, pycuda or torch, got {requested!r}")
    if requested == "pycuda" and not pycuda_available:
        raise ImportError("buffers='pycuda' but pycuda is not installed (pip install '2dq[trt]')")
    if requested == "auto":
        return "pycuda" if pycuda_available else "torch"
    return requested


class _TorchBuffers:
    """I/O buffers as torch CUDA tensors on a private stream."""

    def __init__(
        self,
        index: int,
        in_shape: tuple[int, ...],
        in_dtype: torch.dtype,
        out_shape: tuple[int, ...],
        out_dtype: torch.dtype,
    ):
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)
        self.input = torch.empty(in_shape, dtype=in_dtype, device=self.device)
        self.output = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        self.input_ptr, self.output_ptr = self.input.data_ptr(), self.output.data_ptr()
        self.stream_handle = self.stream.cuda_stream

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield

    def upload(self, tiles: torch.Tensor) -> None:
        # the tiles may still be written by work on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.input[: tiles.shape[0]].copy_(tiles.to(self.device, self.input.dtype), non_blocking=True)

    def download(self, count: int) -> torch.Tensor:
        self.stream.synchronize()
        return self.output[:count].to("cpu", torch.float32)

    def close(self) -> None:
        self.stream.synchronize()
        del self.input, self.output


class _PycudaBuffers:
    """I/O buffers from pycuda: device allocations, page-locked host staging, a pycuda stream.

    Uses the device's primary context, which the CUDA runtime (TensorRT, PyTorch) also uses.
    """

    def __init__(
        self,
        index: int,
        in_shape: tuple[int, ...],
        in_dtype: torch.dtype,
        out_shape: tuple[int, ...],
        out_dtype: torch.dtype,
    ):
        import numpy as np
        import pycuda.driver as cuda

        self._cuda = cuda
        cuda.init()
        self.context = cuda.Device(index).retain_primary_context()
        to_np = {torch.float32: np.float32, torch.float16: np.float16}
        with self.active():
            self.stream = cuda.Stream()
            self.host_in = cuda.pagelocked_empty(in_shape, to_np[in_dtype])
            self.host_out = cuda.pagelocked_empty(out_shape, to_np[out_dtype])
            self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
            self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self.in_dtype = in_dtype
        self.input_ptr, self.output_ptr = int(self.dev_in), int(self.dev_out)
        self.stream_handle = self.stream.handle

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def upload(self, tiles: torch.Tensor) -> None:
        count = tiles.shape[0]
        self.host_in[:count] = tiles.detach().to("cpu", self.in_dtype).numpy()
        self._cuda.memcpy_htod_async(self.dev_in, self.host_in[:count], self.stream)

    def download(self, count: int) -> torch.Tensor:
        self._cuda.memcpy_dtoh_async(self.host_out[:count], self.dev_out, self.stream)
        self.stream.synchronize()
        return torch.from_numpy(self.host_out[:count].copy()).to(torch.float32)

    def close(self) -> None:
        with self.active():
            self.stream.synchronize()
            self.dev_in.free()
            self.dev_out.free()
        self.context.detach()


class TrtTileRunner:
    """A TensorRT plan as a tile runner: float32 ``(N, 3, T, T)`` -> ``(N, 3, sT, sT)`` on the CPU.

    ``device``: the CUDA device to run on; ``onnx_path``: when given, the plan must have been built from
    exactly this ONNX file; ``buffers``: ``"auto"`` (pycuda if importable, else torch), ``"pycuda"``
    or ``"torch"``. Use as a context manager (or call :meth:`close`) to free the GPU memory.

    Example (needs TensorRT and a CUDA GPU, so the doctests do not run it)::

        with TrtTileRunner("swinir_x2.plan") as run:
            sr = TiledUpscaler(run, overlap=16, batch=8).upscale(lr)
    """

    def __init__(
        self,
        plan_path: str | os.PathLike,
        device: str | int = "cuda",
        *,
        onnx_path: str | os.PathLike | None = None,
        buffers: str = "auto",
    ):
        plan = Path(plan_path)
        if not plan.is_file():
            raise FileNotFoundError(f"TensorRT plan not found: {plan}")
        record = read_sidecar(plan)
        onnx_sha256 = sha256_file(onnx_path) if onnx_path is not None else None
        if onnx_sha256 is not None:
            # a plan of another ONNX is refused before TensorRT or a GPU is needed: the answer is the same everywhere
            validate_source(plan, record, onnx_sha256)
        trt = import_tensorrt()
        self._index = cuda_index(device)
        validate_plan(
            plan,
            record,
            gpu=current_gpu(self._index),
            tensorrt_version=trt.__version__,
            onnx_sha256=onnx_sha256,
            plan_sha256=sha256_file(plan),
        )
        self.scale, self.tile = int(record["scale"]), int(record["tile"])
        self.multiple = int(record.get("multiple", 1))
        self._in_name, self._out_name = record["input"]["name"], record["output"]["name"]
        self._logger = make_trt_logger(trt, __name__)
        with torch.cuda.device(self._index):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if self._engine is None:
                raise RuntimeError(
                    f"TensorRT could not deserialize {plan}: " + ("; ".join(self._logger.errors) or "see the log")
                )
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self._in_name] or outputs != [self._out_name]:
            raise RuntimeError(
                f"{plan} has inputs {inputs} and outputs {outputs}, "
                f"its sidecar says {self._in_name!r} -> {self._out_name!r}"
            )
        in_dtype = torch_dtype(self._engine.get_tensor_dtype(self._in_name).name)
        out_dtype = torch_dtype(self._engine.get_tensor_dtype(self._out_name).name)
        _, _, max_shape = self._engine.get_tensor_profile_shape(self._in_name, 0)
        if tuple(max_shape)[1:] != (3, self.tile, self.tile):
            raise RuntimeError(f"{plan} profile max shape {tuple(max_shape)} does not match tile {self.tile}")
        self.max_batch = int(max_shape[0])
        side = self.scale * self.tile
        kind = pick_buffers(buffers, importlib.util.find_spec("pycuda") is not None)
        make = _PycudaBuffers if kind == "pycuda" else _TorchBuffers
        self._buffers = make(
            self._index, (self.max_batch, 3, self.tile, self.tile), in_dtype, (self.max_batch, 3, side, side), out_dtype
        )
        log.info(
            "loaded %s: tile %d, x%d, up to %d tiles per call, %s I/O buffers",
            plan,
            self.tile,
            self.scale,
            self.max_batch,
            kind,
        )

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 3, T, T)`` -> ``(N, 3, sT, sT)`` float32 on the CPU; N may exceed ``max_batch``."""
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, self.tile, self.tile):
            raise ValueError(f"expected tiles (N, 3, {self.tile}, {self.tile}), got {tuple(tiles.shape)}")
        if tiles.shape[0] == 0:
            side = self.scale * self.tile
            return torch.empty(0, 3, side, side)
        return torch.cat(
            [self._run(tiles[start:stop]) for start, stop in split_batches(tiles.shape[0], self.max_batch)]
        )

    def _run(self, tiles: torch.Tensor) -> torch.Tensor:
        count = tiles.shape[0]
        with torch.cuda.device(self._index), self._buffers.active():
            self._buffers.upload(tiles)
            if not self._context.set_input_shape(self._in_name, (count, 3, self.tile, self.tile)):
                raise RuntimeError(f"TensorRT refused input shape ({count}, 3, {self.tile}, {self.tile})")
            self._context.set_tensor_address(self._in_name, self._buffers.input_ptr)
            self._context.set_tensor_address(self._out_name, self._buffers.output_ptr)
            if not self._context.execute_async_v3(self._buffers.stream_handle):
                raise RuntimeError(
                    "TensorRT execute_async_v3 failed: " + ("; ".join(self._logger.errors) or "see the log")
                )
            return self._buffers.download(count)

    def close(self) -> None:
        """Free the I/O buffers and the TensorRT objects (idempotent)."""
        if getattr(self, "_buffers", None) is not None:
            self._buffers.close()
            self._buffers = None
        for name in ("_context", "_engine", "_runtime"):
            if hasattr(self, name):
                delattr(self, name)

    def __enter__(self) -> TrtTileRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
