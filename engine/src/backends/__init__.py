"""Backends: what runs the network F, behind one protocol (``base.py``) and one registry.

Every entry of ``BACKENDS`` builds a backend two ways: ``BACKENDS[name](source, **options)`` from what it runs (a
module, a file, a callable), and ``BACKENDS[name].from_model(model, device, **options)`` from an ``edmrt.Model``
(``resolve_backend`` is that lookup):

=============  =========================================  ================================================
name           constructor (what ``make_backend`` takes)  what ``from_model`` builds from a ``Model``
=============  =========================================  ================================================
torch          ``TorchBackend(net)``                      the network, moved to the device
torch-compile  ``TorchBackend(net, compile=True)``        the same, compiled at the first call
torch-bf16     ``TorchBackend(net, autocast=bfloat16)``   the same under torch's autocast to bfloat16
onnxruntime    ``OnnxRuntimeBackend(path | session)``     the network exported once (``onnx_cache.py``)
tensorrt       ``TensorRTBackend(engine_path)``           that ONNX file built into a cached engine
openvino       ``OpenVinoBackend(path)``                  that ONNX file compiled by OpenVINO for the CPU (fp32)
openvino-bf16  ``OpenVinoBackend(path, precision="bf16")``  the same in bfloat16 (CPUs with AVX512_BF16 / AMX)
openvino-int8  ``OpenVinoBackend(path, precision="int8",  the same quantised to int8 by NNCF, calibrated on the
               calibration=...)``                         model's own sampling trajectories (``calibrate.py``)
custom         ``CallableBackend(fn)``                    a network that is a plain callable
=============  =========================================  ================================================

Adapter swaps (``Sampler.set_adapters``) are a capability of the backend: ``shares_weights`` (it runs the module's
own parameters, which the swap rewrites in place) or ``update_weights(fused)`` (it holds a copy, bound to the
parameters or refitted); a backend with neither is refused.

"auto" on the CPU measures (``auto.py``): at the first call with each batch size it times torch eager, ONNX Runtime
and OpenVINO (those installed) on that call's inputs and keeps the fastest whose F is within 1e-4 (relative RMS) of
torch's; "auto-bf16" also tries torch's bf16 autocast and OpenVINO in bfloat16, within 5e-2.  The choice is cached on disk;
``EDMRT_AUTO_BACKEND`` pins it.  A model with adapters (weights swapped in place) gets ONNX Runtime, a network that
is not a torch module "custom", and CUDA torch eager (TensorRT is unverified).  Only ``torch`` and this
package's own modules are imported by ``import edmrt``; onnx, onnxruntime and tensorrt where used.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch

from ..model import Model
from .base import Backend, check_backend_args
from .calibrate import calibration_inputs
from .custom import CallableBackend
from .module import TorchBackend
from .ort import OnnxRuntimeBackend
from .ov import OpenVinoBackend
from .trt import TensorRTBackend

__all__ = ["Backend", "BACKENDS", "make_backend", "resolve_backend", "check_backend_args", "TorchBackend",
           "OnnxRuntimeBackend", "TensorRTBackend", "OpenVinoBackend", "CallableBackend", "calibration_inputs"]

class _Variant:
    """A registry entry that is a backend class with options fixed: ``entry(source, **options)`` and
    ``entry.from_model(model, device, **options)`` pass them on."""

    def __init__(self, cls, **fixed):
        self.cls, self.fixed = cls, fixed

    def __call__(self, source, **options) -> Backend:
        return self.cls(source, **self.fixed, **options)

    def from_model(self, model: Model, device: torch.device, **options) -> Backend:
        return self.cls.from_model(model, device, **self.fixed, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend,
    "torch-compile": _Variant(TorchBackend, compile=True),
    "torch-bf16": _Variant(TorchBackend, autocast=torch.bfloat16),
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
    "openvino": OpenVinoBackend,
    "openvino-bf16": _Variant(OpenVinoBackend, precision="bf16"),
    "openvino-int8": _Variant(OpenVinoBackend, precision="int8"),
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


def _measured_auto(mode: str, model: Model, device: torch.device):
    """An AutoBackend over the backends installed here, or None where "auto" does not measure (not the CPU, not a
    torch module, a model with adapters, or no exporter)."""
    from .auto import AutoBackend
    from ..onnx_contract import weights_sha256

    if (device.type != "cpu" or not isinstance(model.network, torch.nn.Module)
            or getattr(model, "adapters", None) is not None or not importlib.util.find_spec("onnx")):
        return None
    names = ["torch"]
    if importlib.util.find_spec("onnxruntime"):
        names.append("onnxruntime")
    if mode == "auto-bf16":
        names.append("torch-bf16")
    if importlib.util.find_spec("openvino"):
        names.append("openvino")
        if mode == "auto-bf16":
            from .ov import bf16_supported

            if bf16_supported():
                names.append("openvino-bf16")
    # The weights are hashed once, for the choice's key and every candidate's ONNX cache entry (seconds for SD).
    digest = functools.cache(lambda: weights_sha256(model.network))
    auto = AutoBackend(lambda n: resolve_backend(n, model, device, weights=digest)[1], names, mode, digest)
    auto.prepare()
    return auto


def resolve_backend(name: str, model: Model, device: torch.device, weights=None) -> tuple[str, Backend]:
    """(name, backend) for ``model`` on ``device``: "auto", "auto-bf16", or ``BACKENDS[name].from_model`` (table above).

    A network that is not a torch module runs as "custom" under "torch" too (as before exports existed);
    "onnxruntime" and "tensorrt" need a torch module, exported once into the ONNX cache.  ``weights``: a callable
    returning the network's ``weights_sha256`` (memoised by the caller), for the ONNX cache's lookup."""
    if name not in ("auto", "auto-bf16") and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'auto-bf16' or one of {sorted(BACKENDS)}")
    if name in ("auto", "auto-bf16"):
        auto = _measured_auto(name, model, device)
        if auto is not None:
            return name, auto
        name = _auto(model, device)
    backend = BACKENDS[name].from_model(model, device, digest=weights)
    return backend.name, backend
