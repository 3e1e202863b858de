"""UniPC: the unified predictor-corrector multistep sampler (Zhao et al. 2023, arXiv 2302.04867),
in its data-prediction (D) form over lambda = -ln sigma."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import Precond
from .base import Builder, choice, integer

__all__ = ["unipc"]


def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{n >= 0} z^n / (n + k)!, i.e. phi_0 = e^z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z.

    The recursion loses about k digits to cancellation when |z| is small, so there the series is summed."""
    if abs(z) < 1.0:
        term, total = 1.0 / math.factorial(k), 0.0
        for n in range(40):  # |z|^40 / 40! < 1e-47
            total += term
            term *= z / (n + k + 1)
        return total
    phi = math.exp(z)
    for m in range(k):
        phi = (phi - 1.0 / math.factorial(m)) / z
    return phi


def _rho(r: list[float], *, hh: float, B_h: float, n: int) -> np.ndarray:
    """Solve the order conditions R_n rho = g_n / B(h) (Sec. 3.1, Theorem 3.1) for n coefficients:
    R_n[i, k] = r_k^i over the points r = (r_1, ..., r_{p-1}[, 1]) and g_n[i] = i! hh phi_{i+1}(hh), i = 1..n,
    at hh = -h as the data-prediction form does.  As the paper's reference code (and diffusers) does, a single
    coefficient is rho = 1/2 (UniP-2 and UniC-1): the h -> 0 limit of g_1 / B(h) for both B(h)."""
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.array([0.5])
    R = np.vander(np.asarray(r[:n]), n, increasing=True).T  # R[i, k] = r_k^i
    g = np.array([math.factorial(i) * hh * _phi(i + 1, hh) for i in range(1, n + 1)])
    return np.linalg.solve(R, g / B_h)


def _residual(sigmas: np.ndarray, j: int, *, p: int, variant: str, corrector: bool) -> dict[int, float]:
    """The B(h) term of UniP-p (corrector=False) or UniC-p (corrector=True) on the step t_j -> t_{j+1},
    -B(h) (sum_{k<p} rho_k (D_{j-k} - D_j) / r_k  [+ rho_p (D_{j+1} - D_j)]),
    as {schedule index of D: coefficient}."""
    t, t_next = sigmas[j], sigmas[j + 1]
    h = math.log(t / t_next)
    hh = -h
    B_h = hh if variant == "bh1" else math.expm1(hh)
    r = [math.log(t / sigmas[j - k]) / h for k in range(1, p)]  # r_k = (lambda_{j-k} - lambda_j) / h < 0
    rho = _rho(r + [1.0] if corrector else r, hh=hh, B_h=B_h, n=p if corrector else p - 1)
    c: dict[int, float] = {}
    for k, r_k in enumerate(r, start=1):
        c[j - k] = c.get(j - k, 0.0) - B_h * rho[k - 1] / r_k
        c[j] = c.get(j, 0.0) + B_h * rho[k - 1] / r_k
    if corrector:
        c[j + 1] = c.get(j + 1, 0.0) - B_h * rho[-1]
        c[j] = c.get(j, 0.0) + B_h * rho[-1]
    return c


def unipc(sigmas, precond: Precond, *, order: int = 2, variant: str = "bh2") -> Plan:
    """UniPC-p, Zhao et al. (2023, arXiv 2302.04867): UniP-p predictor (Sec. 3.2) + UniC-p corrector (Sec. 3.1),
    data prediction in lambda = -ln sigma, x_{i+1} = e^{-h} x^c_i + (1 - e^{-h}) D_i - B(h) sum_k rho_k (D_{i-k} - D_i) / r_k.

    h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i) / h, B(h) = -h ("bh1") or expm1(-h) ("bh2"),
    rho from the order conditions with phi_k (``_rho``).  The corrector x^c_{i+1} is the same update with
    D_{i+1} = D(x_{i+1}; t_{i+1}) added as the point r = 1; that evaluation is reused by the next predictor,
    so NFE = steps, and UniC-p raises the order of accuracy to p + 1 (Theorem 3.1): ``order=p`` converges
    at order p + 1.

    Plan form: x^c_i - x_i is a combination of D's (the e^{-h} x^c_{i-1} base term cancels), so stage i
    evaluates D_i at x_eval = x_i and writes x_{i+1} = e x_eval + sum_k b_k D_{i-k}, e = e^{-h}, with
    Y = D, a = 0 and every stage committing; the history is K = order + 1 (UniC-p reads D_i .. D_{i-p}).

    Orders as diffusers' ``UniPCMultistepScheduler(lower_order_final=True)`` and the reference code:
    p_i = min(order, i + 1, N - i), i.e. a warm-up at order 1, 2, ... and lower orders on the last steps;
    UniC-p_{i-1} corrects x_i.  The step to t_N = 0 is UniP-1 in the limit h -> inf: x_N = D_{N-1}.  The
    order-1 predictor has no B(h) term, so bh1's B(h) = -h -> -inf never enters (diffusers multiplies
    B(h) = -inf by a zero residual there and returns NaN); the last correction x^c_{N-1} is multiplied by
    e^{-h} = 0 and drops out, as in diffusers (a higher-order step to 0 would diverge: r_k -> 0).
    """
    order = integer("order", order, 1, 3)
    variant = choice("variant", variant, ("bh1", "bh2"))
    N = sigmas.size - 1
    K = order + 1
    p = Builder("unipc", sigmas, precond, K=K, options=dict(order=order, variant=variant))
    p_i = [min(order, i + 1, N - i) for i in range(N)]
    for i in range(N):
        t, t_next = sigmas[i], sigmas[i + 1]
        b = np.zeros(K)
        if t_next == 0.0:
            # Denoise to t_N = 0: UniP-1 in the limit h -> inf.
            b[0] = 1.0
            p.D_stage(step=i, sigma=t, b=tuple(b))
            continue
        # UniC-p_{i-1}: x^c_i = x_i + (corrector residual - predictor residual) of the step t_{i-1} -> t_i.
        delta: dict[int, float] = {}
        if i > 0:
            for j, c in _residual(sigmas, i - 1, p=p_i[i - 1], variant=variant, corrector=True).items():
                delta[j] = delta.get(j, 0.0) + c
            for j, c in _residual(sigmas, i - 1, p=p_i[i - 1], variant=variant, corrector=False).items():
                delta[j] = delta.get(j, 0.0) - c
        # UniP-p_i from x^c_i: x_{i+1} = e^{-h} x^c_i + (1 - e^{-h}) D_i + residual.
        h = math.log(t / t_next)
        e = t_next / t
        for j, c in delta.items():
            b[i - j] += e * c
        b[0] += -math.expm1(-h)
        for j, c in _residual(sigmas, i, p=p_i[i], variant=variant, corrector=False).items():
            b[i - j] += c
        p.D_stage(step=i, sigma=t, e=e, b=tuple(b))
    return p.build()
