"""The ONNX cache: a torch model's network exported once to ONNX, keyed by its weights, verified on every load.

``$EDMRT_CACHE/onnx/<key>-<dtype>.onnx`` (default ``~/.cache/edmrt``); the key is a sha256 of the network's
tensors, its class and config, the sample shape, the classes, the precision and the torch version.  A cached
file that fails ``load_onnx_session``'s checks (truncated, corrupt, wrong signature) is exported again, never
trusted.  The exporter is imported only here, and only to build a missing or unusable file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ..model import Model
from .ort import load_onnx_session

__all__ = ["onnx_cache_root", "onnx_cache_path", "cached_onnx"]

log = logging.getLogger("edmrt.backends")


def onnx_cache_root() -> Path:
    return Path(os.environ.get("EDMRT_CACHE", Path.home() / ".cache" / "edmrt")) / "onnx"


def onnx_cache_path(model: Model, dtype: str = "fp32") -> Path:
    """Where ``model``'s network is exported for ONNX Runtime / TensorRT (the key in the module docstring)."""
    net = model.network
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((type(net).__name__, getattr(net, "config", None), model.sample_shape, model.num_classes, dtype,
                   torch.__version__)).encode())
    return onnx_cache_root() / f"{h.hexdigest()[:32]}-{dtype}.onnx"


def cached_onnx(model: Model, device: torch.device):
    """(path, session or None): the model's cached ONNX file, loaded and checked when it is usable; otherwise
    exported again (from the CPU, the network then returned to ``device``) and the session left to the caller."""
    if not isinstance(model.network, torch.nn.Module):
        raise ValueError("exporting to ONNX needs the network to be a torch.nn.Module")
    path = onnx_cache_path(model)
    if path.exists():
        try:
            return path, load_onnx_session(path, conditional=model.num_classes > 0)
        except ValueError as exc:
            log.warning("cached ONNX file %s is unusable (%s): exporting again", path, exc)
    from edmrt.export.onnx import export_onnx

    log.warning("exporting the network to ONNX (once; cached at %s)", path)
    export_onnx(model.network.cpu().eval(), path, sample_shape=model.sample_shape, num_classes=model.num_classes)
    model.network.to(device)
    return path, None
