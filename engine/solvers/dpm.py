"""DPM-Solver++ multistep samplers (Lu et al. 2022, arXiv 2211.01095), in lambda = -ln sigma."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import Precond
from .base import Builder, finite, choice

__all__ = ["dpmpp_2m"]


def dpmpp_2m(sigmas, precond: Precond) -> Plan:
    """DPM-Solver++(2M), Lu et al. (2022, arXiv 2211.01095) Algorithm 2, in lambda = -ln sigma:
    x_{i+1} = (t_{i+1}/t_i) x_i - expm1(-h_i) ((1 + 1/(2 r_i)) D_i - D_{i-1} / (2 r_i)), r_i = h_{i-1} / h_i;
    first order on the first step and on the step to sigma = 0 (x_N = D_{N-1})."""
    p = Builder("dpmpp_2m", sigmas, precond, 2, {})
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


