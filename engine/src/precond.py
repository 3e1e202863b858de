"""Preconditioning: D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).

Each class is one column of Karras et al. (2022) Table 1 (arXiv 2206.00364), or the
parameterisation of a foreign model (epsilon, v or x0 prediction).  ``coefficients(sigma)``
returns ``(c_skip, c_out, c_in, c_noise)`` as float64 arrays shaped like ``sigma``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .checks import is_real
from .schedules import cosine_time, iddpm_sigmas, vp_sigma_inv

__all__ = [
    "Precond", "Identity", "EDMPrecond", "ConsistencyPrecond", "VPPrecond", "VEPrecond", "IDDPMPrecond",
    "EpsilonPrecond", "VPredictionPrecond", "X0Precond", "LCMPrecond", "FlowPrecond", "WuerstchenPrecond", "PRECONDS",
    "sigmas_from_alphas_cumprod",
]


def _sigma(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0.0):
        raise ValueError(f"sigma must be finite and > 0 for preconditioning, got {s.tolist()}")
    return s


def _positive(name: str, value) -> float:
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Precond:
    """Base class: subclasses define ``coefficients`` and are frozen dataclasses (hashable, JSON-able)."""

    name = "precond"

    def coefficients(self, sigma) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = {"name": self.name}
        for k, v in vars(self).items():
            d[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return d


@dataclass(frozen=True)
class Identity(Precond):
    """The network already returns D(x; sigma) and takes sigma: c_skip = 0, c_out = 1, c_in = 1, c_noise = sigma."""

    name = "identity"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        c_skip = np.zeros_like(s)
        c_out = np.ones_like(s)
        c_in = np.ones_like(s)
        c_noise = s.copy()
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class EDMPrecond(Precond):
    """EDM column of Table 1 (Eq. 7): c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4.

    ``prediction="v_prediction"`` negates c_out, as diffusers' EDM schedulers do for v-trained networks
    (``EDMEulerScheduler.precondition_outputs``, diffusers 0.42.1; Playground v2.5 is "epsilon").
    ``noise="atan"`` is the noise input c_noise = atan(sigma) * 2 / pi of diffusers'
    ``CosineDPMSolverMultistepScheduler.precondition_noise`` (Stable Audio); the EDM schedulers use "log" whatever
    their ``sigma_schedule``.  The defaults are EDM's own."""

    sigma_data: float = 0.5
    prediction: str = "epsilon"
    noise: str = "log"
    name = "edm"

    def __post_init__(self):
        _positive("sigma_data", self.sigma_data)
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {self.prediction!r}")
        if self.noise not in ("log", "atan"):
            raise ValueError(f"noise must be 'log' (ln(sigma) / 4) or 'atan' (atan(sigma) * 2 / pi), "
                             f"got {self.noise!r}")

    def coefficients(self, sigma):
        s = _sigma(sigma)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / np.sqrt(s ** 2 + sd ** 2)
        if self.prediction == "v_prediction":
            c_out = -c_out
        c_in = 1.0 / np.sqrt(s ** 2 + sd ** 2)
        c_noise = 0.25 * np.log(s) if self.noise == "log" else np.arctan(s) * (2.0 / math.pi)
        return c_skip, c_out, c_in, c_noise

    def to_dict(self) -> dict:
        """EDM's defaults are left out, so plans and cards written before these fields read (and hash) the same."""
        d = {"name": self.name, "sigma_data": self.sigma_data}
        if self.prediction != "epsilon":
            d["prediction"] = self.prediction
        if self.noise != "log":
            d["noise"] = self.noise
        return d


@dataclass(frozen=True)
class ConsistencyPrecond(Precond):
    """Consistency-model parameterisation, Song et al. (2023, arXiv 2303.01469) Appendix C, on EDM's network input:
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), c_out = sigma_data (sigma - sigma_min) / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4.  At sigma = sigma_min, D(x) = x exactly (the
    boundary condition f(x, epsilon) = x); for sigma >> sigma_min it tends to EDM's, so a student starts from the teacher."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    name = "cm"

    def __post_init__(self):
        _positive("sigma_data", self.sigma_data)
        _positive("sigma_min", self.sigma_min)

    def coefficients(self, sigma):
        s = _sigma(sigma)
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((s - eps) ** 2 + sd ** 2)
        c_out = sd * (s - eps) / np.sqrt(s ** 2 + sd ** 2)
        c_in = 1.0 / np.sqrt(s ** 2 + sd ** 2)
        c_noise = 0.25 * np.log(s)
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class VPPrecond(Precond):
    """VP column of Table 1: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    name = "vp"

    def __post_init__(self):
        _positive("beta_d", self.beta_d)
        if not math.isfinite(self.beta_min) or self.beta_min < 0:
            raise ValueError(f"beta_min must be a finite number >= 0, got {self.beta_min!r}")
        if int(self.M) != self.M or self.M < 2:
            raise ValueError(f"M must be an integer >= 2, got {self.M!r}")

    def coefficients(self, sigma):
        s = _sigma(sigma)
        c_skip = np.ones_like(s)
        c_out = -s
        c_in = 1.0 / np.sqrt(s ** 2 + 1.0)
        c_noise = (self.M - 1) * vp_sigma_inv(s, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class VEPrecond(Precond):
    """VE column of Table 1: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    name = "ve"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        c_skip = np.ones_like(s)
        c_out = s.copy()
        c_in = np.ones_like(s)
        c_noise = np.log(0.5 * s)
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class IDDPMPrecond(Precond):
    """iDDPM column of Table 1: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = M - 1 - argmin_j |u_j - sigma| over the model's levels u_j (``iddpm_sigmas``)."""

    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    name = "iddpm"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        u = iddpm_sigmas(self.C_1, self.C_2, self.M)
        j = np.abs(u[None, :] - s.reshape(-1, 1)).argmin(axis=1).reshape(s.shape)
        c_skip = np.ones_like(s)
        c_out = -s
        c_in = 1.0 / np.sqrt(s ** 2 + 1.0)
        c_noise = (self.M - 1 - j).astype(np.float64)
        return c_skip, c_out, c_in, c_noise


def sigmas_from_alphas_cumprod(alphas_cumprod: Sequence[float]) -> np.ndarray:
    """Discrete-time model levels: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if a.ndim != 1 or a.size < 2 or not np.all(np.isfinite(a)) or np.any(a <= 0) or np.any(a > 1):
        raise ValueError("alphas_cumprod must be a 1-D sequence of >= 2 values in (0, 1]")
    if np.any(np.diff(a) >= 0):
        raise ValueError("alphas_cumprod must be strictly decreasing in t")
    return np.sqrt((1.0 - a) / a)


# Relative slack on the ends of a discrete table: float32 rounding (2^-24 = 6e-8) of diffusers' sigmas, with margin.
_LEVEL_SLACK = 1e-6


@dataclass(frozen=True, eq=False)
class _Foreign(Precond):
    """Shared part of the foreign parameterisations: the model sees the VP-scaled input
    x / sqrt(sigma^2 + sigma_data^2) and, as its noise input, either sigma itself (continuous)
    or the diffusers-style timestep t whose level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    matches sigma (``timestep="interpolate"``: linear in ln sigma between neighbouring t, as
    k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers' ``EulerDiscreteScheduler._sigma_to_t``;
    ``"nearest"``: the nearest t in ln sigma, the integer timestep that diffusers' multistep schedulers
    (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``: ``_sigma_to_t(...).round()``) and the
    integer-timestep ones (DDIM, LCM, TCD) give the network; ``"floor"``: the interpolated t truncated to an
    integer, what those multistep schedulers give on exponential and beta sigmas, whose fractional
    ``_sigma_to_t`` they store as int64).

    Levels may exceed the table's range by float32 rounding (relative ``_LEVEL_SLACK``): diffusers keeps
    its sigmas in float32, and its schedules are accepted as they are (clipped to the table's ends)."""

    alphas_cumprod: tuple | None = None
    timestep: str = "interpolate"
    sigma_data: float = 1.0
    _log_sigmas: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _positive("sigma_data", self.sigma_data)
        if self.timestep not in ("interpolate", "nearest", "floor"):
            raise ValueError(f"timestep must be 'interpolate', 'nearest' or 'floor', got {self.timestep!r}")
        if self.alphas_cumprod is not None:
            acp = tuple(float(a) for a in np.asarray(self.alphas_cumprod, dtype=np.float64).ravel())
            object.__setattr__(self, "alphas_cumprod", acp)
            object.__setattr__(self, "_log_sigmas", np.log(sigmas_from_alphas_cumprod(acp)))

    @property
    def discrete_sigmas(self) -> np.ndarray | None:
        return None if self._log_sigmas is None else np.exp(self._log_sigmas)

    def c_noise(self, s: np.ndarray) -> np.ndarray:
        if self._log_sigmas is None:
            return s.copy()
        ls = self._log_sigmas
        lo, hi = math.exp(ls[0]), math.exp(ls[-1])
        if np.any(s < lo * (1 - _LEVEL_SLACK)) or np.any(s > hi * (1 + _LEVEL_SLACK)):
            raise ValueError(f"sigma must lie within the model's discrete levels [{lo:.6g}, {hi:.6g}], got {s.tolist()}")
        t_grid = np.arange(ls.size, dtype=np.float64)
        ln_s = np.clip(np.log(s), ls[0], ls[-1])
        if self.timestep == "nearest":
            return np.abs(ls[None, :] - ln_s.reshape(-1, 1)).argmin(axis=1).reshape(s.shape).astype(np.float64)
        t = np.interp(ln_s, ls, t_grid)
        return np.floor(t) if self.timestep == "floor" else t

    def to_dict(self) -> dict:
        return {"name": self.name, "alphas_cumprod": None if self.alphas_cumprod is None else list(self.alphas_cumprod),
                "timestep": self.timestep, "sigma_data": self.sigma_data}


@dataclass(frozen=True, eq=False)
class EpsilonPrecond(_Foreign):
    """Epsilon prediction (x = x_0 + sigma eps, F = eps): c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""

    name = "epsilon"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        c_skip = np.ones_like(s)
        c_out = -s
        c_in = 1.0 / np.sqrt(s ** 2 + self.sigma_data ** 2)
        return c_skip, c_out, c_in, self.c_noise(s)


@dataclass(frozen=True, eq=False)
class VPredictionPrecond(_Foreign):
    """v prediction (Salimans & Ho 2022, v = alpha eps - sigma_vp x_0), in EDM space:
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = -sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""

    name = "v"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = -s * sd / np.sqrt(s ** 2 + sd ** 2)
        c_in = 1.0 / np.sqrt(s ** 2 + sd ** 2)
        return c_skip, c_out, c_in, self.c_noise(s)


@dataclass(frozen=True, eq=False)
class X0Precond(_Foreign):
    """x0 ("sample") prediction (F = x_0): c_skip = 0, c_out = 1, c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""

    name = "x0"

    def coefficients(self, sigma):
        s = _sigma(sigma)
        c_skip = np.zeros_like(s)
        c_out = np.ones_like(s)
        c_in = 1.0 / np.sqrt(s ** 2 + self.sigma_data ** 2)
        return c_skip, c_out, c_in, self.c_noise(s)


_LCM_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _x0_coefficients(prediction: str, s: np.ndarray, sd: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) with x0 = c_skip x + c_out F for an epsilon, v or x0 ("sample") network on the input
    x_vp = alpha x, alpha = 1 / sqrt(sigma^2 + sd^2) (``EpsilonPrecond``, ``VPredictionPrecond``, ``X0Precond``)."""
    if prediction == "epsilon":
        return np.ones_like(s), -s
    if prediction == "v_prediction":
        return sd ** 2 / (s ** 2 + sd ** 2), -s * sd / np.sqrt(s ** 2 + sd ** 2)
    return np.zeros_like(s), np.ones_like(s)


@dataclass(frozen=True, eq=False)
class LCMPrecond(_Foreign):
    """Latent consistency models' parameterisation (Luo et al. 2023, arXiv 2310.04378, adopting the consistency
    models' f = c_skip x + c_out F of Song et al. 2023), as diffusers' ``LCMScheduler.step`` applies it:
    denoised = c_out_bc(t) x0_pred + c_skip_bc(t) x_vp with the discrete-time boundary-condition scalings
    (``get_scalings_for_boundary_condition_discrete``) of the scaled timestep u = timestep_scaling t:
    c_skip_bc = sd_bc^2 / (u^2 + sd_bc^2), c_out_bc = u / sqrt(u^2 + sd_bc^2), sd_bc = 0.5.

    In edmrt's VE state x = x_vp / alpha (alpha = sqrt(alpha_bar_t) = c_in) and x0_pred = c_skip_p x + c_out_p F
    for the network's ``prediction`` ("epsilon", "v_prediction" or "sample", ``_x0_coefficients``), so
    D = (c_out_bc c_skip_p + c_skip_bc c_in) x + c_out_bc c_out_p F:  c_skip = c_out_bc c_skip_p + c_skip_bc c_in,
    c_out = c_out_bc c_out_p, c_in = 1 / sqrt(sigma^2 + sigma_data^2) (sigma_data = 1: the VP input), c_noise = t
    (``timestep``: the nearest discrete timestep by default, LCM's integer timesteps).  The ``lcm`` and ``tcd``
    solvers take this D as their x0 (``solvers.fewstep``).  ``alphas_cumprod`` is required."""

    timestep: str = "nearest"
    prediction: str = "epsilon"
    timestep_scaling: float = 10.0
    boundary_sigma_data: float = 0.5
    name = "lcm"

    def __post_init__(self):
        super().__post_init__()
        if self.alphas_cumprod is None:
            raise ValueError("alphas_cumprod is required for LCMPrecond (the boundary condition uses discrete "
                             "timesteps)")
        if self.prediction not in _LCM_PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(_LCM_PREDICTIONS)}, got {self.prediction!r}")
        _positive("timestep_scaling", self.timestep_scaling)
        _positive("boundary_sigma_data", self.boundary_sigma_data)

    def coefficients(self, sigma):
        s = _sigma(sigma)
        t = self.c_noise(s)
        u, sd_bc = self.timestep_scaling * t, self.boundary_sigma_data
        c_skip_bc = sd_bc ** 2 / (u ** 2 + sd_bc ** 2)
        c_out_bc = u / np.sqrt(u ** 2 + sd_bc ** 2)
        c_in = 1.0 / np.sqrt(s ** 2 + self.sigma_data ** 2)
        c_skip_p, c_out_p = _x0_coefficients(self.prediction, s, self.sigma_data)
        return c_out_bc * c_skip_p + c_skip_bc * c_in, c_out_bc * c_out_p, c_in, t

    def to_dict(self) -> dict:
        return {**super().to_dict(), "prediction": self.prediction, "timestep_scaling": self.timestep_scaling,
                "boundary_sigma_data": self.boundary_sigma_data}


@dataclass(frozen=True)
class FlowPrecond(Precond):
    """Velocity-predicting rectified-flow networks (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024,
    "Scaling Rectified Flow Transformers", SD3, Sec. 2): x_t = (1 - t) x_0 + t eps, the network predicts
    v = eps - x_0 at time ``num_train_timesteps * t`` (diffusers' ``FlowMatchEulerDiscreteScheduler``).

    This is EDM's form with scaling s(t) = 1 - t and sigma(t) = t / (1 - t) (Karras et al. 2022, Eq. 4 and Table 1's
    general form): edmrt's state is x = x_t / (1 - t) = x_0 + sigma eps, so 1 - t = 1 / (1 + sigma), the network's
    input is x_t = x / (1 + sigma) and x_0 = x_t - t v:
    c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_in = 1 / (1 + sigma),
    c_noise = num_train_timesteps * sigma / (1 + sigma)."""

    num_train_timesteps: float = 1000.0
    name = "flow"

    def __post_init__(self):
        object.__setattr__(self, "num_train_timesteps", _positive("num_train_timesteps", self.num_train_timesteps))

    def coefficients(self, sigma):
        s = _sigma(sigma)
        a = 1.0 / (1.0 + s)
        return a, -s * a, a.copy(), self.num_train_timesteps * s * a


@dataclass(frozen=True)
class WuerstchenPrecond(Precond):
    """Wuerstchen's and Stable Cascade's parameterisation (Pernias et al. 2024, "Wuerstchen", Sec. 4; diffusers'
    ``DDPMWuerstchenScheduler`` and ``StableCascadeUNet``): epsilon prediction over continuous time t in [0, 1]
    with the clamped cosine schedule (``schedules.cosine_sigma``: alpha_bar(t) of Nichol & Dhariwal 2021, Eq. 17).

    In EDM's state x = x_vp / sqrt(alpha_bar) = x_0 + sigma eps the network sees x_vp = x / sqrt(sigma^2 + 1) and
    its ``timestep_ratio`` t(sigma) (``schedules.cosine_time``): c_skip = 1, c_out = -sigma, c_in =
    1 / sqrt(sigma^2 + 1), c_noise = t(sigma)."""

    s: float = 0.008
    scaler: float = 1.0
    name = "wuerstchen"

    def __post_init__(self):
        object.__setattr__(self, "s", _positive("s", self.s))
        object.__setattr__(self, "scaler", _positive("scaler", self.scaler))

    def coefficients(self, sigma):
        s = _sigma(sigma)
        return np.ones_like(s), -s, 1.0 / np.sqrt(s ** 2 + 1.0), cosine_time(s, self.s, self.scaler)


PRECONDS = {
    "identity": Identity, "edm": EDMPrecond, "cm": ConsistencyPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond,
    "epsilon": EpsilonPrecond, "v": VPredictionPrecond, "x0": X0Precond, "lcm": LCMPrecond, "flow": FlowPrecond,
    "wuerstchen": WuerstchenPrecond,
}


def precond_from_dict(d: dict) -> Precond:
    """Inverse of ``Precond.to_dict`` (used by the plan JSON round trip)."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in PRECONDS:
        raise ValueError(f"unknown preconditioning {name!r}; expected one of {sorted(PRECONDS)}")
    return PRECONDS[name](**d)
