"""TensorRT as the backend: a serialised engine (``edmrt.export.tensorrt`` builds and caches it) run on torch's
current CUDA stream, with device buffers bound by address so that a CUDA graph can capture it.

UNVERIFIED: TensorRT cannot be installed on the machines this was written on; these calls have not run anywhere.
``tensorrt`` is imported where used, never by ``import edmrt``.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

__all__ = ["TensorRTBackend", "tensorrt_available", "import_tensorrt"]


def tensorrt_available() -> bool:
    """Whether TensorRT is importable and a CUDA GPU is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def import_tensorrt():
    """The ``tensorrt`` module, or RuntimeError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)") from None
    return trt


class TensorRTBackend:
    """Runs a serialised engine on torch's current CUDA stream; ``backend(x_in, c_noise, labels, out)``."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike):
        trt = import_tensorrt()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT could not deserialise {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = {"x_in", "c_noise", "F"} - set(names)
        if missing:
            raise ValueError(f"engine {engine_path} lacks I/O tensors {sorted(missing)}; has {names}")
        self.conditional = "class_labels" in names
        self._lock = threading.Lock()  # one execution context: engines of several threads take turns

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None, out: torch.Tensor) -> None:
        if x_in.device.type != "cuda" or out.device.type != "cuda":
            raise ValueError("TensorRTBackend needs CUDA tensors")
        with self._lock:
            self._run(x_in, c_noise, labels, out)

    def _run(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None, out: torch.Tensor) -> None:
        ctx = self.context
        ctx.set_input_shape("x_in", tuple(x_in.shape))
        ctx.set_tensor_address("x_in", x_in.data_ptr())
        ctx.set_input_shape("c_noise", tuple(c_noise.reshape(-1).shape))
        ctx.set_tensor_address("c_noise", c_noise.data_ptr())
        if self.conditional:
            if labels is None:
                raise ValueError("this engine is class-conditional: labels are required")
            ctx.set_input_shape("class_labels", tuple(labels.shape))
            ctx.set_tensor_address("class_labels", labels.data_ptr())
        ctx.set_tensor_address("F", out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
