"""The exact Gaussian-mixture denoiser: the test oracle and quality benchmark.

Data: p_0(x) = sum_k w_k N(x; mu_k, diag(s_k^2)) in D dimensions.  Noised with sigma it stays a
mixture, p_sigma(x) = sum_k w_k N(x; mu_k, diag(s_k^2 + sigma^2)), so the ideal denoiser
(Karras et al. 2022, Eq. 3 minimiser; the posterior mean) is closed-form:

    D(x; sigma) = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),  r = softmax_k log(w_k N_k(x)),

and Tweedie's formula D = x + sigma^2 grad_x log p_sigma(x) links it to the score.  The
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 4 with sigma(t) = t) is
solved with scipy in u = ln sigma, where it reads dx/du = x - D(x; e^u).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """K-component diagonal Gaussian mixture in D dimensions, float64 throughout.

    ``means`` (K, D), ``stds`` (K, D) (or broadcastable), ``weights`` (K,) summing to 1.
    Inputs x may have any shape (B, ...) whose trailing size is D.
    """

    def __init__(self, means, stds, weights=None):
        mu = torch.as_tensor(np.asarray(means, dtype=np.float64))
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        K, D = mu.shape
        sd = torch.as_tensor(np.asarray(stds, dtype=np.float64)).expand(K, D).clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if not (torch.isfinite(mu).all() and torch.isfinite(sd).all() and torch.isfinite(w).all()):
            raise ValueError("means, stds and weights must be finite")
        if (sd <= 0).any():
            raise ValueError("stds must be > 0")
        if w.shape != (K,) or (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-9:
            raise ValueError(f"weights must be {K} positive values summing to 1, got {w.tolist()}")
        self.means, self.stds, self.weights = mu, sd, w
        self.K, self.D = K, D

    @classmethod
    def random(cls, K: int = 8, D: int = 64, seed: int = 0, spread: float = 3.0, std_range=(0.2, 0.6),
               weights: bool = True) -> "GaussianMixture":
        """A reproducible random mixture: means ~ N(0, spread^2 / D) per dim (norm ~ spread), stds uniform in std_range."""
        g = np.random.default_rng(seed)
        means = g.normal(0.0, spread / math.sqrt(D), size=(K, D))
        stds = g.uniform(std_range[0], std_range[1], size=(K, D))
        w = g.dirichlet(np.full(K, 5.0)) if weights else None
        return cls(means, stds, w)

    # ------------------------------------------------------------------ core
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x[0].numel() != self.D:
            raise ValueError(f"x must be a tensor of shape (B, ...) with {self.D} values per sample, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x.reshape(x.shape[0], self.D).to(torch.float64)

    def _sigma(self, sigma, B: int, device) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(B)
        if s.numel() != B:
            raise ValueError(f"sigma must be a scalar or hold one value per sample ({B}), got {s.numel()} values")
        return s.reshape(B, 1, 1)  # (B, 1, 1) against (B, K, D)

    def _log_resp(self, xf: torch.Tensor, s: torch.Tensor):
        mu, sd = self.means.to(xf.device), self.stds.to(xf.device)
        var = sd[None] ** 2 + s ** 2                                       # (B, K, D)
        diff = xf[:, None, :] - mu[None]                                   # (B, K, D)
        logn = -0.5 * ((diff ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)   # (B, K)
        logw = torch.log(self.weights.to(xf.device))[None] + logn
        return logw, diff, var

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; sigma): the exact posterior mean E[x_0 | x_0 + sigma n = x], in x's dtype and shape."""
        xf = self._flat(x)
        s = self._sigma(sigma, xf.shape[0], xf.device)
        logw, diff, var = self._log_resp(xf, s)
        r = torch.softmax(logw, dim=1)                                     # (B, K)
        sd2 = self.stds.to(xf.device)[None] ** 2
        post = self.means.to(xf.device)[None] + sd2 / var * diff           # (B, K, D)
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """ln p_sigma(x), shape (B,)."""
        xf = self._flat(x)
        logw, _, _ = self._log_resp(xf, self._sigma(sigma, xf.shape[0], xf.device))
        return torch.logsumexp(logw, dim=1)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples of the data distribution p_0, shape (n, D), float64."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + self.stds[k] * torch.randn(n, self.D, generator=g, dtype=torch.float64)

    # ------------------------------------------------------------------ exact ODE
    def ode(self, x: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-10,
            atol: float = 1e-10, chunk: int = 32) -> torch.Tensor:
        """Exact probability-flow ODE solution from sigma_from to sigma_to (scipy DOP853 in u = ln sigma): down
        (sampling) or up (an inversion, sigma_to > sigma_from > 0).

        ``sigma_to = 0`` integrates to 1e-8 * min(stds), below which x - D = O(sigma^2 / s^2) (x - mu)
        leaves the state unchanged to ~1e-16 relative, then returns that state.  Samples are solved
        ``chunk`` at a time, so one hard sample (near a mode boundary) does not set every sample's step size.
        """
        if not (math.isfinite(sigma_from) and sigma_from > 0 and math.isfinite(sigma_to) and sigma_to >= 0
                and sigma_to != sigma_from):
            raise ValueError(f"need sigma_from > 0, sigma_to >= 0 and sigma_to != sigma_from, got "
                             f"sigma_from={sigma_from}, sigma_to={sigma_to}")
        xf = self._flat(x).cpu()
        parts = [self._ode(xf[i:i + chunk], sigma_from, sigma_to, rtol, atol) for i in range(0, xf.shape[0], chunk)]
        return torch.cat(parts).reshape(x.shape).to(dtype=x.dtype, device=x.device)

    def _ode(self, xf: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float, atol: float) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        B = xf.shape[0]
        end = sigma_to if sigma_to > 0 else 1e-8 * float(self.stds.min())

        def f(u, y):
            xt = torch.from_numpy(y).reshape(B, self.D)
            return (xt - self.denoise(xt, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(f, (math.log(sigma_from), math.log(end)), xf.reshape(-1).numpy(), method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"exact ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(B, self.D)
