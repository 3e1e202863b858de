"""EDM's own samplers: Euler, Heun (Algorithm 1) and the stochastic sampler (Algorithm 2),
Karras et al. (2022), arXiv 2206.00364."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import Precond
from .base import Builder, finite

__all__ = ["euler", "euler_ancestral", "heun", "edm", "churn"]


def churn(sigmas: np.ndarray, S_churn: float, S_tmin: float, S_tmax: float, S_noise: float):
    """EDM Algorithm 2, lines 4-6: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0,
    t_hat_i = (1 + gamma_i) t_i, and the noise scale S_noise sqrt(t_hat_i^2 - t_i^2) added to x_i."""
    S_churn = finite("S_churn", S_churn, 0.0)
    S_tmin = finite("S_tmin", S_tmin, 0.0)
    S_tmax = finite("S_tmax", S_tmax, 0.0, allow_inf=True)
    S_noise = finite("S_noise", S_noise, 0.0, hi=10.0)  # EDM uses 1.000-1.011
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
    (with churn as Algorithm 2): x_{i+1} = x_hat_i + (t_{i+1} - t_hat_i) d_i, d_i = (x_hat_i - D(x_hat_i; t_hat_i)) / t_hat_i.

    The plan holds the same step in data form, x_{i+1} = (t_{i+1} / t_hat_i) x_hat_i + (1 - t_{i+1} / t_hat_i) D
    (its coefficients in float64): x_hat + h d cancels two terms of size t_hat |x| in float32, which loses all
    precision from a level as high as a flow model's t = 1 (sigma 1.7e7, ``schedules.FLOW_T_MAX``)."""
    opts = dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    t_hat, noise = churn(sigmas, **opts)
    p = Builder("euler", sigmas, precond, K=1, options=opts if S_churn else {})
    N = sigmas.size - 1
    p.add_noise_after_last(noise[0])
    for i in range(N):
        # Euler step.
        r = sigmas[i + 1] / t_hat[i]
        p.D_stage(step=i, sigma=t_hat[i], e=r, b=(1.0 - r,))
        if i + 1 < N:
            p.add_noise_after_last(noise[i + 1])
    return p.build()


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next: sigma_up = min(sigma_next, eta
    sigma_next sqrt(1 - sigma_next^2 / sigma^2)), sigma_down = sqrt(sigma_next^2 - sigma_up^2).  At eta = 1 this is
    DDPM's posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 6-7, variance beta_tilde) in EDM's state, i.e. DDIM
    with eta = 1 (Song et al. 2021, Eq. 16)."""
    if sigma_next == 0.0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(1.0 - (sigma_next / sigma) ** 2, 0.0)))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def euler_ancestral(sigmas, precond: Precond, *, eta: float = 1.0) -> Plan:
    """Ancestral sampling (DDPM's Algorithm 2, Ho et al. 2020, at eta = 1; DDIM(eta) of Song et al. 2021): the
    deterministic step to sigma_down, x' = D + (sigma_down / sigma)(x - D), then fresh noise sigma_up z
    (``ancestral_step``), as k-diffusion's ``sample_euler_ancestral`` and diffusers' ``EulerAncestralDiscreteScheduler``
    (on a schedule ending in 0) and ``DDPMWuerstchenScheduler`` (Stable Cascade) step.  The last step adds no noise:
    to 0 there is none; to a positive final level (Wuerstchen's t = 0) it is DDPM's last step, the posterior mean,
    where k-diffusion would add sigma_up z.  eta = 0 is Euler (DDIM)."""
    eta = finite("eta", eta, 0.0)
    p = Builder("euler_ancestral", sigmas, precond, K=1, options=dict(eta=eta))
    N = sigmas.size - 1
    for i in range(N):
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        r = down / sigmas[i]
        p.D_stage(step=i, sigma=sigmas[i], e=r, b=(1.0 - r,))
        if i + 1 < N:
            p.add_noise_after_last(up)
    return p.build()


def _heun(name: str, sigmas: np.ndarray, precond: Precond, opts: dict) -> Plan:
    """Algorithm 2 (with churn) / Algorithm 1 (without): Euler to a trial point, then the trapezoidal correction."""
    t_hat, noise = churn(sigmas, **opts)
    p = Builder(name, sigmas, precond, K=2, options=opts if name == "edm" else {})
    N = sigmas.size - 1
    p.add_noise_after_last(noise[0])
    for i in range(N):
        t_next = sigmas[i + 1]
        dt = t_next - t_hat[i]
        if t_next == 0.0:
            # Euler step to t_N = 0 (Algorithm 1, line 7 is skipped).
            p.d_stage(step=i, sigma=t_hat[i], b=(dt,))
        else:
            # Euler step to the trial point x_{i+1}' (does not commit).
            p.d_stage(step=i, sigma=t_hat[i], b=(dt,), commit=False)
            # Apply 2nd order correction: x_{i+1} = x_hat_i + dt (d_i + d'_i) / 2.
            p.d_stage(step=i, sigma=t_next, b=(0.5 * dt, 0.5 * dt))
        if i + 1 < N:
            p.add_noise_after_last(noise[i + 1])
    return p.build()


def heun(sigmas, precond: Precond) -> Plan:
    """Heun's 2nd-order method, Karras et al. (2022) Algorithm 1 (Euler on the last step to t_N = 0):
    x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2, d'_i evaluated at the Euler trial point."""
    return _heun("heun", sigmas, precond, opts=dict(S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0))


def edm(sigmas, precond: Precond, *, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
        S_noise: float = 1.0) -> Plan:
    """EDM stochastic sampler, Karras et al. (2022) Algorithm 2: churn x_hat_i = x_i + sqrt(t_hat_i^2 - t_i^2) S_noise eps,
    then a Heun step from t_hat_i to t_{i+1}.  With S_churn = 0 it is ``heun``."""
    return _heun("edm", sigmas, precond, opts=dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise))


