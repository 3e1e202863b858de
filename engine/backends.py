"""Backends: one protocol for the denoiser network F, whatever runs it.

    backend(x_in, c_noise, class_labels, out) -> None        # writes F(x_in; c_noise, class_labels) into out

=============  ===================================================================================
x_in           (B, C, H, W), contiguous, the model's input dtype (float32 for every edmrt export)
c_noise        B values: shape (B,) or (B, 1, ..., 1) (the executors' sigma view), contiguous, x_in's dtype
class_labels   (B,) int64 for a conditional model (num_classes = the null label); None otherwise
out            (B, C, H, W), contiguous, preallocated by the caller; every element is overwritten
=============  ===================================================================================

All tensors on one device.  Arguments are checked on host metadata only (no device sync); a wrong
shape, dtype or device raises ValueError naming it.  ``BACKENDS`` maps a name to a constructor taking
the model (a torch module, or an ONNX path/session) and options.
"""
from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("edmrt.backends")

__all__ = ["Backend", "TorchBackend", "OnnxRuntimeBackend", "BACKENDS", "make_backend", "check_backend_args"]


@runtime_checkable
class Backend(Protocol):
    """Writes the network output F into a caller-owned buffer."""

    name: str

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None: ...


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_backend_args(x_in, c_noise, class_labels, out, conditional: bool, in_dtype: torch.dtype | None = None,
                       out_dtype: torch.dtype | None = None, sample_shape=None, batch: int | None = None) -> None:
    """Raise ValueError naming the first argument that breaks the protocol (module docstring); host metadata only."""
    if not isinstance(x_in, torch.Tensor) or x_in.ndim != 4 or not x_in.is_floating_point():
        raise ValueError(f"x_in must be a floating-point tensor of shape (B, C, H, W), got {_desc(x_in)}")
    dev, B = x_in.device, x_in.shape[0]
    if in_dtype is not None and x_in.dtype != in_dtype:
        raise ValueError(f"x_in must have dtype {in_dtype} (the model's input), got {x_in.dtype}")
    if sample_shape is not None and any(isinstance(e, int) and e != g for e, g in zip(sample_shape, x_in.shape[1:])):
        raise ValueError(f"x_in must have shape (B, {', '.join(str(e) for e in sample_shape)}), got {tuple(x_in.shape)}")
    if batch is not None and B != batch:
        raise ValueError(f"the model has a fixed batch of {batch}, got x_in of batch {B}")
    if not x_in.is_contiguous():
        raise ValueError("x_in must be contiguous")
    if (not isinstance(c_noise, torch.Tensor) or c_noise.ndim < 1 or c_noise.shape[0] != B
            or c_noise.numel() != B or c_noise.dtype != x_in.dtype or c_noise.device != dev or not c_noise.is_contiguous()):
        raise ValueError(f"c_noise must be a contiguous {x_in.dtype} tensor of shape ({B},) or ({B}, 1, ..., 1) on {dev}, "
                         f"got {_desc(c_noise)}")
    if conditional:
        if (not isinstance(class_labels, torch.Tensor) or class_labels.shape != (B,) or class_labels.dtype != torch.int64
                or class_labels.device != dev or not class_labels.is_contiguous()):
            raise ValueError(f"class_labels must be a contiguous int64 tensor of shape ({B},) on {dev} for a conditional "
                             f"model (the null label for unconditional rows), got {_desc(class_labels)}")
    elif class_labels is not None:
        raise ValueError(f"class_labels must be None for an unconditional model, got {_desc(class_labels)}")
    want = out_dtype if out_dtype is not None else x_in.dtype
    if (not isinstance(out, torch.Tensor) or out.shape != x_in.shape or out.dtype != want or out.device != dev
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {want} tensor of shape {tuple(x_in.shape)} on {dev}, got {_desc(out)}")


class TorchBackend:
    """A torch module ``net(x_in, c_noise, class_labels) -> F`` (put in eval mode), eager or ``torch.compile``d.

    ``dtype`` is the I/O dtype (x_in, c_noise, out): float32 also for an ``EDMUNet.to_fp16()`` net, whose
    float16 lives inside.
    ``out.copy_(F)``: the one allocation per call is the network's own output.  ``compile=True`` compiles
    lazily, at the first call; a compiler failure there (no C++ toolchain, an unsupported op) raises
    RuntimeError saying so, rather than silently running eager.
    """

    def __init__(self, net: nn.Module, compile: bool = False, dtype: torch.dtype = torch.float32, **compile_options):
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net.eval()
        self.conditional = int(getattr(net, "num_classes", 0) or 0) > 0
        self.compiled = bool(compile)
        self.name = "torch-compile" if compile else "torch"
        self._fn = torch.compile(net, **compile_options) if compile else net
        self._first = True
        p = next(net.parameters(), None)
        self.device = p.device if p is not None else None
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype (of x_in, c_noise and out) must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        check_backend_args(x_in, c_noise, class_labels, out, self.conditional, self.dtype, self.dtype)
        if self.device is not None and x_in.device != self.device:
            raise ValueError(f"x_in is on {x_in.device} but the network is on {self.device}")
        with torch.inference_mode():
            if self.compiled and self._first:
                try:
                    F = self._fn(x_in, c_noise, class_labels)
                except Exception as exc:
                    raise RuntimeError(f"torch.compile failed on {x_in.device} ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:300]}); use backend 'torch' (eager) instead") from exc
                self._first = False
            else:
                F = self._fn(x_in, c_noise, class_labels)
            if F.shape != out.shape:
                raise ValueError(f"the network returned shape {tuple(F.shape)}, expected {tuple(out.shape)}")
            out.copy_(F)


class OnnxRuntimeBackend:
    """An edmrt ONNX file (or a checked ``InferenceSession``) run with ONNX Runtime's I/O binding.

    Inputs and ``out`` are bound by ``data_ptr``: ORT reads the caller's tensors and writes F straight into
    ``out``, with no copy and no allocation per call.  The binding is redone (and the buffers re-checked)
    only when a buffer's address, shape or dtype changes, so an engine loop on static buffers binds once.
    CPU tensors with the CPU provider; CUDA tensors need the CUDA provider (the session then runs on torch's
    current stream, so no host sync is needed between the fused step and the network).
    """

    name = "onnxruntime"

    def __init__(self, path_or_session, providers=None):
        import onnxruntime as ort

        from edmrt.export.onnx import ORT_TYPES, check_onnx_signature, load_onnx_session

        if isinstance(path_or_session, ort.InferenceSession):
            self.session = path_or_session
            self.conditional = check_onnx_signature(self.session.get_inputs(), self.session.get_outputs())
            if providers is not None:
                raise ValueError("providers are fixed by the given InferenceSession; pass a path to choose them")
        else:
            if providers is None and torch.cuda.is_available():
                from edmrt.export.onnx import default_providers
                stream = str(torch.cuda.current_stream().cuda_stream)
                providers = [("CUDAExecutionProvider", {"has_user_compute_stream": "1", "user_compute_stream": stream})
                             if p == "CUDAExecutionProvider" else p for p in default_providers()]
            self.session = load_onnx_session(path_or_session, providers=providers)
            self.conditional = check_onnx_signature(self.session.get_inputs(), self.session.get_outputs())
        ins = {i.name: i for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        self.in_dtype = ORT_TYPES[ins["x_in"].type]
        self.out_dtype = ORT_TYPES[out.type]
        shape = ins["x_in"].shape
        self.sample_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.providers = self.session.get_providers()
        self._binding = self.session.io_binding()
        self._key = None

    def _bind(self, x_in, c_noise, class_labels, out) -> None:
        check_backend_args(x_in, c_noise, class_labels, out, self.conditional, self.in_dtype, self.out_dtype,
                           self.sample_shape, self.batch)
        dev = x_in.device
        if dev.type == "cuda":
            if "CUDAExecutionProvider" not in self.providers:
                raise ValueError(f"CUDA tensors need the CUDAExecutionProvider; this session runs on {self.providers}")
            device_type, device_id = "cuda", dev.index or 0
        elif dev.type == "cpu":
            device_type, device_id = "cpu", 0
        else:
            raise ValueError(f"ONNX Runtime binds CPU or CUDA tensors, got device {dev}")
        B = x_in.shape[0]
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()

        def bind_input(name, t, shape):
            b.bind_input(name, device_type, device_id, _NP[t.dtype], list(shape), t.data_ptr())

        bind_input("x_in", x_in, x_in.shape)
        bind_input("c_noise", c_noise, (B,))
        if self.conditional:
            bind_input("class_labels", class_labels, (B,))
        b.bind_output("F", device_type, device_id, _NP[out.dtype], list(out.shape), out.data_ptr())

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        try:
            key = (x_in.data_ptr(), x_in.shape, x_in.dtype, x_in.device, c_noise.data_ptr(), c_noise.shape, c_noise.dtype,
                   None if class_labels is None else (class_labels.data_ptr(), class_labels.shape, class_labels.dtype,
                                                      class_labels.device, class_labels.is_contiguous()),
                   out.data_ptr(), out.shape, out.dtype, out.device,
                   x_in.is_contiguous(), c_noise.is_contiguous(), out.is_contiguous())
        except AttributeError:  # not tensors: let the check name the culprit
            key = None
        if key is None or key != self._key:
            self._key = None
            self._bind(x_in, c_noise, class_labels, out)
            self._key = key
        self.session.run_with_iobinding(self._binding)


def _torch_compile(net: nn.Module, **options) -> TorchBackend:
    return TorchBackend(net, compile=True, **options)


BACKENDS = {
    "torch": TorchBackend,
    "torch-compile": _torch_compile,
    "onnxruntime": OnnxRuntimeBackend,
}


def make_backend(name: str, model, **options):
    """``BACKENDS[name](model, **options)`` with a clear error for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](model, **options)
