"""Peer implementations for parity tests, loaded without their heavy package imports.

k-diffusion's package ``__init__`` imports torchvision and scikit-image (and installing it
normally pulls torchvision, which replaces the CPU torch), so we install it with ``--no-deps``
and load ``k_diffusion/sampling.py`` alone; the one helper it needs from its package,
``utils.append_dims``, is given by a stand-in module.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import torch


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions until x has target_dims dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load_k_diffusion_sampling():
    """Return k-diffusion's ``sampling`` module, or None when k-diffusion is not installed."""
    if "_kdiff_peer.sampling" in sys.modules:
        return sys.modules["_kdiff_peer.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        import torchsde  # noqa: F401  (imported by sampling.py)
        import torchdiffeq  # noqa: F401
    except ImportError:
        return None
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("_kdiff_peer")
    pkg.__path__ = [root]
    utils = types.ModuleType("_kdiff_peer.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules["_kdiff_peer"], sys.modules["_kdiff_peer.utils"] = pkg, utils
    sspec = importlib.util.spec_from_file_location("_kdiff_peer.sampling", f"{root}/sampling.py")
    mod = importlib.util.module_from_spec(sspec)
    sys.modules["_kdiff_peer.sampling"] = mod
    sspec.loader.exec_module(mod)
    return mod


def k_denoiser(denoiser):
    """Adapt ``denoiser(x, sigma (B,1,..))`` to k-diffusion's ``model(x, sigma (B,))``."""
    return lambda x, sigma, **kw: denoiser(x, sigma.reshape((-1,) + (1,) * (x.ndim - 1)))
