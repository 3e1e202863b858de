"""Linear multistep methods on d = (x - D(x; sigma)) / sigma, the EDM ODE's derivative dx/dsigma."""
from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ..plan import Plan
from ..precond import Precond
from .base import Builder, integer

__all__ = ["ipndm", "lms"]

# Adams-Bashforth coefficients for equal steps, newest first (Hairer, Norsett & Wanner, Sec. III.1).
_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm(sigmas, precond: Precond, *, order: int = 4) -> Plan:
    """Improved PNDM, Zhang & Chen (2023, DEIS, arXiv 2204.13902) Eq. 29 in EDM's sigma time (as Zhou et al. 2024):
    x_{i+1} = x_i + (t_{i+1} - t_i) sum_k AB_k d_{i-k}, fixed Adams-Bashforth weights of order min(i + 1, order)."""
    order = integer("order", order, 1, 4)
    p = Builder("ipndm", sigmas, precond, order, dict(order=order))
    N = sigmas.size - 1
    for i in range(N):
        t, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        w = _AB[min(i + 1, order)]
        p.stage(step=i, sigma=t, alpha=1.0 / t, beta=-1.0 / t, a=1.0, b=tuple(dt * c for c in w))
    return p.build()


def _lagrange_weight(t: np.ndarray, i: int, j: int, order: int) -> float:
    """int_{t_i}^{t_{i+1}} l_j(tau) dtau, l_j the Lagrange basis polynomial through t_i, ..., t_{i-order+1} at t_{i-j}."""
    nodes = [t[i - k] for k in range(order)]
    poly = np.array([1.0])
    for k, tk in enumerate(nodes):
        if k != j:
            poly = P.polymul(poly, np.array([-tk, 1.0]) / (nodes[j] - tk))
    integral = P.polyint(poly)
    return float(P.polyval(t[i + 1], integral) - P.polyval(t[i], integral))


def lms(sigmas, precond: Precond, *, order: int = 4) -> Plan:
    """Linear multistep with variable-step Adams-Bashforth weights (k-diffusion's sample_lms):
    x_{i+1} = x_i + sum_j (int_{t_i}^{t_{i+1}} l_j(tau) dtau) d_{i-j}, Lagrange basis through the last min(i + 1, order) sigmas."""
    order = integer("order", order, 1, 4)
    p = Builder("lms", sigmas, precond, order, dict(order=order))
    N = sigmas.size - 1
    for i in range(N):
        t = sigmas[i]
        cur = min(i + 1, order)
        p.stage(step=i, sigma=t, alpha=1.0 / t, beta=-1.0 / t, a=1.0,
                b=tuple(_lagrange_weight(sigmas, i, j, cur) for j in range(cur)))
    return p.build()
