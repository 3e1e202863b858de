"""iPNDM with an analytic first step (AFS), folded into the first network evaluation's coefficients."""
from __future__ import annotations

import dataclasses

from ..plan import Plan
from ..precond import Precond
from .base import Builder, integer
from .multistep import _AB

__all__ = ["ipndm_afs"]


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
    p = Builder("ipndm_afs", sigmas, precond, order, dict(order=order))
    A, B = 0.0, {}  # the committed x_k = A x_0 + sum_j B[j] d_j (from stage 1 on)
    for k in range(1, N):
        t, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
        w = _AB[min(k + 1, order)]           # weights of d_k, d_{k-1}, ..., d_{k-m+1}
        uses_d0 = len(w) == k + 1
        if k == 1:
            # Analytic first step: x_1 = r x_0 with x = x_eval = x_0; d_0 = x_0 / t_0.
            a = r + (dt * w[1] / t0 if uses_d0 else 0.0)
            b = [dt * w[0]]
            p.stage(step=k, sigma=t, alpha=1.0 / t0, beta=-1.0 / t, a=a, b=tuple(b))
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
        p.stage(step=k, sigma=t, alpha=1.0 / t, beta=-1.0 / t, a=a, b=tuple(b[:order]))
        if any(v != 0.0 for v in b[order:]):
            raise AssertionError("internal: ipndm_afs history beyond the plan's depth")
        A, B = a * A, {j: a * Bj + b[k - j] for j, Bj in B.items()} | {k: b[0]}
    plan = p.build()
    # x_1 = r x_0: the first network input and preconditioning skip term see r * x_eval.
    c_in, c_skip = plan.c_in.copy(), plan.c_skip.copy()
    c_in[0] *= r
    c_skip[0] *= r
    return dataclasses.replace(plan, c_in=c_in, c_skip=c_skip)
