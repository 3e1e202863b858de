"""Few-step samplers of distilled models: consistency-model multistep sampling, TCD and LCM.

Each step is x0 = D(x; sigma_i) followed by a deterministic jump and fresh noise, all linear in x and D:
one stage per step (history K = 1, Y = D), the noise through the stage's noise scale so the executor
draws it per sample seed.  In EDM (VE) space a VP state x_vp at alpha_bar is x = x_vp / sqrt(alpha_bar),
sigma^2 = (1 - alpha_bar) / alpha_bar, so VP forward noising from s to t reads x_t = x_s + sqrt(sigma_t^2 - sigma_s^2) z.
"""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import IDDPMPrecond, Precond, VEPrecond, VPPrecond
from ..schedules import iddpm_sigmas, vp_sigma, vp_sigma_inv
from .base import Builder, finite

__all__ = ["consistency", "tcd", "lcm"]


def _rise(sigma_to: float, sigma_from: float) -> float:
    """sqrt(sigma_to^2 - sigma_from^2): the noise that takes level sigma_from to sigma_to >= sigma_from."""
    return math.sqrt(max((sigma_to - sigma_from) * (sigma_to + sigma_from), 0.0))


def consistency(sigmas, precond: Precond, *, model_sigma_min: float = 0.002) -> Plan:
    """Multistep consistency sampling, Song et al. (2023, arXiv 2303.01469) Algorithm 1, with epsilon = model_sigma_min:
    x <- f(x; tau_n), then x <- x + sqrt(tau_{n+1}^2 - epsilon^2) z at every intermediate level tau_{n+1} (none before the output)."""
    epsilon = finite("model_sigma_min", model_sigma_min, 0.0)
    taus = sigmas[1:-1]  # the intermediate levels tau_1 > ... > tau_{N-1}; sigmas[0] = T, sigmas[N] = 0 (the output)
    if np.any(sigmas[:-1] < epsilon * (1.0 - 1e-12)):  # a computed sigma_min may round a hair below
        raise ValueError(f"consistency: every level before the output must be >= model_sigma_min = {epsilon}, got "
                         f"{float(sigmas[:-1].min())} (end the schedule at sigma_min >= model_sigma_min, then 0)")
    p = Builder("consistency", sigmas, precond, K=1, options=dict(model_sigma_min=epsilon))
    for n in range(sigmas.size - 1):
        # x <- f(x; tau_n), plus the noise of the next level.
        p.D_stage(step=n, sigma=sigmas[n], b=(1.0,))
        if n < taus.size:
            p.add_noise_after_last(_rise(taus[n], epsilon))
    return p.build()


def _tcd_sigma_s(precond: Precond, sigma_next: float, gamma: float) -> float:
    """sigma at the intermediate model time s = (1 - gamma) t, t the model time of sigma_next (TCD's SSS).

    Model time by parameterisation: discrete timesteps (diffusers ``alphas_cumprod``, iDDPM's levels) are
    integers, s = floor((1 - gamma) t) as in TCD's reference code and diffusers' ``TCDScheduler``
    (t interpolated in ln sigma when sigma_next lies between levels); VP: sigma(t) = ``vp_sigma`` (EDM
    Table 1); VE: sigma(t) = sqrt(t); otherwise EDM's sigma(t) = t, so sigma_s = (1 - gamma) sigma_next.
    """
    if gamma == 0.0 or sigma_next == 0.0:
        return sigma_next  # DDIM to sigma_next; or s = t = 0: the clean sample
    levels = getattr(precond, "discrete_sigmas", None)
    if isinstance(precond, IDDPMPrecond):
        levels = iddpm_sigmas(precond.C_1, precond.C_2, precond.M)[precond.M - 1::-1]  # level of timestep t = M - 1 - j
    if levels is not None:
        ln_levels = np.log(levels)
        t = float(np.interp(math.log(sigma_next), ln_levels, np.arange(levels.size, dtype=np.float64)))
        # The product is exact in real arithmetic; 1e-9 keeps e.g. 0.7 * 90 = 62.99999999999999 at 63.
        t_s = math.floor((1.0 - gamma) * t + 1e-9)
        return min(float(levels[t_s]), sigma_next)
    if isinstance(precond, VPPrecond):
        t = float(vp_sigma_inv(sigma_next, precond.beta_d, precond.beta_min))
        return min(float(vp_sigma((1.0 - gamma) * t, precond.beta_d, precond.beta_min)), sigma_next)
    if isinstance(precond, VEPrecond):
        return math.sqrt(1.0 - gamma) * sigma_next
    return (1.0 - gamma) * sigma_next


def tcd(sigmas, precond: Precond, *, gamma: float = 0.3) -> Plan:
    """Strategic Stochastic Sampling of Trajectory Consistency Distillation, Zheng et al. (2024, arXiv 2402.19159)
    (diffusers ``TCDScheduler.step``): x_s = D + (sigma_s / sigma_t)(x_t - D) (DDIM to s = (1 - gamma) t_next),
    then x_next = x_s + sqrt(sigma_next^2 - sigma_s^2) z; gamma = 0 is DDIM, gamma = 1 restarts from x0 (as LCM).

    The model time that gamma scales depends on the parameterisation (``_tcd_sigma_s``).  The last step goes to
    sigma = 0 (x = D); diffusers instead stops at timestep 0 (sigma_0 = sqrt((1 - alpha_bar_0) / alpha_bar_0)).
    """
    gamma = finite("gamma", gamma, 0.0, hi=1.0)
    p = Builder("tcd", sigmas, precond, K=1, options=dict(gamma=gamma))
    for i in range(sigmas.size - 1):
        sigma_t, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_s = _tcd_sigma_s(precond, sigma_next, gamma)
        # DDIM jump from t to s with x0 = D, eps = (x_t - D) / sigma_t; then forward noise from s to t_next.
        r = sigma_s / sigma_t
        p.D_stage(step=i, sigma=sigma_t, a=r, b=(1.0 - r,))
        if sigma_next > 0.0:
            p.add_noise_after_last(_rise(sigma_next, sigma_s))
    return p.build()


def lcm(sigmas, precond: Precond) -> Plan:
    """Multistep latent consistency sampling, Luo et al. (2023, arXiv 2310.04378) Algorithm 1 (diffusers ``LCMScheduler``):
    x0 = D(x; sigma_i), x_{i+1} = x0 + sigma_{i+1} z (VP: alpha_{i+1} x0 + sigma_vp,{i+1} z); the output is the last x0.

    LCM's boundary-condition scalings c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2), c_out(t) = 10 t / sqrt(...)
    are part of the model's parameterisation (its D), not of the solver: wrap them into the denoiser or a Precond.
    """
    p = Builder("lcm", sigmas, precond, K=1, options={})
    for i in range(sigmas.size - 1):
        # x0 = D(x; sigma_i), noised afresh to the next level.
        p.D_stage(step=i, sigma=sigmas[i], b=(1.0,))
        if sigmas[i + 1] > 0.0:
            p.add_noise_after_last(sigmas[i + 1])
    return p.build()
