"""Schedules fitted to one model: a few-step solver's endpoint error, minimised over its sigmas.

Align Your Steps (Sabour et al. 2024, arXiv 2404.14507) and GITS (Chen et al. 2024, arXiv 2405.11326)
show that at 5-10 network evaluations the time steps matter as much as the solver.  Here, as in
both, the schedule is fitted once per model using nothing but calls to that model:

1. references: ``samples`` initial noises (standard normal from ``seed``) solved from sigma_max to 0
   by the model itself at high NFE (``reference_solver`` on Karras' schedule, ``reference_nfe`` steps);
2. the few-step solver's log-sigmas are fitted by a trust-region least-squares (scipy's ``trf``,
   finite-difference Jacobian) to its endpoint residuals against those references.  t_0 = sigma_max
   stays fixed (``solve`` starts from ``sigma_max * noise``); the N positive sigmas are
   u_i = ln sigma_max - (ln sigma_max - ln sigma_min) sum_{j<=i} w_j with w = softmax(theta), so they
   stay strictly descending inside [sigma_min, sigma_max] (the last weight is the slack below t_{N-1});
3. the loss has several basins (e.g. spending the last evaluation at sigma_min, or using it at
   ~0.1-0.2 with the final multistep step to 0), so the fit starts from several Karras (rho = 7)
   schedules whose last positive sigma is sigma_min (sigma_max / sigma_min)^f for f in ``starts``;
   each start runs ``screen_iter`` iterations, the better half goes on for as many, and so on until one is
   left, which continues to ``max_iter`` iterations in all.  ``candidates`` screens several solvers the
   same way (``FEW_STEP_CANDIDATES``: iPNDM with and without the analytic first step, orders 3 and 4).

The result is a plain list of sigmas for ``edmrt.solve(..., steps=opt.steps, schedule=opt.sigmas)``;
``cost`` counts every network evaluation spent (one sample at one sigma is one evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .executor import execute
from .plan import Plan
from .schedules import check_range, check_sigmas, given, karras
from .solvers import build_plan, get_solver

__all__ = ["OptimizedSchedule", "optimize_schedule", "FEW_STEP_CANDIDATES"]


@dataclass(frozen=True)
class OptimizedSchedule:
    """A schedule fitted to one model, for ``solve(den, noise, solver, steps=steps, schedule=sigmas, **options)``.

    ``sigmas``: N + 1 float64 values, t_0 = sigma_max, strictly descending, ending in 0; ``nfe`` the
    evaluations the solver makes on it.  ``cost``: network evaluations the fit spent, references and every
    optimiser step included (a call on B samples counts B); ``reference_cost`` is the references' part.
    ``loss`` / ``initial_loss``: training RMSE to the references after the fit / on the first start (Karras).
    """

    sigmas: list[float]
    solver: str
    steps: int
    nfe: int
    cost: int
    reference_cost: int
    loss: float
    initial_loss: float
    solves: int
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(sigmas=list(self.sigmas), solver=self.solver, steps=self.steps, nfe=self.nfe, cost=self.cost,
                    reference_cost=self.reference_cost, loss=self.loss, initial_loss=self.initial_loss,
                    solves=self.solves, options=dict(self.options))


class _Counted:
    """The denoiser, counting network evaluations (batch entries)."""

    def __init__(self, denoiser: Callable):
        self.denoiser, self.count = denoiser, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.count += int(x.shape[0])
        return self.denoiser(x, sigma)


def check_int(name: str, v, lo: int) -> int:
    """An integer >= lo (bools refused), else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _steps_for(solver: str, nfe: int, sigma_min: float, sigma_max: float, options: dict) -> tuple[int, int]:
    """The largest N whose plan makes at most ``nfe`` evaluations, and that plan's NFE."""
    best = None
    for n in range(1, nfe + 2):
        try:
            p = build_plan(solver, karras(n, sigma_min, sigma_max), None, **options)
        except ValueError:
            if n == nfe + 1:
                raise
            continue  # e.g. ipndm_afs needs 2 steps; options are checked again on the last n
        if p.nfe <= nfe:
            best = (n, p.nfe)
    if best is None:
        raise ValueError(f"nfe={nfe} is too small for solver {solver!r}: one step makes more evaluations")
    return best


def _sigmas(theta: np.ndarray, sigma_max: float, sigma_min: float) -> np.ndarray:
    """theta (N - 1,) -> N + 1 sigmas: softmax([0, theta]) splits [ln sigma_min, ln sigma_max] into the N - 1 gaps
    between the positive sigmas and the slack below the last one; t_0 = sigma_max exactly."""
    u_max, u_min = math.log(sigma_max), math.log(sigma_min)
    z = np.concatenate([[0.0], theta])
    w = np.exp(z - z.max())
    w /= w.sum()
    u = u_max - (u_max - u_min) * np.cumsum(w[:-1])
    return np.concatenate([[sigma_max], np.clip(np.exp(u), sigma_min, sigma_max), [0.0]])


def _theta(sigmas: np.ndarray, sigma_max: float, sigma_min: float, floor: float = 1e-3) -> np.ndarray:
    """Inverse of ``_sigmas`` (gaps below ``floor`` of the range are raised to it)."""
    u_max, u_min = math.log(sigma_max), math.log(sigma_min)
    u = np.log(sigmas[:-1])
    gaps = np.concatenate([-np.diff(u), [u[-1] - u_min]]) / (u_max - u_min)
    z = np.log(np.maximum(gaps, floor))
    return z[1:] - z[0]


# The low-NFE recipe of benchmarks/low_nfe.py (fixed on mixture seed 0): order 3 with the analytic first step won
# at NFE 5 and 10, order 4 at NFE 20 on validation noise; the training loss picks among them.
FEW_STEP_CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("ipndm", {"order": 3}), ("ipndm", {"order": 4}), ("ipndm_afs", {"order": 3}), ("ipndm_afs", {"order": 4}))


def optimize_schedule(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], solver: str = "ipndm",
                      nfe: int = 5, shape: Sequence[int] = (64,), sigma_min: float = 0.002,
                      sigma_max: float = 80.0, samples: int = 128, seed: int = 0, reference_nfe: int = 400,
                      reference_solver: str = "lms", max_iter: int = 40, starts: Sequence[float] = (0.0, 0.25, 0.4),
                      screen_iter: int = 10, init=None, candidates: Sequence[tuple[str, dict]] | None = None,
                      batch: int = 256, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                      **options) -> OptimizedSchedule:
    """Fit the sigmas of ``solver`` at ``nfe`` evaluations to ``denoiser``, using only calls to it.

    ===============  ==============================================================================
    denoiser         ``denoiser(x, sigma) -> D(x; sigma)`` as for ``edmrt.solve``
    solver, nfe      a deterministic solver and its budget; N is the largest step count whose plan makes
                     at most ``nfe`` evaluations
    shape            one sample's shape; training noise is (samples, *shape), standard normal from ``seed``
    sigma_min/max    t_0 = sigma_max; every positive sigma stays in [sigma_min, sigma_max]
    reference_*      the reference solve: ``reference_solver`` with ``reference_nfe`` steps on Karras rho = 7
    max_iter         least-squares iterations of the start kept (each costs about N few-step solves)
    starts           fractions f: one start per Karras schedule ending at sigma_min (sigma_max/sigma_min)^f
    screen_iter      iterations per round of successive halving over the starts (lowest training loss wins)
    init             a schedule (list of sigmas) to start from instead of ``starts``
    candidates       (solver, options) pairs to screen together instead of ``solver`` and ``options``
                     (e.g. ``FEW_STEP_CANDIDATES``); the result names the one kept
    batch            at most this many samples per network call
    dtype, device    of the noise (the denoiser's compute dtype); residuals are taken in float64
    options          the solver's options (e.g. ``order=3`` for ``ipndm``)
    ===============  ==============================================================================
    """
    if not callable(denoiser):
        raise ValueError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    candidates = _check_candidates(solver, options, candidates)
    get_solver(reference_solver)
    nfe, samples, seed = check_int("nfe", nfe, 1), check_int("samples", samples, 1), check_int("seed", seed, 0)
    reference_nfe = check_int("reference_nfe", reference_nfe, 2)
    max_iter, screen_iter = check_int("max_iter", max_iter, 0), check_int("screen_iter", screen_iter, 0)
    batch = check_int("batch", batch, 1)
    shape = check_shape(shape)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    sigma_min, sigma_max = check_range(sigma_min, sigma_max)
    jobs = _jobs(candidates, nfe, sigma_min, sigma_max, init, starts)

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples,) + shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    fit = _Fit(denoiser, sigma_max * noise, batch, sigma_min, sigma_max,
               build_plan(reference_solver, karras(reference_nfe, sigma_min, sigma_max), None),
               # Finite-difference step in theta: well above the denoiser's rounding (float32 models need larger).
               diff_step=1e-6 if dtype == torch.float64 else 1e-3)
    initial_loss = math.sqrt(fit(jobs[0], jobs[0].theta0, 0)[1])
    # Successive halving: every job runs screen_iter iterations, the better half goes on, until one is left.
    pool, done = [(job, job.theta0) for job in jobs], 0
    while len(pool) > 1:
        ranked = sorted(((job,) + fit(job, theta, screen_iter) for job, theta in pool), key=lambda r: r[2])
        pool, done = [(job, theta) for job, theta, _ in ranked[:len(ranked) // 2]], done + screen_iter
    job, theta = pool[0]
    theta, mse = fit(job, theta, max(max_iter - done, 0))
    sig = check_sigmas(_sigmas(theta, sigma_max, sigma_min))
    return OptimizedSchedule(sigmas=[float(v) for v in sig], solver=job.solver, steps=job.steps, nfe=job.nfe,
                             cost=fit.net.count, reference_cost=fit.reference_cost, loss=math.sqrt(mse),
                             initial_loss=initial_loss, solves=fit.solves, options=dict(job.options))


def _check_candidates(solver: str, options: dict, candidates) -> list[tuple[str, dict]]:
    if candidates is None:
        return [(solver, options)]
    if options:
        raise ValueError(f"pass solver options inside candidates, not as keywords, got {sorted(options)}")
    try:
        candidates = [(str(c[0]), dict(c[1])) for c in candidates]
    except (TypeError, ValueError, IndexError, KeyError):
        raise ValueError(f"candidates must be a sequence of (solver, options) pairs, got {candidates!r}") from None
    if not candidates:
        raise ValueError("candidates must hold at least one (solver, options) pair")
    return candidates


def check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
    return shape


@dataclass(frozen=True)
class _Job:
    """One start of the fit: a candidate solver with its options, its step count and NFE, and the first theta."""

    solver: str
    options: dict
    steps: int
    nfe: int
    theta0: np.ndarray


def _jobs(candidates, nfe: int, sigma_min: float, sigma_max: float, init, starts) -> list[_Job]:
    """One job per (candidate, start): Karras schedules ending at sigma_min (sigma_max / sigma_min)^f, or ``init``."""
    u_max, u_min = math.log(sigma_max), math.log(sigma_min)
    if init is None:
        try:
            fs = [float(f) for f in starts]
        except (TypeError, ValueError):
            raise ValueError(f"starts must be a sequence of fractions in [0, 1), got {starts!r}") from None
        if not fs or any(not 0.0 <= f < 1.0 for f in fs):
            raise ValueError(f"starts must be a non-empty sequence of fractions in [0, 1), got {starts!r}")
    jobs = []
    for name, opts in candidates:
        get_solver(name)
        steps, used = _steps_for(name, nfe, sigma_min, sigma_max, opts)
        if build_plan(name, karras(steps, sigma_min, sigma_max), None, **opts).stochastic:
            raise ValueError(f"solver must be deterministic to fit a schedule, got {name!r} with options {opts}")
        if init is not None:
            s = given(steps, np.asarray(init, dtype=np.float64))
            if s[0] != sigma_max or s[-2] < sigma_min:
                raise ValueError(f"init must start at sigma_max={sigma_max} and stay >= sigma_min={sigma_min}, "
                                 f"got {s.tolist()}")
            inits = [s]
        else:
            inits = [karras(steps, math.exp(u_min + f * (u_max - u_min)), sigma_max) for f in fs]
        jobs += [_Job(name, opts, steps, used, _theta(s, sigma_max, sigma_min)) for s in inits]
    return jobs


class _Fit:
    """The references (``reference`` solved by the model itself) and the least-squares fit of a job against them;
    counts network evaluations (``net.count``) and few-step solves (``solves``)."""

    def __init__(self, denoiser, x_init: torch.Tensor, batch: int, sigma_min: float, sigma_max: float,
                 reference: Plan, diff_step: float):
        self.net = _Counted(denoiser)
        self.x_init, self.sigma_min, self.sigma_max, self.diff_step = x_init, sigma_min, sigma_max, diff_step
        self.chunks = [slice(i, i + batch) for i in range(0, x_init.shape[0], batch)]
        self.x_ref = self.run(reference)
        self.reference_cost = self.net.count
        if not bool(torch.isfinite(self.x_ref).all()):
            raise FloatingPointError("the reference solve produced NaN or Inf: check the denoiser")
        self.scale = 1.0 / math.sqrt(self.x_ref.numel())
        self.bad = np.full(self.x_ref.numel(), 1e3 * self.scale)
        self.solves = 0

    def run(self, p: Plan) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([execute(p, self.net, self.x_init[c]) for c in self.chunks]).double()

    def residuals(self, job: _Job, theta: np.ndarray) -> np.ndarray:
        """Endpoint error / sqrt(samples * size): its squared norm is the MSE."""
        self.solves += 1
        try:
            p = build_plan(job.solver, _sigmas(theta, self.sigma_max, self.sigma_min), None, **job.options)
        except ValueError:  # two sigmas merged at float precision
            return self.bad
        r = ((self.run(p) - self.x_ref) * self.scale).reshape(-1).cpu().numpy()
        return r if np.all(np.isfinite(r)) else self.bad

    def __call__(self, job: _Job, theta0: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
        """Least squares from theta0; returns theta and the training MSE."""
        from scipy.optimize import least_squares

        if theta0.size == 0 or iters == 0:
            r = self.residuals(job, theta0)
            return theta0, float(r @ r)
        res = least_squares(lambda theta: self.residuals(job, theta), theta0, method="trf", diff_step=self.diff_step,
                            max_nfev=iters, x_scale=1.0, ftol=1e-3, xtol=1e-10, gtol=1e-10)
        return res.x, 2.0 * float(res.cost)
