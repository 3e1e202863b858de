"""Noise schedules: ``sigmas(steps, ...) -> float64[steps + 1]``, strictly descending, ending in 0 (an explicit list
may stop at a positive level instead: ``given``, ``check_sigmas``; the ``cosine`` schedule stops at its t = 0, as
Stable Cascade's scheduler does).

``steps`` is N of EDM (Karras et al. 2022, arXiv 2206.00364): N noise levels
t_0 > ... > t_{N-1} > 0 followed by t_N = 0, so Heun with N = 18 makes 35
network evaluations, as in EDM's generate.py.  Every function validates its
arguments and raises ``ValueError`` naming the argument and its allowed range.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import numpy as np

from .checks import is_real

__all__ = [
    "SCHEDULES", "karras", "vp", "ve", "iddpm", "linear", "loglinear", "polyexponential", "flow", "flow_time",
    "flow_sigma", "FLOW_T_MAX", "cosine", "cosine_sigma", "cosine_time", "COSINE_CLAMP", "flux",
    "given", "make_sigmas", "upward", "MAX_STEPS", "SIGMA_LIMIT", "SIGMA_FLOOR", "RHO_RANGE", "vp_sigma", "vp_sigma_inv", "iddpm_sigmas", "check_sigmas", "check_range",
]


# ----------------------------------------------------------------------------- validation

# The most steps a schedule may have: 10,000 is 10x the longest reference solve here (and EDM's own 1,000-level
# iDDPM grid); beyond it a typo (steps=10**7) would run for minutes before anything is said.
MAX_STEPS = 10_000


# Rectified flow's t = 1 (pure noise) is sigma = infinity in EDM's state; edmrt's highest flow level (``flow_sigma``) is
# t = 1 - 2^-24 (sigma = 2^24 - 1 = 1.7e7): the network then sees x_t = (1 - 2^-24) x_t(1), which float32 cannot tell
# from x_t(1) (its relative spacing near 1 is 2^-24), and its time 1000 (1 - 2^-24) rounds to 1000 in float32.
FLOW_T_MAX = 1.0 - 2.0 ** -24


def flow_time(sigma) -> np.ndarray:
    """A rectified flow's time t of EDM noise level sigma: t = sigma / (1 + sigma) (float64)."""
    s = np.asarray(sigma, dtype=np.float64)
    return s / (1.0 + s)


def flow_sigma(t) -> np.ndarray:
    """EDM's noise level of flow time t in [0, 1]: sigma = t / (1 - t), with t capped at ``FLOW_T_MAX``."""
    t = np.minimum(np.asarray(t, dtype=np.float64), FLOW_T_MAX)
    if np.any(t < 0.0) or not np.all(np.isfinite(t)):
        raise ValueError(f"flow time t must lie in [0, 1], got {np.asarray(t).tolist()}")
    return t / (1.0 - t)



# The cosine schedule of continuous time t in [0, 1] (Nichol & Dhariwal 2021, "Improved DDPM", Eq. 17), as Wuerstchen
# and Stable Cascade use it (diffusers' ``DDPMWuerstchenScheduler._alpha_cumprod``): alpha_bar(t) =
# cos^2((g(t) + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2), clamped to COSINE_CLAMP, g(t) = 1 - (1 - t)^scaler
# for scaler > 1, t^scaler for scaler < 1, t itself at 1.  The clamp makes t = 0 the level 0.0100005 and t = 1 the
# level 99.995.
COSINE_CLAMP = (1e-4, 0.9999)


def _cosine_args(s, scaler) -> tuple[float, float]:
    return _check_positive("s", s), _check_positive("scaler", scaler)


def cosine_sigma(t, s: float = 0.008, scaler: float = 1.0) -> np.ndarray:
    """EDM's noise level of cosine-schedule time t in [0, 1] (``COSINE_CLAMP``): sigma = sqrt((1 - a) / a),
    a = alpha_bar(t) (float64)."""
    s, scaler = _cosine_args(s, scaler)
    t = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.any(t < 0.0) or np.any(t > 1.0):
        raise ValueError(f"cosine time t must lie in [0, 1], got {t.tolist()}")
    g = 1.0 - (1.0 - t) ** scaler if scaler > 1.0 else t ** scaler
    a = np.cos((g + s) / (1.0 + s) * math.pi / 2) ** 2 / math.cos(s / (1.0 + s) * math.pi / 2) ** 2
    a = np.clip(a, *COSINE_CLAMP)
    return np.sqrt((1.0 - a) / a)


def cosine_time(sigma, s: float = 0.008, scaler: float = 1.0) -> np.ndarray:
    """The inverse of ``cosine_sigma``: t = ((1 + s) (2 / pi) arccos(sqrt(a) cos(s / (1 + s) pi / 2)) - s), a =
    1 / (1 + sigma^2), then g^-1.  On the clamp's levels, where a range of t shares one level, t is the range's end:
    1 at the top (the time diffusers' pipelines give the network there, their first timestep) and 0 at the bottom."""
    s, scaler = _cosine_args(s, scaler)
    sig = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(sig)) or np.any(sig < 0.0):
        raise ValueError(f"sigma must be finite and >= 0, got {sig.tolist()}")
    a = 1.0 / (1.0 + sig ** 2)
    lo, hi = COSINE_CLAMP
    c = math.cos(s / (1.0 + s) * math.pi / 2)
    g = (1.0 + s) * (2.0 / math.pi) * np.arccos(np.clip(np.sqrt(a) * c, -1.0, 1.0)) - s
    g = np.clip(g, 0.0, 1.0)
    t = 1.0 - (1.0 - g) ** (1.0 / scaler) if scaler > 1.0 else g ** (1.0 / scaler)
    t = np.where(a <= lo * (1.0 + 1e-9), 1.0, t)
    return np.where(a >= hi * (1.0 - 1e-12), 0.0, t)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}] (schedules.MAX_STEPS), got {steps}")
    return int(steps)


def _check_positive(name: str, value) -> float:
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


# The largest noise level a schedule may reach: far above any model's (EDM 80, VE 100, VP 152), small enough
# that the schedules' squares and powers stay finite in float64 (a sigma_max of 1e300 overflowed VE's t = sigma^2).
SIGMA_LIMIT = 1e10
# The smallest positive noise level: below it float32 updates divide by sigma and overflow (d = (x - D) / sigma).
SIGMA_FLOOR = 1e-6
RHO_RANGE = (1e-2, 1e2)  # Karras' rho (7) and polyexponential's (1): powers beyond this range underflow

def check_range(sigma_min, sigma_max) -> tuple[float, float]:
    """(sigma_min, sigma_max) as floats with 0 < sigma_min < sigma_max <= SIGMA_LIMIT, or ValueError naming the one
    that is not."""
    lo = _check_positive("sigma_min", sigma_min)
    hi = _check_positive("sigma_max", sigma_max)
    if hi > SIGMA_LIMIT:
        raise ValueError(f"sigma_max must be <= {SIGMA_LIMIT:g} (schedules.SIGMA_LIMIT), got {sigma_max!r}")
    if lo < SIGMA_FLOOR:
        raise ValueError(f"sigma_min must be >= {SIGMA_FLOOR:g} (schedules.SIGMA_FLOOR), got {sigma_min!r}")
    if lo >= hi:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={lo!r} >= sigma_max={hi!r}")
    return lo, hi


def _numeric(name: str, sigmas) -> np.ndarray:
    """A sequence of real numbers as float64 (strings, bools and nested lists refused by name)."""
    if isinstance(sigmas, (str, bytes, dict)) or not hasattr(sigmas, "__len__"):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(sigmas).__name__} {sigmas!r:.60}")
    values = sigmas.tolist() if hasattr(sigmas, "tolist") else list(sigmas)
    if not all(is_real(v) for v in values):
        raise ValueError(f"{name} must hold real numbers only, got {values!r:.120}")
    return np.asarray(values, dtype=np.float64)


def check_sigmas(sigmas, name: str = "sigmas") -> np.ndarray:
    """Validate a full schedule t_0 > ... > t_N: 1-D float64, finite, >= 2 entries, strictly descending, the last
    entry 0 (EDM's t_N = 0: the result is denoised) or a positive level where sampling stops (diffusers'
    ``final_sigmas_type="sigma_min"``: the result keeps that noise), the positive levels within [SIGMA_FLOOR,
    SIGMA_LIMIT].  Or a schedule that runs upward (an inversion: the probability-flow ODE from a clean image at
    t_0 to noise at t_N): strictly ascending, every level positive and within [SIGMA_FLOOR, SIGMA_LIMIT]."""
    s = sigmas if isinstance(sigmas, np.ndarray) and sigmas.dtype == np.float64 else _numeric(name, sigmas)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 values (t_0 ... t_N), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite (no NaN or Inf), got {s.tolist()}")
    if s[0] < s[-1]:   # upward: an inversion
        if np.any(np.diff(s) <= 0.0):
            raise ValueError(f"{name} runs upward (an inversion) and must be strictly ascending, got {s.tolist()}")
        if s[0] < SIGMA_FLOOR or s[-1] > SIGMA_LIMIT:
            raise ValueError(f"{name} runs upward (an inversion) and must lie in [{SIGMA_FLOOR:g}, {SIGMA_LIMIT:g}] "
                             f"(it starts at a positive level), got {s[0]!r} ... {s[-1]!r}")
        return s
    if s[-1] < 0.0:
        raise ValueError(f"{name} must end in 0 (EDM's t_N = 0) or a positive level, got last value {s[-1]!r}")
    if np.any(s[:-1] <= 0.0):
        raise ValueError(f"{name}[:-1] must all be > 0, got {s.tolist()}")
    if np.any(np.diff(s) >= 0.0):
        raise ValueError(f"{name} must be strictly descending, got {s.tolist()}")
    last = s[-1] if s[-1] > 0.0 else s[-2]
    if s[0] > SIGMA_LIMIT or last < SIGMA_FLOOR:
        raise ValueError(f"{name} must lie in [{SIGMA_FLOOR:g}, {SIGMA_LIMIT:g}] but for a final 0 "
                         f"(schedules.SIGMA_FLOOR, SIGMA_LIMIT), got {s[0]!r} ... {last!r}")
    return s


def _check_rho(rho) -> float:
    rho = _check_positive("rho", rho)
    if not RHO_RANGE[0] <= rho <= RHO_RANGE[1]:
        raise ValueError(f"rho must be in [{RHO_RANGE[0]:g}, {RHO_RANGE[1]:g}] (schedules.RHO_RANGE), got {rho!r}")
    return rho


def _append_zero(s: np.ndarray) -> np.ndarray:
    return check_sigmas(np.concatenate([np.asarray(s, dtype=np.float64), [0.0]]))


def _ramp(steps: int) -> np.ndarray:
    """i / (N - 1) for i = 0..N-1; a single step sits at 0 (sigma_max)."""
    if steps == 1:
        return np.zeros(1)
    return np.arange(steps, dtype=np.float64) / (steps - 1)


def upward(sigmas, sigma_min: float) -> np.ndarray:
    """The schedule that inverts a sampling schedule: its levels in reverse, the final 0 replaced by ``sigma_min``
    (where a clean image is taken to sit: d = (x - D) / sigma is undefined at 0), a repeat of it dropped.  The
    inversion then runs from the image up to the sampling schedule's t_0."""
    s = check_sigmas(sigmas)
    if s[0] < s[-1]:
        raise ValueError(f"sigmas must be a sampling (descending) schedule to invert, got {s.tolist()}")
    lo = _check_positive("sigma_min", sigma_min)
    rev = s[::-1].copy()
    if rev[0] == 0.0:
        rev = rev[1:] if rev[1] <= lo * (1 + 1e-12) else np.concatenate([[lo], rev[1:]])
    if rev.size < 2:
        raise ValueError(f"the schedule {s.tolist()} has no levels above sigma_min={lo!r} to invert through")
    return check_sigmas(rev, "the inversion schedule")


# ----------------------------------------------------------------------------- schedules

def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """EDM time steps, Karras et al. (2022) Eq. 5:
    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t_N = 0."""
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    rho = _check_rho(rho)
    inv = 1.0 / rho
    t = (hi ** inv + _ramp(n) * (lo ** inv - hi ** inv)) ** rho
    return _append_zero(t)


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """VP noise level, Karras et al. (2022) Table 1: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """Inverse of ``vp_sigma``, Table 1: t = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return (np.sqrt(beta_min ** 2 + 2.0 * beta_d * np.log1p(sigma ** 2)) - beta_min) / beta_d


def vp(steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
       beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> np.ndarray:
    """VP time steps, Karras et al. (2022) Table 1: uniform in t from 1 to eps_s, sigma = sigma_vp(t).

    With ``sigma_min``/``sigma_max`` given, t runs uniformly between their VP times instead
    (Table 1's schedule is ``sigma_max = vp_sigma(1)``, ``sigma_min = vp_sigma(eps_s)``).
    """
    n = _check_steps(steps)
    beta_d = _check_positive("beta_d", beta_d)
    if not is_real(beta_min) or not math.isfinite(float(beta_min)) or beta_min < 0:
        raise ValueError(f"beta_min must be a finite number >= 0, got {beta_min!r}")
    eps_s = _check_positive("eps_s", eps_s)
    if eps_s >= 1.0:
        raise ValueError(f"eps_s must be in (0, 1), got {eps_s!r}")
    t_max, t_min = 1.0, eps_s
    if sigma_min is not None or sigma_max is not None:
        lo, hi = check_range(vp_sigma(t_min, beta_d, beta_min) if sigma_min is None else sigma_min,
                              vp_sigma(t_max, beta_d, beta_min) if sigma_max is None else sigma_max)
        t_min, t_max = float(vp_sigma_inv(lo, beta_d, beta_min)), float(vp_sigma_inv(hi, beta_d, beta_min))
    t = t_max + _ramp(n) * (t_min - t_max)
    return _append_zero(vp_sigma(t, beta_d, beta_min))


def ve(steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> np.ndarray:
    """VE time steps, Karras et al. (2022) Table 1: t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma = sqrt(t)."""
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    t = hi ** 2 * (lo ** 2 / hi ** 2) ** _ramp(n)
    return _append_zero(np.sqrt(t))


def iddpm_sigmas(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> np.ndarray:
    """The M + 1 discrete noise levels u_0 > ... > u_M = 0 of iDDPM, Karras et al. (2022) Table 1:
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1), alpha_bar_j = sin^2(pi/2 j / (M (C_2 + 1)))."""
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 2:
        raise ValueError(f"M must be an integer >= 2, got {M!r}")
    C_1 = _check_positive("C_1", C_1)
    C_2 = _check_positive("C_2", C_2)
    j = np.arange(M + 1, dtype=np.float64)
    alpha_bar = np.sin(0.5 * math.pi * j / (M * (C_2 + 1.0))) ** 2
    u = np.zeros(M + 1)
    for k in range(M, 0, -1):
        u[k - 1] = math.sqrt((u[k] ** 2 + 1.0) / max(alpha_bar[k - 1] / alpha_bar[k], C_1) - 1.0)
    return u


def iddpm(steps: int, sigma_min: float = 0.002, sigma_max: float = 81.0, C_1: float = 0.001, C_2: float = 0.008,
          M: int = 1000, model_sigmas: Sequence[float] | None = None) -> np.ndarray:
    """iDDPM time steps, Karras et al. (2022) Table 1: N of the model's discrete levels u_j in
    [sigma_min, sigma_max], evenly spaced in index (t_i = u_{round(j_0 + (j_max - j_0) i / (N - 1))}).

    ``model_sigmas`` snaps to a given model's discrete sigmas (e.g. ``sqrt((1 - acp) / acp)`` of
    a diffusers ``alphas_cumprod``) instead of iDDPM's cosine levels.
    """
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    if model_sigmas is None:
        u = iddpm_sigmas(C_1, C_2, M)
    else:
        u = np.asarray(model_sigmas, dtype=np.float64)
        if u.ndim != 1 or not np.all(np.isfinite(u)) or np.any(u < 0):
            raise ValueError("model_sigmas must be a 1-D sequence of finite values >= 0")
    levels = np.sort(u[(u >= lo) & (u <= hi)])[::-1]
    if levels.size < n:
        raise ValueError(f"steps must be <= {levels.size} (the model's discrete sigmas in "
                         f"[sigma_min={lo}, sigma_max={hi}]), got {n}")
    idx = np.floor((levels.size - 1) * _ramp(n) + 0.5).astype(np.int64)
    return _append_zero(levels[idx])


def linear(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> np.ndarray:
    """Linear in sigma: t_i = sigma_max + i/(N-1) (sigma_min - sigma_max)."""
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    return _append_zero(hi + _ramp(n) * (lo - hi))


def loglinear(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> np.ndarray:
    """Linear in log sigma (k-diffusion's "exponential"): ln t_i = ln sigma_max + i/(N-1) (ln sigma_min - ln sigma_max)."""
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    return _append_zero(np.exp(math.log(hi) + _ramp(n) * (math.log(lo) - math.log(hi))))


def polyexponential(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 1.0) -> np.ndarray:
    """Polynomial in log sigma (k-diffusion's "polyexponential"):
    ln t_i = ln sigma_min + (1 - i/(N-1))^rho (ln sigma_max - ln sigma_min); rho = 1 is ``loglinear``."""
    n = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    rho = _check_rho(rho)
    return _append_zero(np.exp(math.log(lo) + (1.0 - _ramp(n)) ** rho * (math.log(hi) - math.log(lo))))


def flow(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, shift: float = 1.0) -> np.ndarray:
    """Rectified-flow time steps as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes them (no
    dynamic shifting): u linear from t(sigma_max) to t(sigma_min) in ``steps`` levels, then shifted,
    t = shift u / (1 + (shift - 1) u) (SD3's timestep shift, Esser et al. 2024, Sec. 5.3.2), as EDM levels
    sigma = t / (1 - t) (``flow_sigma``), then 0.  A model's range is already its scheduler's shifted one, which
    diffusers shifts again here; ``shift`` 1 is linear in t."""
    steps = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    shift = _check_positive("shift", shift)
    u = np.linspace(float(flow_time(hi)), float(flow_time(lo)), steps)
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return _append_zero(flow_sigma(t))


def flux(steps: int, sigma_max: float = 80.0, shift: float = 1.0) -> np.ndarray:
    """Flux's time steps (``FluxPipeline``: ``sigmas = linspace(1, 1 / N, N)`` given to
    ``FlowMatchEulerDiscreteScheduler.set_timesteps``): u linear from t(sigma_max) (1 for a flow model's range) to
    1 / N in ``steps`` levels (t(sigma_max) = 1 from the flow's top level ``FLOW_T_MAX``), shifted t = shift u / (1 + (shift - 1) u) (the dynamic shift e^mu of the model's
    resolution, ``adapters.flux.dynamic_shift``), as EDM levels (``flow_sigma``), then 0."""
    steps = _check_steps(steps)
    hi = _check_positive("sigma_max", sigma_max)
    shift = _check_positive("shift", shift)
    # A range up to the flow's t = 1 (sigma FLOW_T_MAX / (1 - FLOW_T_MAX)) starts at u = 1, which every shift keeps.
    top = 1.0 if hi >= (FLOW_T_MAX / (1.0 - FLOW_T_MAX)) * (1.0 - 1e-12) else float(flow_time(hi))
    u = np.linspace(top, 1.0 / steps, steps) if steps > 1 else np.array([top])
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return _append_zero(flow_sigma(t))


def cosine(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, s: float = 0.008,
           scaler: float = 1.0) -> np.ndarray:
    """Uniform steps in cosine-schedule time, as diffusers' ``DDPMWuerstchenScheduler.set_timesteps`` makes them
    (Stable Cascade's prior and decoder): t linear from t(sigma_max) to t(sigma_min) in ``steps + 1`` levels
    (``cosine_sigma``; for the model's own range t = 1 .. 0).  The schedule stops at sigma_min, as that scheduler's
    loop does at t = 0 (the clamp's level 0.01), rather than at 0."""
    steps = _check_steps(steps)
    lo, hi = check_range(sigma_min, sigma_max)
    t = np.linspace(float(cosine_time(hi, s, scaler)), float(cosine_time(lo, s, scaler)), steps + 1)
    levels = cosine_sigma(t, s, scaler)
    levels[0], levels[-1] = min(levels[0], hi), max(levels[-1], lo)
    return check_sigmas(levels, "the cosine schedule")


def given(steps: int, sigmas: Sequence[float]) -> np.ndarray:
    """An explicit list of noise levels (e.g. Align-Your-Steps anchors, or a diffusers scheduler's own sigmas).

    ``sigmas``: strictly descending positive values, optionally ending in 0.  ``steps + 1`` values are the full
    schedule t_0 .. t_N as it is: ending in 0, or in a positive t_N where sampling stops (diffusers'
    ``final_sigmas_type="sigma_min"``; ``scheduler_sigmas`` gives such lists).  Exactly ``steps`` positive values
    (and an optional trailing 0) are used as they are, then 0; other lengths are interpolated linearly in log sigma
    over a uniform index grid to ``steps`` values (as AYS does), then 0.
    """
    n = _check_steps(steps)
    s = _numeric("sigmas", sigmas)
    if s.ndim != 1 or s.size < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"sigmas must be finite (no NaN or Inf), got {s.tolist()}")
    if s.size == n + 1 and s[-1] > 0.0:   # the full schedule, stopping at a positive t_N
        return check_sigmas(s, "sigmas")
    if s[-1] == 0.0:
        s = s[:-1]
    if s.size == 0 or np.any(s <= 0.0):
        raise ValueError(f"sigmas must be > 0 (a single trailing 0 is allowed), got {list(sigmas)}")
    if np.any(np.diff(s) >= 0.0):
        raise ValueError(f"sigmas must be strictly descending, got {list(sigmas)}")
    if s.size != n:
        if s.size == 1:
            raise ValueError(f"sigmas must hold >= 2 positive values to interpolate to steps={n}, got {list(sigmas)}")
        xs = np.linspace(0.0, 1.0, s.size)
        s = np.exp(np.interp(_ramp(n), xs, np.log(s)))
    return _append_zero(s)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "karras": karras,
    "vp": vp,
    "ve": ve,
    "iddpm": iddpm,
    "linear": linear,
    "loglinear": loglinear,
    "polyexponential": polyexponential,
    "flow": flow,
    "flux": flux,
    "cosine": cosine,
}


def make_sigmas(schedule, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                shift: float = 1.0, options: dict | None = None) -> np.ndarray:
    """A schedule by name (``SCHEDULES``, given the range, rho, the flow shift and the entries of ``options`` (a
    model card's schedule parameters: the cosine schedule's s and scaler) where it takes them) or an explicit list of
    sigmas (``given``: used as it is, or interpolated log-linearly to ``steps`` levels)."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)} or a list of sigmas")
        fn = SCHEDULES[schedule]
        params = inspect.signature(fn).parameters
        given_kw = {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "shift": shift, **(options or {})}
        kw = {k: v for k, v in given_kw.items() if k in params and k != "steps"}
        return fn(steps, **kw)
    if isinstance(schedule, (Sequence, np.ndarray)) or hasattr(schedule, "tolist"):  # a list, an array, a tensor
        return given(steps, schedule)
    raise ValueError(f"schedule must be a name in {sorted(SCHEDULES)} or a list of sigmas, got {type(schedule).__name__}")
