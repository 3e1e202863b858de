"""Backends: what runs the network F, behind one protocol (``base.py``) and one registry.

=============  =========================================  ================================================
name           constructor (what ``make_backend`` takes)  what ``resolve_backend`` builds from a ``Model``
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
from .module import TorchBackend, torch_bf16, torch_compile
from .ort import OnnxRuntimeBackend
from .ov import OpenVinoBackend
from .trt import TensorRTBackend, tensorrt_available

__all__ = ["Backend", "BACKENDS", "make_backend", "resolve_backend", "check_backend_args", "TorchBackend",
           "OnnxRuntimeBackend", "TensorRTBackend", "OpenVinoBackend", "CallableBackend", "calibration_inputs"]

BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend,
    "torch-compile": torch_compile,
    "torch-bf16": torch_bf16,
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
    "openvino": OpenVinoBackend,
    "openvino-bf16": lambda path, **options: OpenVinoBackend(path, precision="bf16", **options),
    "openvino-int8": lambda path, **options: OpenVinoBackend(path, precision="int8", **options),
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
    """(name, backend) for ``model`` on ``device``: "auto", "auto-bf16" or a name in ``BACKENDS`` (table above).

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
    net = model.network
    is_module = isinstance(net, torch.nn.Module)
    if name == "custom" or (name in ("torch", "torch-compile") and not is_module):
        return "custom", CallableBackend(net, cond_inputs=model.cond)
    if name in ("torch", "torch-compile", "torch-bf16"):
        return name, make_backend(name, net.to(device), cond_inputs=model.cond)
    if not is_module:
        raise ValueError(f"backend {name!r} exports the network to ONNX: it must be a torch.nn.Module")
    if name == "tensorrt" and not tensorrt_available():  # said before minutes of export, not after
        raise ValueError("backend 'tensorrt' needs TensorRT and a CUDA GPU (pip install tensorrt on a machine with an "
                         "NVIDIA GPU); use 'onnxruntime' or 'torch' here")
    from .onnx_cache import cached_onnx, cached_onnx_file

    if name.startswith("openvino"):
        if device.type != "cpu":
            raise ValueError(f"backend {name!r} runs on the CPU; the device is {device}")
        options = {}
        if name == "openvino-int8":  # calibrated on the model's own trajectories, run only when no blob is cached
            from .calibrate import calibration_recipe

            if any(c.name != "class_labels" for c in model.cond):
                raise ValueError("backend 'openvino-int8' calibrates on sampling trajectories it runs itself, which "
                                 f"needs inputs it cannot make up ({[c.name for c in model.cond]}): build "
                                 "OpenVinoBackend(path, precision='int8', calibration=edmrt.backends."
                                 "calibration_inputs(model, cond=...)) with real ones")
            options = dict(calibration=lambda: calibration_inputs(model), calibration_key=calibration_recipe(model))
        # The file alone (no ONNX Runtime session), checked by its sha256, which OpenVINO's blob cache reuses
        path, digest = cached_onnx_file(model, device, weights=weights() if weights is not None else None)
        return name, make_backend(name, path, cond_inputs=model.cond, file_sha256=digest, **options)
    adapters = getattr(model, "adapters", None)
    targets = tuple(adapters.targets) if adapters is not None else ()
    path, session = cached_onnx(model, device, weight_inputs=targets if name == "onnxruntime" else (),
                                weights=weights() if weights is not None else None)
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
