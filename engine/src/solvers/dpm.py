"""DPM-Solver++ multistep samplers (Lu et al. 2022, arXiv 2211.01095), in lambda = -ln sigma."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import Precond
from .base import Builder, finite, choice

__all__ = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"]


def _sde_multistep(name: str, sigmas: np.ndarray, precond: Precond, *, order: int, eta: float, S_noise: float,
                   solver_type: str, options: dict, first_order_last: bool = False) -> Plan:
    """DPM-Solver++(2M/3M) with the SDE variant's eta (Lu et al. 2022, Sec. 5; Gonzalez et al. 2023 for 3M SDE).

    With h_eta = (1 + eta) h, the exponential-integrator step on D is
        x_{i+1} = (t_{i+1}/t_i) e^{-eta h} x_i + phi_1 D_i + (higher-order differences of D) + t_{i+1} sqrt(-expm1(-2 eta h)) S_noise z,
    phi_1 = -expm1(-h_eta), phi_2 = phi_1 / h_eta ... written below on vectors of coefficients of (D_i, D_{i-1}, D_{i-2}).
    """
    eta = finite("eta", eta, 0.0, hi=10.0)  # 0: ODE, 1: the SDE; beyond 10 the noise swamps the signal (a typo)
    S_noise = finite("S_noise", S_noise, 0.0, hi=10.0)  # EDM uses 1.000-1.011
    p = Builder(name, sigmas, precond, K=order, options=options)
    N = sigmas.size - 1
    D0, D1, D2 = np.eye(3)  # coefficient vectors of D_i, D_{i-1}, D_{i-2}
    h_1 = h_2 = None
    for i in range(N):
        t, t_next = sigmas[i], sigmas[i + 1]
        if t_next == 0.0:
            # Denoising step to t_N = 0.
            p.D_stage(step=i, sigma=t, b=(1.0,))
            continue
        h = math.log(t / t_next)
        h_eta = h * (1.0 + eta)
        phi_1 = -math.expm1(-h_eta)
        phi_2 = 1.0 - phi_1 / h_eta          # = expm1(-h_eta)/h_eta + 1
        coef = phi_1 * D0
        if first_order_last and i == N - 1:
            pass   # first order on the last step (diffusers' lower_order_final / euler_at_final)
        elif order == 3 and h_2 is not None:
            # Third order: divided differences over (h_1, h_2).
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (D0 - D1) / r0
            d1_1 = (D1 - D2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            coef = coef + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            r = h_1 / h
            if order == 3 or solver_type == "heun":
                coef = coef + phi_2 / r * (D0 - D1)
            else:  # midpoint
                coef = coef + 0.5 * phi_1 / r * (D0 - D1)
        n = t_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * S_noise if eta > 0 else 0.0
        p.D_stage(step=i, sigma=t, a=(t_next / t) * math.exp(-eta * h), b=tuple(coef[:order]), n=n)
        h_1, h_2 = h, h_1
    return p.build()


def _first_order_last(value) -> dict:
    """The plan's record of ``first_order_last`` (only when set): a first-order last step, diffusers'
    ``lower_order_final`` / ``euler_at_final`` on a schedule that stops at a positive level (a step to 0 is D)."""
    if not isinstance(value, bool):
        raise ValueError(f"first_order_last must be True or False, got {value!r}")
    return {"first_order_last": True} if value else {}


def dpmpp_2m(sigmas, precond: Precond, *, first_order_last: bool = False) -> Plan:
    """DPM-Solver++(2M), Lu et al. (2022, arXiv 2211.01095) Algorithm 2, in lambda = -ln sigma:
    x_{i+1} = (t_{i+1}/t_i) x_i - expm1(-h_i) ((1 + 1/(2 r_i)) D_i - D_{i-1} / (2 r_i)), r_i = h_{i-1} / h_i;
    first order on the first step and on the step to sigma = 0 (x_N = D_{N-1}).  (The 2M SDE at eta = 0,
    midpoint: phi_1 D_i + phi_1 / (2 r_i) (D_i - D_{i-1}) is the same update.)  ``first_order_last``: the last step
    first order too, for a schedule that stops at a positive level (diffusers' ``lower_order_final``)."""
    return _sde_multistep("dpmpp_2m", sigmas, precond, order=2, eta=0.0, S_noise=1.0, solver_type="midpoint",
                          options=_first_order_last(first_order_last), first_order_last=first_order_last)


def dpmpp_3m(sigmas, precond: Precond) -> Plan:
    """DPM-Solver++(3M), Lu et al. (2022) multistep order 3 in lambda = -ln sigma (as k-diffusion's 3M SDE at eta = 0):
    x_{i+1} = (t_{i+1}/t_i) x_i + phi_1 D_i + phi_2 D1_i - phi_3 D2_i; orders 1, 2 on the first steps, x_N = D_{N-1}."""
    return _sde_multistep("dpmpp_3m", sigmas, precond, order=3, eta=0.0, S_noise=1.0, solver_type="heun",
                          options={})


def dpmpp_2m_sde(sigmas, precond: Precond, *, eta: float = 1.0, S_noise: float = 1.0,
                 solver_type: str = "midpoint", first_order_last: bool = False) -> Plan:
    """DPM-Solver++(2M) SDE, Lu et al. (2022) Sec. 5 (k-diffusion's sample_dpmpp_2m_sde):
    x_{i+1} = (t_{i+1}/t_i) e^{-eta h} x_i + phi_1 D_i + c (D_i - D_{i-1}) / r + t_{i+1} sqrt(1 - e^{-2 eta h}) z,
    c = phi_1 / 2 (midpoint) or phi_2 (heun); eta = 0 with midpoint is ``dpmpp_2m``.  ``first_order_last``: as
    ``dpmpp_2m``'s."""
    choice("solver_type", solver_type, ("midpoint", "heun"))
    return _sde_multistep("dpmpp_2m_sde", sigmas, precond, order=2, eta=eta, S_noise=S_noise, solver_type=solver_type,
                          options=dict(eta=eta, S_noise=S_noise, solver_type=solver_type,
                                       **_first_order_last(first_order_last)), first_order_last=first_order_last)


def dpmpp_3m_sde(sigmas, precond: Precond, *, eta: float = 1.0, S_noise: float = 1.0) -> Plan:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): the 3M update with h_eta = (1 + eta) h and
    noise t_{i+1} sqrt(1 - e^{-2 eta h}) z; eta = 0 is ``dpmpp_3m``."""
    return _sde_multistep("dpmpp_3m_sde", sigmas, precond, order=3, eta=eta, S_noise=S_noise, solver_type="heun",
                          options=dict(eta=eta, S_noise=S_noise))
