"""Linear multistep methods on d = (x - D(x; sigma)) / sigma, the EDM ODE's derivative dx/dsigma: iPNDM (with and
without an analytic first step) and variable-step Adams-Bashforth (LMS)."""
from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ..plan import Plan
from ..precond import Precond
from .base import Builder, integer

__all__ = ["ipndm", "ipndm_afs", "lms"]

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
    p = Builder("ipndm", sigmas, precond, K=order, options=dict(order=order))
    N = sigmas.size - 1
    for i in range(N):
        t, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        w = _AB[min(i + 1, order)]
        p.d_stage(step=i, sigma=t, b=tuple(dt * c for c in w))
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
    p = Builder("lms", sigmas, precond, K=order, options=dict(order=order))
    N = sigmas.size - 1
    for i in range(N):
        t = sigmas[i]
        cur = min(i + 1, order)
        p.d_stage(step=i, sigma=t, b=tuple(_lagrange_weight(sigmas, i, j, cur) for j in range(cur)))
    return p.build()


def ipndm_afs(sigmas, precond: Precond, *, order: int = 4) -> Plan:
    """iPNDM with the analytic first step of Zhou et al. (2024, arXiv 2312.00094, Sec. 3.3): d_0 = x_0 / t_0, i.e.
    D(x_0; t_0) ~ 0 (the data mean) at sigma_max, so x_1 = (t_1 / t_0) x_0 costs no evaluation; then iPNDM
    (``ipndm``'s fixed Adams-Bashforth weights of order min(i + 1, order)) with d_0 kept in the history.

    N steps make N - 1 evaluations.  No stage is free of a network call: x_1 = (t_1/t_0) x_0 is folded into the
    first stage's c_in and c_skip, and d_0, needed by the first ``order - 1`` updates, is rewritten from the
    current state and the history through x_k = A_k x_0 + sum_j B_k[j] d_j.  Assumes data of mean ~0 (as images
    scaled to [-1, 1]); otherwise the first step is off by (1 - t_1/t_0) E[x_0], which a fitted schedule weighs.
    """
    order = integer("order", order, 1, 4)
    N = sigmas.size - 1
    if N < 2:
        raise ValueError(f"ipndm_afs needs steps >= 2 (the first step is analytic), got {N}")
    t0 = sigmas[0]
    r = sigmas[1] / t0
    p = Builder("ipndm_afs", sigmas, precond, K=order, options=dict(order=order))
    A, B = 0.0, {}  # the committed x_k = A x_0 + sum_j B[j] d_j (from stage 1 on)
    for k in range(1, N):
        t, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
        w = _AB[min(k + 1, order)]           # weights of d_k, d_{k-1}, ..., d_{k-m+1}
        uses_d0 = len(w) == k + 1
        if k == 1:
            # Analytic first step: x_1 = r x_0 (the network sees r x_eval) with x = x_eval = x_0; d_0 = x_0 / t_0.
            a = r + (dt * w[1] / t0 if uses_d0 else 0.0)
            b = [dt * w[0]]
            p.d_stage(step=k, sigma=t, a=a, b=tuple(b), x_scale=r)
            A, B = a, {1: b[0]}
            continue
        # d_0 = (x_k - sum_j B[j] d_j) / (A t_0), with d_j = Y[s - (k - j)].
        b = [dt * w[q] if q < len(w) and q < k else 0.0 for q in range(k)]
        a = 1.0
        if uses_d0:
            c = dt * w[k] / (A * t0)
            a += c
            for j, Bj in B.items():
                b[k - j] -= c * Bj
        p.d_stage(step=k, sigma=t, a=a, b=tuple(b[:order]))
        if any(v != 0.0 for v in b[order:]):
            raise AssertionError("internal: ipndm_afs history beyond the plan's depth")
        A, B = a * A, {j: a * Bj + b[k - j] for j, Bj in B.items()} | {k: b[0]}
    return p.build()
