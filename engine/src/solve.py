"""``edmrt.solve``: sample with any denoiser callable D(x; sigma), through the engine or the reference loop."""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Callable

import torch

from .backends import CallableBackend
from .checks import check_seeds, check_signature
from .executor import SeededNoise, execute
from .plan import Plan
from .engine import Engine
from .schedules import make_sigmas
from .solvers import build_plan

__all__ = ["solve", "execute_fused"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_noise(noise) -> None:
    if (not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1 or noise.shape[0] < 1
            or noise.numel() == 0):
        raise ValueError("noise must be a floating-point torch.Tensor of shape (B, ...) with B >= 1 samples of at least "
                         "one element, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.device.type not in ("cpu", "cuda"):
        raise ValueError(f"noise must be on the CPU or a CUDA device, got {noise.device}")
    # Values (finite, and t_0 * noise finite): _check_noise_values, once t_0 is known.


def solve(denoiser: Denoiser, noise: torch.Tensor, solver: str = "heun", steps: int = 18, schedule="karras",
          sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, seeds=None, executor: str = "auto",
          plan: Plan | None = None, **options) -> torch.Tensor:
    """Sample by solving from ``t_0 * noise`` (t_0 = sigma_max for the named schedules) down to sigma = 0.

    ============  ==================================================================================
    denoiser      ``denoiser(x, sigma) -> D(x; sigma)``; ``sigma`` is a tensor of shape (B, 1, ..., 1)
    noise         standard normal, shape (B, ...) of the output; its dtype is the compute dtype
    solver        a name in ``edmrt.SOLVERS``; ``steps`` is EDM's N (Heun, 18 steps = 35 evaluations)
    schedule      a name in ``edmrt.SCHEDULES`` (given sigma_min, sigma_max, rho where it takes them)
                  or an explicit descending list of sigmas (interpolated log-linearly to ``steps``)
    seeds         one int per sample for the stochastic solvers' noise (default: drawn from torch's
                  global generator); a sample's result never depends on the batch it is in
    executor      ``"fused"``: the engine (float32 buffers, one fused step per evaluation: Triton on
                  CUDA, C++ on the CPU); ``"reference"``: the plain torch loop in ``noise``'s dtype;
                  ``"auto"``: fused for float32 noise, reference otherwise (float64, float16)
    options       solver options, e.g. ``S_churn=40`` for ``solver="edm"``
    plan          a ``Plan`` for the identity preconditioning instead of solver, steps, schedule and
                  options (a learned solver's ``solve_kwargs``, ``Plan.load``); it starts at its first level
    ============  ==================================================================================
    """
    _check_noise(noise)
    check_signature(denoiser, "denoiser", "denoiser(x, sigma)", 2)
    if plan is None:
        sigmas, p, plan_key = _plan(solver, steps, schedule, sigma_min, sigma_max, rho, options)
    else:
        sigmas, p, plan_key = _given_plan(plan, options)
        solver = p.solver
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
    t0 = float(sigmas[0])
    _check_noise_values(noise, t0)
    if executor == "fused":  # the engine checks its result (FloatingPointError naming the first bad stage)
        seeds = None if seeds is None else torch.tensor(seeds, dtype=torch.int64)
        if plan_key is not None and noise.numel() <= CACHED_ENGINE_MAX_ELEMENTS:
            # t_0 * noise is computed into the cached engine's buffer: no full-size temporary per call
            return _cached_engine_run(plan_key, p, denoiser, noise, t0, seeds)
        return execute_fused(p, denoiser, t0 * noise, seeds)
    x_init = t0 * noise
    source = SeededNoise(seeds, noise.shape[1:], noise.dtype, noise.device) if p.stochastic else None
    x = execute(p, denoiser, x_init, source)
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"solve({solver!r}) produced NaN or Inf: check the denoiser's output")
    return x


def _given_plan(plan, options: dict):
    """(sigmas, plan, None) for a Plan given whole: built for the identity preconditioning (the denoiser returns D),
    with no solver options beside it."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an edmrt Plan (edmrt.plan(...), Plan.load(...)), got {type(plan).__name__}")
    if options:
        raise ValueError(f"plan is the whole solver: pass it without the solver options {sorted(options)}")
    if plan.precond.get("name") != "identity":
        raise ValueError(f"plan must be built for the identity preconditioning (solve's denoiser returns D), got "
                         f"{plan.precond}: run a model's plan with Sampler(model, plan=plan)")
    return plan.sigmas, plan, None


def _check_noise_values(noise: torch.Tensor, t0: float) -> None:
    """ValueError unless noise is finite and t_0 * noise is finite in noise's dtype: one pass (NaN and Inf show in
    the extremes)."""
    lo, hi = (float(v) for v in torch.aminmax(noise.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("noise must be finite (it contains NaN or Inf)")
    if t0 * max(-lo, hi) > float(torch.finfo(noise.dtype).max):
        raise ValueError(f"noise times t_0 = {t0:g} overflows {noise.dtype}: noise must be standard normal")


_PLANS: OrderedDict = OrderedDict()   # (solver, steps, schedule, sigma range, rho, options) -> (sigmas, plan)
_PLANS_LOCK = threading.Lock()
MAX_PLANS = 32


def _plan(solver, steps, schedule, sigma_min, sigma_max, rho, options: dict):
    """(sigmas, plan, key), from a small cache when every argument is hashable (a named schedule, scalar options;
    key None otherwise): plans are immutable, and building one costs about a millisecond, more than a step of a
    small state."""
    try:
        key = (solver, steps, schedule, sigma_min, sigma_max, rho, tuple(sorted(options.items())))
        hash(key)
    except TypeError:   # an explicit schedule (a list) or an unhashable option: built every time
        key = None
    if key is not None:
        with _PLANS_LOCK:
            if key in _PLANS:
                _PLANS.move_to_end(key)
                return (*_PLANS[key], key)
    sigmas = make_sigmas(schedule, steps, sigma_min, sigma_max, rho)
    sigmas.setflags(write=False)
    built = sigmas, build_plan(solver, sigmas, None, **options)
    if key is not None:
        with _PLANS_LOCK:
            _PLANS[key] = built
            while len(_PLANS) > MAX_PLANS:
                _PLANS.popitem(last=False)
    return (*built, key)


# Engines kept between solve() calls for (plan, batch, shape, device), states up to CACHED_ENGINE_MAX_ELEMENTS: an
# engine's buffers, table and validated step cost ~1 ms to build, ten steps of a (64, 3, 32, 32) state.  The
# denoiser differs per call, so the engine's backend reads the calling thread's (an engine runs one call at a time,
# under its lock, in the caller's thread).
_ENGINES: OrderedDict = OrderedDict()
MAX_ENGINES = 4
CACHED_ENGINE_MAX_ELEMENTS = 1 << 22


class _CallersDenoiser:
    """``fn(x_in, c_noise)`` of the thread that is running the engine."""

    def __init__(self):
        self.local = threading.local()

    def __call__(self, x_in, c_noise):
        return self.local.fn(x_in, c_noise)


def _cached_engine_run(plan_key, plan: Plan, denoiser: Denoiser, noise: torch.Tensor, t0: float, seeds):
    """``plan`` from t0 * noise on the engine cached for (plan, shape, device)."""
    B, dev = noise.shape[0], noise.device
    key = (plan_key, tuple(noise.shape), str(dev))
    with _PLANS_LOCK:
        entry = _ENGINES.get(key)
        if entry is not None:
            _ENGINES.move_to_end(key)
    if entry is None:
        caller = _CallersDenoiser()
        engine = Engine(CallableBackend(caller, pass_through=True), plan, B, noise.shape[1:], dev, graph=False,
                        cond_inputs=())
        entry = (engine, caller)
        with _PLANS_LOCK:
            entry = _ENGINES.setdefault(key, entry)
            while len(_ENGINES) > MAX_ENGINES:
                _ENGINES.popitem(last=False)
    engine, caller = entry
    sigma = engine.sigma_in.view((B,) + (1,) * (noise.ndim - 1))  # the engine's c_noise buffer, viewed once
    caller.local.fn = lambda x_in, c_noise: denoiser(x_in, sigma if c_noise is engine.sigma_in
                                                     else c_noise.view(sigma.shape))
    if seeds is None:
        seeds = torch.zeros(B, dtype=torch.int64)
    try:
        return engine.run(seeds.to(device=dev, dtype=torch.int64), x_init=noise.contiguous(), x_init_scale=t0)
    finally:
        caller.local.fn = None


def execute_fused(plan: Plan, denoiser: Denoiser, x_init: torch.Tensor, seeds: torch.Tensor | None = None,
                  impl: str = "auto") -> torch.Tensor:
    """Run ``plan`` from ``x_init`` (float32, any device and trailing shape) on an ``Engine`` whose backend is
    ``denoiser(x_in, c_noise (B, 1, ..., 1))``; returns the final state.  No CUDA graph: the callable is arbitrary."""
    if not isinstance(x_init, torch.Tensor) or x_init.dtype != torch.float32 or x_init.ndim < 1:
        raise ValueError("x_init must be a float32 tensor of shape (B, ...) for the fused executor")
    B, dev = x_init.shape[0], x_init.device
    if seeds is None:
        if plan.stochastic:
            raise ValueError(f"plan {plan.solver!r} is stochastic (noise scales > 0): pass seeds")
        seeds = torch.zeros(B, dtype=torch.int64)
    view = (B,) + (1,) * (x_init.ndim - 1)
    backend = CallableBackend(lambda x_in, c_noise: denoiser(x_in, c_noise.view(view)), pass_through=True)
    engine = Engine(backend, plan, B, x_init.shape[1:], dev, graph=False, impl=impl, cond_inputs=())
    return engine.run(seeds.to(device=dev, dtype=torch.int64), x_init=x_init.contiguous())
