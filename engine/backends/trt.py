"""TensorRT as the backend: a serialised engine (``edmrt.export.tensorrt`` builds and caches it) run on torch's
current CUDA stream, with device buffers bound by address so that a CUDA graph can capture it.

The engine's I/O tensors are the ONNX file's (``edmrt.backends.ort``): x_in, c_noise, then one input per
conditioning input (class labels, embeddings, ...), bound by name, -> F.

UNVERIFIED: TensorRT cannot be installed on the machines this was written on; these calls have not run anywhere.
``tensorrt`` is imported where used, never by ``import edmrt``.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .base import as_cond, check_backend_args

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


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise ValueError(f"TensorRT tensor type {dt} is not one edmrt binds (float32, float16, bfloat16, int64)")
    return table[dt]


class TensorRTBackend:
    """Runs a serialised engine on torch's current CUDA stream; ``backend(x_in, c_noise, cond, out)`` with ``cond``
    {name: (B, *shape) tensor} for every conditioning input of the engine (``cond_inputs``), None when it has none.

    ``cond_inputs`` (optional): the conditioning inputs the caller's model declares (``Model.cond``); the engine's
    must be the same (names, per-sample shapes, dtypes), else ValueError."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, cond_inputs=None):
        from ..model import CondInput

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
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        found = []
        for n in inputs:
            if n in ("x_in", "c_noise"):
                continue
            shape = tuple(self.engine.get_tensor_shape(n))[1:]
            if any(d < 0 for d in shape):
                raise ValueError(f"engine {engine_path}: conditioning input {n!r} must have fixed per-sample dims, got "
                                 f"{list(self.engine.get_tensor_shape(n))}")
            found.append(CondInput(n, shape, _torch_dtype(trt, self.engine.get_tensor_dtype(n))))
        if cond_inputs is not None:
            want = {c.name: c for c in cond_inputs}
            got = {c.name: c for c in found}
            if set(want) != set(got) or any((want[k].shape, want[k].dtype) != (got[k].shape, got[k].dtype) for k in want):
                raise ValueError(f"engine {engine_path}'s conditioning inputs {[(c.name, c.shape, c.dtype) for c in found]}"
                                 f" are not the model's {[(c.name, c.shape, c.dtype) for c in cond_inputs]}")
            found = list(cond_inputs)
        self.cond_inputs = tuple(found)
        self.cond_names = tuple(c.name for c in self.cond_inputs)
        self.conditional = "class_labels" in self.cond_names
        self.in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype("x_in"))
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype("F"))
        self._lock = threading.Lock()  # one execution context: engines of several threads take turns

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None:
        check_backend_args(x_in, c_noise, cond, out, self.cond_inputs, self.in_dtype, self.out_dtype)
        if x_in.device.type != "cuda":
            raise ValueError("TensorRTBackend needs CUDA tensors")
        with self._lock:
            self._run(x_in, c_noise, as_cond(cond), out)

    def _run(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict, out: torch.Tensor) -> None:
        ctx = self.context
        B = x_in.shape[0]
        ctx.set_input_shape("x_in", tuple(x_in.shape))
        ctx.set_tensor_address("x_in", x_in.data_ptr())
        ctx.set_input_shape("c_noise", (B,))
        ctx.set_tensor_address("c_noise", c_noise.data_ptr())
        for c in self.cond_inputs:
            ctx.set_input_shape(c.name, (B,) + c.shape)
            ctx.set_tensor_address(c.name, cond[c.name].data_ptr())
        ctx.set_tensor_address("F", out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
