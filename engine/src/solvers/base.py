"""Shared machinery of the solvers: the plan builder (its two stage kinds, Y = d and Y = D) and option checks."""
from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from ..precond import Precond
from ..checks import is_real

__all__ = ["Builder", "finite", "choice", "integer", "D_FORM_SIGMA_MAX", "DATA_FORM_SOLVERS"]

# The highest level a derivative-form stage (Y = d, x_new = x + h d) may run at: in float32 x + h d cancels two
# terms of size sigma |x / sigma|, losing ~sigma * 2^-24 of the state's scale (at 1e5: 6e-3 of a unit-scale
# image; a flow model's t = 1 is sigma 1.7e7, where nothing is left).  Data-form solvers (Y = D) do not cancel.
D_FORM_SIGMA_MAX = 1e5
DATA_FORM_SOLVERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")


class Builder:
    """Collects stages, then fills in the preconditioning coefficients at each stage's sigma."""

    def __init__(self, solver: str, sigmas: np.ndarray, precond: Precond, *, K: int, options: dict):
        self.solver, self.sigmas, self.precond, self.K, self.options = solver, sigmas, precond, K, options
        self.rows: list[dict] = []
        self.n_init = 0.0

    def stage(self, *, step: int, sigma: float, alpha: float, beta: float, a: float = 0.0, e: float = 0.0,
              b: tuple[float, ...] = (), n: float = 0.0, commit: bool = True, x_scale: float = 1.0) -> None:
        """One network evaluation at ``x_scale * x_eval`` and ``sigma``, then Y = alpha x_eval + beta D and
        x_new = a x + e x_eval + sum_k b_k Y[s - k] + n z (the stage equations of ``edmrt.plan``)."""
        if len(b) > self.K:
            raise AssertionError(f"internal: stage uses {len(b)} history entries, plan has K={self.K}")
        self.rows.append(dict(step=step, sigma=sigma, alpha=alpha, beta=beta, a=a, e=e,
                              b=tuple(b) + (0.0,) * (self.K - len(b)), n=n, commit=commit, x_scale=x_scale))

    def d_stage(self, *, step: int, sigma: float, b: tuple[float, ...], a: float = 1.0, commit: bool = True,
                x_scale: float = 1.0) -> None:
        """A stage whose history entry is the ODE's derivative d = (x - D(x; sigma)) / sigma (Karras et al. 2022,
        Eq. 4 and Algorithm 1, at x = x_scale x_eval): x_new = a x + sum_k b_k d[s - k].  Refused above
        ``D_FORM_SIGMA_MAX`` (float32 cancellation), naming the solvers that run there."""
        if sigma > D_FORM_SIGMA_MAX:
            raise ValueError(f"solver {self.solver!r} steps in derivative form (x + h d), which in float32 loses all "
                             f"precision at sigma = {sigma:.4g} (> {D_FORM_SIGMA_MAX:g}: e.g. a flow model's t = 1); "
                             f"use a solver in data form ({', '.join(DATA_FORM_SOLVERS)}) or a schedule starting at "
                             f"or below {D_FORM_SIGMA_MAX:g}")
        self.stage(step=step, sigma=sigma, alpha=x_scale / sigma, beta=-1.0 / sigma, a=a, b=b, commit=commit,
                   x_scale=x_scale)

    def D_stage(self, *, step: int, sigma: float, b: tuple[float, ...], a: float = 0.0, e: float = 0.0,
                n: float = 0.0) -> None:
        """A stage whose history entry is the denoised D(x; sigma) itself (data prediction: DPM-Solver++, UniPC,
        consistency models): x_new = a x + e x_eval + sum_k b_k D[s - k] + n z."""
        self.stage(step=step, sigma=sigma, alpha=0.0, beta=1.0, a=a, e=e, b=b, n=n)

    def add_noise_after_last(self, n: float) -> None:
        """Noise that must reach x before the next stage: folded into the last stage (or the start)."""
        if not self.rows:
            self.n_init = n
        else:
            self.rows[-1]["n"] = n

    def build(self) -> Plan:
        # At the start of stage s, x == x_eval bit for bit when s == 0 or stage s - 1 committed (both were written
        # from the same value): there a x + e x_eval = (a + e) x_eval, so the weight moves to e and a becomes 0,
        # which lets the fused kernels skip reading x.  Only Heun-type correctors (after a trial point that does
        # not commit) keep a != 0.
        committed = True
        for r in self.rows:
            if committed and r["a"] != 0.0:
                r["e"], r["a"] = r["e"] + r["a"], 0.0
            committed = r["commit"]
        col = lambda k: np.array([r[k] for r in self.rows], dtype=np.float64)  # noqa: E731
        sigma = col("sigma")
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        # A stage evaluated at x_scale x_eval: the network sees c_in x_scale x_eval, and D skips c_skip x_scale x_eval.
        c_in, c_skip = c_in * col("x_scale"), c_skip * col("x_scale")
        return Plan(solver=self.solver, sigmas=self.sigmas, step=np.array([r["step"] for r in self.rows]),
                    sigma=sigma, c_in=c_in, c_noise=c_noise, c_skip=c_skip, c_out=c_out,
                    alpha=col("alpha"), beta=col("beta"), a=col("a"), e=col("e"),
                    b=np.array([r["b"] for r in self.rows], dtype=np.float64), n=col("n"),
                    commit=np.array([r["commit"] for r in self.rows]), n_init=self.n_init,
                    precond=self.precond.to_dict(), options=self.options)


def finite(name: str, v, lo: float = -math.inf, allow_inf: bool = False, hi: float = math.inf) -> float:
    """A float option in [lo, hi]; NaN (and Inf unless allowed), strings and bools rejected with the option's name."""
    if not is_real(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    x = float(v)
    if math.isnan(x) or (math.isinf(x) and not allow_inf) or x < lo or x > hi:
        rng = f"[{lo}, {hi}]" if hi != math.inf else f">= {lo}"
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number {rng}, got {v!r}")
    return x


def integer(name: str, v, lo: int, hi: int) -> int:
    """An integer option in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (isinstance(v, float) and v.is_integer()):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def choice(name: str, v, allowed) -> str:
    """A string option from a fixed set."""
    if v not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {v!r}")
    return v
