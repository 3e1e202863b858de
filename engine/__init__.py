"""edmrt: a sampling engine for diffusion models in the EDM formulation (Karras et al. 2022).

A sampler is a float64 coefficient plan built once (``edmrt.plan``); one loop executes every
plan (``edmrt.solve``, the reference executor ``edmrt.execute``).
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch

from .engine import Engine, Model, Sampler
from .executor import SeededNoise, check_seeds, execute
from .models.bundled import load
from .optimize import OptimizedSchedule, optimize_schedule
from .plan import Plan
from .precond import (ConsistencyPrecond, EDMPrecond, EpsilonPrecond, IDDPMPrecond, Identity, Precond, VEPrecond, VPPrecond,
                      VPredictionPrecond, X0Precond, sigmas_from_alphas_cumprod)
from .schedules import SCHEDULES, given
from .solvers import SOLVERS, build_plan

__version__ = "0.1.0"
__all__ = [
    "plan", "solve", "make_sigmas", "execute", "Plan", "SOLVERS", "SCHEDULES", "SeededNoise", "Engine", "Model",
    "Sampler",
    "Precond", "Identity", "EDMPrecond", "ConsistencyPrecond", "VPPrecond", "VEPrecond", "IDDPMPrecond",
    "EpsilonPrecond", "VPredictionPrecond", "X0Precond", "sigmas_from_alphas_cumprod",
    "optimize_schedule", "OptimizedSchedule", "load",
]


def plan(solver: str, sigmas, precond: Precond | None = None, **options) -> Plan:
    """Build the float64 coefficient plan of ``solver`` on the schedule ``sigmas`` (descending, ending in 0).

    ``precond=None`` means the network is a denoiser D(x; sigma) itself (``Identity``).
    Unknown solver names and options raise ``ValueError`` listing what is known.
    """
    return build_plan(solver, sigmas, precond, **options)


def make_sigmas(schedule, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """Schedule by name (``SCHEDULES``) or an explicit list of sigmas, as ``solve`` reads ``schedule``."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)} or a list of sigmas")
        fn = SCHEDULES[schedule]
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)) if k in params}
        return fn(steps, **kw)
    if isinstance(schedule, (Sequence, np.ndarray, torch.Tensor)):
        return given(steps, np.asarray(schedule.tolist() if isinstance(schedule, torch.Tensor) else schedule,
                                       dtype=np.float64))
    raise ValueError(f"schedule must be a name in {sorted(SCHEDULES)} or a list of sigmas, got {type(schedule).__name__}")


def solve(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, solver: str = "heun",
          steps: int = 18, schedule="karras", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
          seeds=None, executor: str = "auto", **options) -> torch.Tensor:
    """Sample by solving from ``t_0 * noise`` (t_0 = sigma_max for the named schedules) down to sigma = 0.

    ============  ==================================================================================
    denoiser      ``denoiser(x, sigma) -> D(x; sigma)``; ``sigma`` is a tensor of shape (B, 1, ..., 1)
    noise         standard normal, shape (B, ...) of the output; its dtype is the compute dtype
    solver        a name in ``edmrt.SOLVERS``; ``steps`` is EDM's N (Heun, 18 steps = 35 evaluations)
    schedule      a name in ``edmrt.SCHEDULES`` (given sigma_min, sigma_max, rho where it takes them)
                  or an explicit descending list of sigmas (interpolated log-linearly to ``steps``)
    seeds         one int per sample for the stochastic solvers' noise (default: drawn from torch's
                  global generator); a sample's result never depends on the batch it is in
    executor      ``"fused"``: float32 buffers, one fused step per evaluation (Triton on CUDA, C++ on
                  the CPU); ``"reference"``: the plain torch loop in ``noise``'s dtype; ``"auto"``: fused
                  for float32 noise, reference otherwise (float64, float16)
    options       solver options, e.g. ``S_churn=40`` for ``solver="edm"``
    ============  ==================================================================================
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError("noise must be a floating-point torch.Tensor of shape (B, ...) with B >= 1, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite (it contains NaN or Inf)")
    if not callable(denoiser):
        raise ValueError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    sigmas = make_sigmas(schedule, steps, sigma_min, sigma_max, rho)
    p = plan(solver, sigmas, None, **options)
    if executor not in ("auto", "fused", "reference"):
        raise ValueError(f"executor must be 'auto', 'fused' or 'reference', got {executor!r}")
    if executor == "auto":
        executor = "fused" if noise.dtype == torch.float32 else "reference"
    if executor == "fused" and noise.dtype != torch.float32:
        raise ValueError(f"executor 'fused' computes in float32: pass float32 noise (got {noise.dtype}) or "
                         "executor='reference'")
    B = noise.shape[0]
    if p.stochastic and seeds is None:
        seeds = torch.randint(0, 2 ** 63 - 1, (B,), dtype=torch.int64).tolist()
    if seeds is not None:
        seeds = check_seeds(seeds, B)
    x_init = float(sigmas[0]) * noise
    if executor == "fused":
        from .fused import execute_fused
        x = execute_fused(p, denoiser, x_init, None if seeds is None else torch.tensor(seeds, dtype=torch.int64))
    else:
        source = SeededNoise(seeds, noise.shape[1:], noise.dtype, noise.device) if p.stochastic else None
        x = execute(p, denoiser, x_init, source)
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"solve({solver!r}) produced NaN or Inf: check the denoiser's output")
    return x
