"""TensorRT as the backend: a serialised engine (``edmrt.export.tensorrt`` builds and caches it) run on torch's
current CUDA stream, with device buffers bound by address so that a CUDA graph can capture it.

The engine's I/O tensors are the ONNX file's (``edmrt.onnx_contract``): x_in, c_noise, then one input per
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


def _match_weight_names(engine_names: list, params: list) -> dict:
    """{parameter name: engine weight name} for the parameters the engine holds: the engine's name is the parameter's
    or ends with "." + it (the export's wrapper prefixes ``net.``); the shortest such name wins."""
    out = {}
    for p in params:
        hits = [e for e in engine_names if e == p or e.endswith("." + p)]
        if hits:
            out[p] = min(hits, key=len)
    return out


class TensorRTBackend:
    """Runs a serialised engine on torch's current CUDA stream; ``backend(x_in, c_noise, cond, out)`` with ``cond``
    {name: (B, *shape) tensor} for every conditioning input of the engine (``cond_inputs``), None when it has none.

    ``cond_inputs`` (optional): the conditioning inputs the caller's model declares (``Model.cond``); the engine's
    must be the same (names, per-sample shapes, dtypes), else ValueError.

    ``weights`` (optional, a refittable engine: ``build_engine(refit=True)``): the network's named parameters
    {name: tensor}.  ``update_weights({name: tensor})`` then writes new values into the engine with
    ``trt.Refitter`` (an adapter swap without a rebuild); the engine's weights are the ONNX file's initializers,
    named as the export names the parameters (``net.<name>``), matched by that suffix.  Weights TensorRT fused
    with a changed one (``Refitter.get_missing_weights``) are supplied from ``weights`` too."""

    name = "tensorrt"
    shares_weights = False   # the engine holds its own copy; a refittable one takes a swap: update_weights

    @classmethod
    def from_model(cls, model, device: torch.device, digest=None):
        """The model's network exported once into the ONNX cache, built into a cached fp16 engine (batch 1..128,
        optimised for 8); a model with adapters gets a refittable engine, so ``Sampler.set_adapters`` refits it in
        place (``trt.Refitter``)."""
        from .onnx_cache import cached_onnx, check_exportable

        check_exportable(model, "tensorrt")
        if not tensorrt_available():  # said before minutes of export, not after
            raise ValueError("backend 'tensorrt' needs TensorRT and a CUDA GPU (pip install tensorrt on a machine with "
                             "an NVIDIA GPU); use 'onnxruntime' or 'torch' here")
        from edmrt.export.tensorrt import EngineCache, Profile

        adapters = getattr(model, "adapters", None)
        refit = adapters is not None and bool(tuple(adapters.targets))
        path, _ = cached_onnx(model, device, weights=digest() if digest is not None else None)
        shapes = tuple(sorted((c.name, c.shape) for c in model.cond))
        engine = EngineCache().get(path, Profile(model.sample_shape, 1, 8, 128, cond_shapes=shapes), "fp16",
                                   refit=refit)
        return cls(engine, cond_inputs=model.cond, weights=dict(model.network.named_parameters()) if refit else None)

    def __init__(self, engine_path: str | os.PathLike, cond_inputs=None, weights: dict | None = None):
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
        self._weights = dict(weights) if weights else {}
        self._refitter = None
        self._engine_names: dict = {}   # parameter name -> the engine's weight name
        if self._weights:
            if not getattr(self.engine, "refittable", False):
                raise ValueError(f"engine {engine_path} is not refittable: build it with refit=True "
                                 "(EngineCache.get(..., refit=True)) to swap adapters into it")
            self._refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
            self._engine_names = _match_weight_names(list(self._refitter.get_all_weights()), list(self._weights))

    def update_weights(self, new: dict) -> None:
        """Write ``new`` {parameter name: tensor} into the engine in place (``trt.Refitter``), with every weight
        TensorRT needs alongside them from the parameters given at construction; ValueError for a name the engine
        does not hold, RuntimeError when TensorRT refuses the refit.  Waits for the work queued on the engine."""
        if self._refitter is None:
            raise ValueError("this TensorRT backend was built without weights=...: its engine cannot be refitted")
        unknown = [n for n in new if n not in self._engine_names]
        if unknown:
            raise ValueError(f"the engine holds no weight for the parameters {unknown[:3]} (constant-folded away by "
                             "the export, or not parameters of this network)")
        trt = import_tensorrt()
        keep = []  # host copies alive until the refit has read them

        def put(param: str, value: torch.Tensor) -> None:
            engine_name = self._engine_names[param]
            proto = self._refitter.get_weights_prototype(engine_name) if hasattr(
                self._refitter, "get_weights_prototype") else None
            dtype = torch.float16 if proto is not None and proto.dtype == trt.DataType.HALF else torch.float32
            arr = value.detach().to("cpu", dtype).contiguous().numpy()
            keep.append(arr)
            if not self._refitter.set_named_weights(engine_name, trt.Weights(arr)):
                raise RuntimeError(f"TensorRT refused the weights of {param!r} ({engine_name!r}, shape {arr.shape})")

        by_engine_name = {v: k for k, v in self._engine_names.items()}
        with self._lock:
            torch.cuda.synchronize()
            for param, value in new.items():
                put(param, value)
            missing = [by_engine_name.get(n) for n in self._refitter.get_missing_weights()]
            if None in missing:
                raise RuntimeError("TensorRT needs weights edmrt cannot map to the network's parameters: "
                                   f"{list(self._refitter.get_missing_weights())[:3]}")
            for param in missing:
                put(param, self._weights[param])
            if not self._refitter.refit_cuda_engine():
                raise RuntimeError("TensorRT could not refit the engine (Refitter.refit_cuda_engine returned False)")

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
