"""Peer samplers (k-diffusion, diffusers) run on the same denoiser and the same initial state.

Used by the parity tests and by ``edmrt quality --peers``.  Nothing here is imported by the
sampling path; every peer import is lazy and a missing peer is reported, never faked.

Conventions (measured, docs/ARCHITECTURE.md "Peers"): k-diffusion works in EDM's state x with
sigma-space schedules (we give it our float64 sigmas).  diffusers' multistep schedulers on
Karras sigmas keep the VP state x / sqrt(sigma^2 + 1) and take ``prediction_type="sample"``
(the model returns D); its EDM schedulers keep EDM's state and rebuild D = c_skip x + c_out F
from an "epsilon" output F, so we hand them F = (D - c_skip x) / c_out.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..precond import EDMPrecond
from ..schedules import karras

__all__ = ["load_k_diffusion_sampling", "k_denoiser", "PEERS", "Peer", "available_peers"]


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions until x has target_dims dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module, loaded alone, or None when k-diffusion is not installed.

    Its package ``__init__`` imports torchvision and scikit-image (and a normal install pulls
    torchvision, which replaces a CPU torch), so it is installed with ``--no-deps`` and only
    ``k_diffusion/sampling.py`` is loaded; the one helper it takes from its package,
    ``utils.append_dims``, comes from a stand-in module.
    """
    if "_kdiff_peer.sampling" in sys.modules:
        return sys.modules["_kdiff_peer.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for dep in ("torchsde", "torchdiffeq", "scipy", "tqdm"):
        if importlib.util.find_spec(dep) is None:
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
    """Adapt ``denoiser(x, sigma (B, 1, ..))`` to k-diffusion's ``model(x, sigma (B,))``."""
    return lambda x, sigma, **kw: denoiser(x, sigma.reshape((-1,) + (1,) * (x.ndim - 1)))


# ----------------------------------------------------------------------------- the peers

@dataclass(frozen=True)
class Peer:
    """A peer sampler: ``run(denoiser, x_init, nfe, sigma_min, sigma_max, rho) -> x`` for the largest
    step count whose NFE is at most ``nfe``; ``steps_for(nfe)`` gives that count (None: unreachable)."""

    name: str
    library: str
    nfe_per_step: Callable[[int], int]
    runner: Callable

    def steps_for(self, nfe: int) -> int | None:
        best = None
        for n in range(1, nfe + 1):
            if self.nfe_per_step(n) <= nfe:
                best = n
        return best

    def run(self, denoiser, x_init: torch.Tensor, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
            rho: float = 7.0) -> tuple[torch.Tensor, int]:
        n = self.steps_for(nfe)
        if n is None:
            raise ValueError(f"peer {self.name} cannot run at NFE {nfe}")
        return self.runner(denoiser, x_init, n, sigma_min, sigma_max, rho), self.nfe_per_step(n)


def _k(name: str, **kw):
    def run(den, x_init, n, sigma_min, sigma_max, rho):
        K = load_k_diffusion_sampling()
        sig = torch.from_numpy(karras(n, sigma_min, sigma_max, rho)).to(x_init.device, x_init.dtype)
        with torch.no_grad():
            return getattr(K, name)(k_denoiser(den), x_init.clone(), sig, disable=True, **kw)
    return run


def _k_dpm_fast(den, x_init, n, sigma_min, sigma_max, rho):
    """k-diffusion's DPM-Solver (Lu et al. 2022) singlestep with orders 3, 3, ..., spending exactly n NFE."""
    K = load_k_diffusion_sampling()
    with torch.no_grad():
        return K.sample_dpm_fast(k_denoiser(den), x_init.clone() * 1.0, sigma_min, sigma_max, n, disable=True)


def _diffusers(cls_name: str, edm_state: bool, **config):
    def run(den, x_init, n, sigma_min, sigma_max, rho):
        mod = importlib.import_module("diffusers")
        cls = getattr(mod, cls_name)
        if edm_state:
            sched = cls(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, **config)
        else:
            sched = cls(num_train_timesteps=1000, use_karras_sigmas=True, final_sigmas_type="zero",
                        prediction_type="sample", **config)
            sched.register_to_config(sigma_min=sigma_min, sigma_max=sigma_max)  # honoured only this way
        sched.set_timesteps(n)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        sigmas = sched.sigmas.double()
        pre = EDMPrecond(sched.config.get("sigma_data", 0.5))
        s0 = float(sigmas[0])
        x = x_init.clone() if edm_state else x_init / math.sqrt(s0 ** 2 + 1)
        bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                s = float(sigmas[i])
                x_edm = x if edm_state else x * math.sqrt(s ** 2 + 1)
                D = den(x_edm.to(x_init.dtype), torch.full(bshape, s, dtype=x_init.dtype, device=x.device))
                if edm_state:  # F such that the scheduler's c_skip x + c_out F is D
                    c_skip, c_out, _, _ = (float(c[0]) for c in pre.coefficients(np.array([s])))
                    out = (D - c_skip * x_edm) / c_out
                else:
                    out = D
                x = sched.step(out.to(x.dtype), t, x).prev_sample
        return x.to(x_init.dtype)  # at sigma = 0 the VP and EDM states coincide
    return run


# Not included: diffusers' DEISMultistepScheduler has no final_sigmas_type="zero" (it stops at the
# training sigma_min, a different endpoint); its Heun/KDPM2 discrete schedulers duplicate k-diffusion's.
_one = lambda n: n          # noqa: E731  one evaluation per step
_two = lambda n: 2 * n - 1  # noqa: E731  Heun-type, Euler on the last step to sigma = 0

PEERS: dict[str, Peer] = {p.name: p for p in [
    Peer("k-diffusion:euler", "k-diffusion", _one, _k("sample_euler")),
    Peer("k-diffusion:heun", "k-diffusion", _two, _k("sample_heun")),
    Peer("k-diffusion:dpm_2", "k-diffusion", _two, _k("sample_dpm_2")),
    Peer("k-diffusion:lms", "k-diffusion", _one, _k("sample_lms")),
    Peer("k-diffusion:dpmpp_2m", "k-diffusion", _one, _k("sample_dpmpp_2m")),
    Peer("k-diffusion:dpmpp_3m_sde(eta=0)", "k-diffusion", _one, _k("sample_dpmpp_3m_sde", eta=0.0)),
    Peer("k-diffusion:dpm_fast", "k-diffusion", _one, _k_dpm_fast),
    Peer("diffusers:EDMEuler", "diffusers", _one, _diffusers("EDMEulerScheduler", True)),
    Peer("diffusers:EDMDPMSolver(2)", "diffusers", _one,
         _diffusers("EDMDPMSolverMultistepScheduler", True, solver_order=2)),
    Peer("diffusers:EDMDPMSolver(3)", "diffusers", _one,
         _diffusers("EDMDPMSolverMultistepScheduler", True, solver_order=3)),
    Peer("diffusers:DPMSolverMultistep(3)", "diffusers", _one,
         _diffusers("DPMSolverMultistepScheduler", False, solver_order=3)),
    Peer("diffusers:UniPC(bh2,3)", "diffusers", _one,
         _diffusers("UniPCMultistepScheduler", False, solver_order=3, solver_type="bh2")),
    Peer("diffusers:UniPC(bh2,2)", "diffusers", _one,
         _diffusers("UniPCMultistepScheduler", False, solver_order=2, solver_type="bh2")),
    Peer("diffusers:DPMSolverSinglestep(3)", "diffusers", _one,
         _diffusers("DPMSolverSinglestepScheduler", False, solver_order=3)),
]}


def available_peers() -> dict[str, Peer]:
    """The peers whose library is installed here."""
    have = {"k-diffusion": load_k_diffusion_sampling() is not None,
            "diffusers": importlib.util.find_spec("diffusers") is not None}
    return {k: p for k, p in PEERS.items() if have[p.library]}
