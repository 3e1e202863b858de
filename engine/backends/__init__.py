"""Backends: what runs the network F, behind one protocol (``base.py``) and one registry.

=============  =========================================  ================================================
name           constructor (what ``make_backend`` takes)  what ``resolve_backend`` builds from a ``Model``
=============  =========================================  ================================================
torch          ``TorchBackend(net)``                      the network, moved to the device
torch-compile  ``TorchBackend(net, compile=True)``        the same, compiled at the first call
onnxruntime    ``OnnxRuntimeBackend(path | session)``     the network exported once (``onnx_cache.py``)
tensorrt       ``TensorRTBackend(engine_path)``           that ONNX file built into a cached engine
custom         ``CallableBackend(fn)``                    a network that is a plain callable
=============  =========================================  ================================================

"auto" picks the fastest verified backend for the device: ONNX Runtime on the CPU (1.1-1.5x torch eager
on the CIFAR-sized UNet here), torch eager on CUDA (TensorRT is unverified).  Only ``torch`` and this
package's own modules are imported by ``import edmrt``; onnx, onnxruntime and tensorrt where used.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from ..model import Model
from .base import Backend, check_backend_args
from .custom import CallableBackend
from .module import TorchBackend, torch_compile
from .ort import OnnxRuntimeBackend
from .trt import TensorRTBackend, tensorrt_available

__all__ = ["Backend", "BACKENDS", "make_backend", "resolve_backend", "check_backend_args", "TorchBackend",
           "OnnxRuntimeBackend", "TensorRTBackend", "CallableBackend"]

BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend,
    "torch-compile": torch_compile,
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
    "custom": CallableBackend,
}


def make_backend(name: str, source, **options) -> Backend:
    """``BACKENDS[name](source, **options)`` with a clear error for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](source, **options)


def _auto(model: Model, device: torch.device) -> str:
    if not isinstance(model.network, torch.nn.Module):
        return "custom"
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        return "onnxruntime"
    return "torch"


def resolve_backend(name: str, model: Model, device: torch.device) -> tuple[str, Backend]:
    """(name, backend) for ``model`` on ``device``: "auto" or a name in ``BACKENDS`` (table above).

    A network that is not a torch module runs as "custom" under "torch" too (as before exports existed);
    "onnxruntime" and "tensorrt" need a torch module, exported once into the ONNX cache."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    name = _auto(model, device) if name == "auto" else name
    net = model.network
    is_module = isinstance(net, torch.nn.Module)
    if name == "custom" or (name in ("torch", "torch-compile") and not is_module):
        return "custom", CallableBackend(net, cond_inputs=model.cond)
    if name in ("torch", "torch-compile"):
        return name, make_backend(name, net.to(device), cond_inputs=model.cond)
    if not is_module:
        raise ValueError(f"backend {name!r} exports the network to ONNX: it must be a torch.nn.Module")
    if name == "tensorrt" and not tensorrt_available():  # said before minutes of export, not after
        raise ValueError("backend 'tensorrt' needs TensorRT and a CUDA GPU (pip install tensorrt on a machine with an "
                         "NVIDIA GPU); use 'onnxruntime' or 'torch' here")
    from .onnx_cache import cached_onnx

    adapters = getattr(model, "adapters", None)
    targets = tuple(adapters.targets) if adapters is not None else ()
    path, session = cached_onnx(model, device, weight_inputs=targets if name == "onnxruntime" else ())
    if name == "onnxruntime":
        # A model with adapters: their target weights are graph inputs bound to the live parameters (after the
        # export, which may move the network), so Sampler.set_adapters' in-place copy reaches the live session.
        params = dict(net.named_parameters())
        weights = {t: params[t] for t in targets} or None
        return name, OnnxRuntimeBackend(session if session is not None else path, cond_inputs=model.cond,
                                        weights=weights)
    from edmrt.export.tensorrt import EngineCache, Profile

    shapes = tuple(sorted((c.name, c.shape) for c in model.cond))
    # A model with adapters: a refittable engine, so Sampler.set_adapters refits it in place (trt.Refitter).
    engine = EngineCache().get(path, Profile(model.sample_shape, 1, 8, 128, cond_shapes=shapes), "fp16",
                               refit=bool(targets))
    return name, TensorRTBackend(engine, cond_inputs=model.cond,
                                 weights=dict(net.named_parameters()) if targets else None)
