"""Solvers: pure host functions ``solver(sigmas, precond, **options) -> Plan``, built in float64.

Each solver is written in the paper's symbols; every decision that k-diffusion or
diffusers make per step inside their loops (churn, the last step to sigma = 0, a
multistep warm-up) is made here, once, as a row of the plan.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np

from .plan import Plan
from .precond import Identity, Precond
from .schedules import check_sigmas

__all__ = ["SOLVERS", "euler", "heun", "edm", "dpmpp_2m", "get_solver", "build_plan", "solver_options"]


class _Builder:
    """Collects stages, then fills in the preconditioning coefficients at each stage's sigma."""

    def __init__(self, solver: str, sigmas: np.ndarray, precond: Precond, K: int, options: dict):
        self.solver, self.sigmas, self.precond, self.K, self.options = solver, sigmas, precond, K, options
        self.rows: list[dict] = []
        self.n_init = 0.0

    def stage(self, *, step: int, sigma: float, alpha: float, beta: float, a: float = 0.0, e: float = 0.0,
              b: tuple[float, ...] = (), n: float = 0.0, commit: bool = True) -> None:
        if len(b) > self.K:
            raise AssertionError(f"internal: stage uses {len(b)} history entries, plan has K={self.K}")
        self.rows.append(dict(step=step, sigma=sigma, alpha=alpha, beta=beta, a=a, e=e,
                              b=tuple(b) + (0.0,) * (self.K - len(b)), n=n, commit=commit))

    def add_noise_after_last(self, n: float) -> None:
        """Noise that must reach x before the next stage: folded into the last stage (or the start)."""
        if not self.rows:
            self.n_init = n
        else:
            self.rows[-1]["n"] = n

    def build(self) -> Plan:
        col = lambda k: np.array([r[k] for r in self.rows], dtype=np.float64)  # noqa: E731
        sigma = col("sigma")
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        return Plan(solver=self.solver, sigmas=self.sigmas, step=np.array([r["step"] for r in self.rows]),
                    sigma=sigma, c_in=c_in, c_noise=c_noise, c_skip=c_skip, c_out=c_out,
                    alpha=col("alpha"), beta=col("beta"), a=col("a"), e=col("e"),
                    b=np.array([r["b"] for r in self.rows], dtype=np.float64), n=col("n"),
                    commit=np.array([r["commit"] for r in self.rows]), n_init=self.n_init,
                    precond=self.precond.to_dict(), options=self.options)


def _finite(name: str, v, lo: float = -math.inf, allow_inf: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if math.isnan(x) or (math.isinf(x) and not allow_inf) or x < lo:
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= {lo}, got {v!r}")
    return x


def _churn(sigmas: np.ndarray, S_churn: float, S_tmin: float, S_tmax: float, S_noise: float):
    """EDM Algorithm 2, lines 4-6: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0,
    t_hat_i = (1 + gamma_i) t_i, and the noise scale S_noise sqrt(t_hat_i^2 - t_i^2) added to x_i."""
    S_churn = _finite("S_churn", S_churn, 0.0)
    S_tmin = _finite("S_tmin", S_tmin, 0.0)
    S_tmax = _finite("S_tmax", S_tmax, 0.0, allow_inf=True)
    S_noise = _finite("S_noise", S_noise, 0.0)
    if S_tmax < S_tmin:
        raise ValueError(f"S_tmax must be >= S_tmin, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    N = sigmas.size - 1
    t = sigmas[:-1]
    inside = (t >= S_tmin) & (t <= S_tmax)
    gamma = np.where(inside, min(S_churn / N, math.sqrt(2.0) - 1.0), 0.0)
    t_hat = t * (1.0 + gamma)
    noise = S_noise * np.sqrt(t_hat ** 2 - t ** 2)
    return t_hat, noise


def euler(sigmas, precond: Precond, *, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
          S_noise: float = 1.0) -> Plan:
    """Euler on the probability-flow ODE, Karras et al. (2022) Algorithm 1 without the 2nd-order correction
    (with churn as Algorithm 2): x_{i+1} = x_hat_i + (t_{i+1} - t_hat_i) d_i, d_i = (x_hat_i - D(x_hat_i; t_hat_i)) / t_hat_i."""
    opts = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    t_hat, churn = _churn(sigmas, **opts)
    p = _Builder("euler", sigmas, precond, 1, opts if S_churn else {})
    N = sigmas.size - 1
    p.add_noise_after_last(churn[0])
    for i in range(N):
        # Euler step.
        p.stage(step=i, sigma=t_hat[i], alpha=1.0 / t_hat[i], beta=-1.0 / t_hat[i],
                a=1.0, b=(sigmas[i + 1] - t_hat[i],), commit=True)
        if i + 1 < N:
            p.add_noise_after_last(churn[i + 1])
    return p.build()


def _heun(name: str, sigmas: np.ndarray, precond: Precond, opts: dict) -> Plan:
    t_hat, churn = _churn(sigmas, **opts)
    p = _Builder(name, sigmas, precond, 2, opts if name == "edm" else {})
    N = sigmas.size - 1
    p.add_noise_after_last(churn[0])
    for i in range(N):
        t_next = sigmas[i + 1]
        dt = t_next - t_hat[i]
        if t_next == 0.0:
            # Euler step to t_N = 0 (Algorithm 1, line 7 is skipped).
            p.stage(step=i, sigma=t_hat[i], alpha=1.0 / t_hat[i], beta=-1.0 / t_hat[i], a=1.0, b=(dt,), commit=True)
        else:
            # Euler step to the trial point x_{i+1}' (does not commit).
            p.stage(step=i, sigma=t_hat[i], alpha=1.0 / t_hat[i], beta=-1.0 / t_hat[i], a=1.0, b=(dt,), commit=False)
            # Apply 2nd order correction: x_{i+1} = x_hat_i + dt (d_i + d'_i) / 2.
            p.stage(step=i, sigma=t_next, alpha=1.0 / t_next, beta=-1.0 / t_next, a=1.0, b=(0.5 * dt, 0.5 * dt),
                    commit=True)
        if i + 1 < N:
            p.add_noise_after_last(churn[i + 1])
    return p.build()


def heun(sigmas, precond: Precond) -> Plan:
    """Heun's 2nd-order method, Karras et al. (2022) Algorithm 1 (Euler on the last step to t_N = 0):
    x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2, d'_i evaluated at the Euler trial point."""
    return _heun("heun", sigmas, precond, dict(S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0))


def edm(sigmas, precond: Precond, *, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
        S_noise: float = 1.0) -> Plan:
    """EDM stochastic sampler, Karras et al. (2022) Algorithm 2: churn x_hat_i = x_i + sqrt(t_hat_i^2 - t_i^2) S_noise eps,
    then a Heun step from t_hat_i to t_{i+1}.  With S_churn = 0 it is ``heun``."""
    return _heun("edm", sigmas, precond, dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise))


def dpmpp_2m(sigmas, precond: Precond) -> Plan:
    """DPM-Solver++(2M), Lu et al. (2022, arXiv 2211.01095) Algorithm 2, in lambda = -ln sigma:
    x_{i+1} = (t_{i+1}/t_i) x_i - expm1(-h_i) ((1 + 1/(2 r_i)) D_i - D_{i-1} / (2 r_i)), r_i = h_{i-1} / h_i;
    first order on the first step and on the step to sigma = 0 (x_N = D_{N-1})."""
    p = _Builder("dpmpp_2m", sigmas, precond, 2, {})
    N = sigmas.size - 1
    for i in range(N):
        t, t_next = sigmas[i], sigmas[i + 1]
        if t_next == 0.0:
            # Denoise to t_N = 0: the exponential integrator's limit h -> inf.
            p.stage(step=i, sigma=t, alpha=0.0, beta=1.0, a=0.0, b=(1.0,))
            continue
        h = math.log(t / t_next)
        phi_1 = -math.expm1(-h)
        if i == 0:
            # DPM-Solver++(1) = DDIM step.
            p.stage(step=i, sigma=t, alpha=0.0, beta=1.0, a=t_next / t, b=(phi_1,))
        else:
            h_last = math.log(sigmas[i - 1] / t)
            r = h_last / h
            p.stage(step=i, sigma=t, alpha=0.0, beta=1.0, a=t_next / t,
                    b=(phi_1 * (1.0 + 1.0 / (2.0 * r)), -phi_1 / (2.0 * r)))
    return p.build()


SOLVERS: dict[str, Callable[..., Plan]] = {
    "euler": euler,
    "heun": heun,
    "edm": edm,
    "dpmpp_2m": dpmpp_2m,
}


def get_solver(name: str) -> Callable[..., Plan]:
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}") from None


def solver_options(name: str) -> dict[str, object]:
    """The options a solver accepts, with their defaults."""
    sig = inspect.signature(get_solver(name))
    return {k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_plan(solver: str, sigmas, precond: Precond | None = None, **options) -> Plan:
    """Validate the solver name, its options, the schedule and the preconditioning; then build the plan."""
    fn = get_solver(solver)
    known = solver_options(solver)
    for k in options:
        if k not in known:
            raise ValueError(f"unknown option {k!r} for solver {solver!r}; expected one of {sorted(known) or 'none'}")
    s = check_sigmas(sigmas)
    if precond is None:
        precond = Identity()
    if not isinstance(precond, Precond):
        raise ValueError(f"precond must be an edmrt Precond (e.g. EDMPrecond()) or None, got {type(precond).__name__}")
    return fn(s, precond, **options)
