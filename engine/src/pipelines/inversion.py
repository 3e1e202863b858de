"""Inversion: a real image to the noise that the sampler turns back into it.

ODE inversion (``kind="ode"``): the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
Eq. 4) run upward, from the image at the sampling schedule's lowest positive level to its top, by the same solver's
plan on the reversed schedule (``edmrt.schedules.upward``), through the same engine and fused step as sampling:
Euler is DDIM inversion (Song et al. 2021, Eq. 13 run backward), ``dpmpp_2m`` is DPM-Solver++(2M) inversion
(diffusers' ``DPMSolverMultistepInverseScheduler``).  Sampling from the result with the plan it inverted
(``Inversion.sampler_args``; ``Sampler.sample(..., inversion=inv)``) reconstructs the image, up to the error of the
two discretisations, which falls with the steps.  The image is taken to sit at the lowest level (``sigma_min``):
at sigma = 0 the ODE's d is undefined.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import Model
from ..sampler import Sampler
from ..schedules import upward
from ..solvers import UPWARD_SOLVERS, build_plan

__all__ = ["Inversion", "invert", "KINDS"]

KINDS = ("ode",)


@dataclass(frozen=True)
class Inversion:
    """What ``invert`` reached: the state at ``sigma_end`` (the top of the sampling schedule it inverts)."""

    latents: torch.Tensor          # (N, *sample_shape) float32, the state at sigma_end
    sigma_end: float               # the level the inversion reached: the sampling schedule's t_0
    kind: str                      # "ode"
    solver: str
    sigmas: np.ndarray             # the sampling schedule it inverts, t_0 = sigma_end ... t_N
    options: dict = field(default_factory=dict)
    nfe: int = 0                   # network evaluations the inversion took

    @property
    def sampler_args(self) -> dict:
        """``Sampler`` keywords that sample back along the plan inverted: ``Sampler(model, **inv.sampler_args)``."""
        return dict(solver=self.solver, steps=int(self.sigmas.size - 1), schedule=self.sigmas.tolist(), **self.options)


def _as_state(images, model: Model, latents: bool) -> torch.Tensor:
    """The images as the model's state: (N, *sample_shape) floating point in the data's range ([-1, 1] for pixel
    models), or uint8 images (0..255, mapped to [-1, 1]); with ``latents`` the state itself (floating point).
    ValueError naming what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor of shape (N, {', '.join(map(str, model.sample_shape))}), got "
                         f"{type(images).__name__}")
    if model.decoder is not None and not latents:
        raise ValueError("images: this model samples latents through a decoder; inverting its images needs the VAE "
                         "encoder, which edmrt.invert does not run yet: encode them yourself and pass the latents "
                         "(edmrt.invert(model, latents, latents=True))")
    if images.dtype == torch.uint8 and not latents:
        images = images.float() / 127.5 - 1.0
    if not images.is_floating_point() or tuple(images.shape[1:]) != tuple(model.sample_shape) or images.ndim < 2:
        raise ValueError(f"images must be floating point (or uint8) of shape (N, {', '.join(map(str, model.sample_shape))}),"
                         f" got {images.dtype} {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite (no NaN or Inf)")
    return images.detach().float()


def invert(model: Model, images, solver: str = "dpmpp_2m", steps: int | None = None, cond=None,
           guidance: float | None = None, uncond=None, kind: str = "ode", schedule=None, backend="auto",
           device=None, latents: bool = False, **options) -> Inversion:
    """Invert ``images`` (module docstring): the noise that ``solver`` with ``steps`` on ``schedule`` (the model
    card's defaults where None) samples back into them, under the same ``cond`` / ``guidance`` / ``uncond``.

    ==========  ===========================================================================================
    images      (N, *sample_shape): floating point in the data's range, or uint8 images; with
                ``latents=True`` the state itself (for a latent model, VAE latents you encoded)
    solver      one of ``edmrt.solvers.UPWARD_SOLVERS`` (deterministic ODE solvers)
    kind        "ode" (the probability-flow ODE run upward)
    backend     as ``Sampler``'s; the inversion and its reconstruction share it
    options     the solver's options (``dpmpp_2m(first_order_last=True)``: diffusers' inverse scheduler's
                lower_order_final below 15 steps)
    ==========  ===========================================================================================

    ValueError names an unknown kind, a solver that does not run upward, images of the wrong shape or values."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if solver not in UPWARD_SOLVERS:
        raise ValueError(f"solver {solver!r} does not run upward (an inversion); expected one of {list(UPWARD_SOLVERS)}")
    if not isinstance(model, Model):
        raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
    x = _as_state(images, model, latents)
    forward = Sampler(model, solver=solver, steps=steps, schedule=schedule, backend=backend, device=device,
                      **options)
    plan = build_plan(solver, upward(forward.plan.sigmas, model.sigma_min), model.precond, **options)
    up = Sampler(model, plan=plan, backend=forward.backend, device=forward.device)
    seeds = list(range(x.shape[0]))   # an ODE plan draws no noise: the seeds key nothing
    with torch.inference_mode():
        end = up.sample(seeds, cond=cond, guidance=guidance, uncond=uncond, x_init=x, output="latent")
    return Inversion(latents=end, sigma_end=float(plan.sigmas[-1]), kind=kind, solver=solver,
                     sigmas=np.asarray(forward.plan.sigmas), options=dict(options), nfe=plan.nfe)
