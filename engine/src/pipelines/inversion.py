"""Inversion: a real image to the noise that the sampler turns back into it.

ODE inversion (``kind="ode"``): the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
Eq. 4) run upward, from the image at the sampling schedule's lowest positive level to its top, by the same solver's
plan on the reversed schedule (``edmrt.schedules.upward``), through the same engine and fused step as sampling:
Euler is DDIM inversion (Song et al. 2021, Eq. 13 run backward), ``dpmpp_2m`` is DPM-Solver++(2M) inversion
(diffusers' ``DPMSolverMultistepInverseScheduler``).  Sampling from the result with the plan it inverted
(``Inversion.sampler_args``; ``Sampler.sample(..., inversion=inv)``) reconstructs the image, up to the error of the
two discretisations, which falls with the steps.  The image is taken to sit at the lowest level (``sigma_min``):
at sigma = 0 the ODE's d is undefined.

DDPM inversion (``kind="ddpm"``, the edit-friendly inversion LEDITS++ uses; Huberman-Spiegelglas et al. 2024,
Sec. 3): a stochastic sampler (``dpmpp_2m_sde``: noise on every stage) and a path x_{t_i} = x_0 + t_i eps_i with
independent eps_i per level, ending at the image itself (x_{t_N} = x_0, the schedule stopping at a positive t_N);
each stage's noise map z_i = (x_{t_{i+1}} - mu_i(x_{t_i})) / n_i (their Eq. 5) is what makes the sampler's update
land on the next point.  The engine feeds the maps back in place of its Philox draws, so the reconstruction is
exact to float precision at any step count, and sampling with the same maps under another condition is the edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import Model
from ..progress import stage_progress
from ..plan import Plan
from ..sampler import Sampler
from ..schedules import upward
from ..solvers import UPWARD_SOLVERS, build_plan

__all__ = ["Inversion", "invert", "image_state", "KINDS"]

KINDS = ("ode", "ddpm")
DEFAULT_SOLVER = {"ode": "dpmpp_2m", "ddpm": "dpmpp_2m_sde"}


@dataclass(frozen=True)
class Inversion:
    """What ``invert`` reached: the state at ``sigma_end`` (the top of the sampling schedule it inverts), and for a
    DDPM inversion the noise maps of every stage of the plan it fitted."""

    latents: torch.Tensor          # (N, *sample_shape) float32, the state at sigma_end
    sigma_end: float               # the level the inversion reached: the sampling schedule's t_0
    kind: str                      # "ode" or "ddpm"
    solver: str
    sigmas: np.ndarray             # the sampling schedule it inverts, t_0 = sigma_end ... t_N
    options: dict = field(default_factory=dict)
    nfe: int = 0                   # network evaluations the inversion took
    noise_maps: torch.Tensor | None = None   # "ddpm": (stages, N, *sample_shape) float32, z per stage
    plan: Plan | None = None       # "ddpm": the sampling plan the maps are for

    @property
    def sampler_args(self) -> dict:
        """``Sampler`` keywords that sample back along the plan inverted: ``Sampler(model, **inv.sampler_args)``."""
        return dict(solver=self.solver, steps=int(self.sigmas.size - 1), schedule=self.sigmas.tolist(), **self.options)


def image_state(images, model: Model, latents: bool) -> torch.Tensor:
    """The images as the model's state: (N, *sample_shape) floating point in the data's range ([-1, 1] for pixel
    models), or uint8 images (0..255, mapped to [-1, 1]); with ``latents`` the state itself (floating point).  A
    latent model's images (N, 3, H, W) go through its VAE's encoder (``VAEDecoder.encode``: the latent
    distribution's mode, scaled as diffusers' pipelines scale it).  ValueError naming what is wrong."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor of shape (N, {', '.join(map(str, model.sample_shape))}), got "
                         f"{type(images).__name__}")
    if model.decoder is not None and not latents:
        encode = getattr(model.decoder, "encode", None)
        if not callable(encode):
            raise ValueError("images: this model's decoder has no encoder (edmrt.from_diffusers(..., vae=vae) gives "
                             "one); encode the images yourself and pass latents=True")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) floating point in [-1, 1] (or uint8) for a latent model, "
                             f"got {images.dtype} {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images must be finite (no NaN or Inf)")
        with torch.inference_mode():
            images = encode(images.detach().float())
        latents = True
    if images.dtype == torch.uint8 and not latents:
        images = images.float() / 127.5 - 1.0
    if not images.is_floating_point() or tuple(images.shape[1:]) != tuple(model.sample_shape) or images.ndim < 2:
        raise ValueError(f"images must be floating point (or uint8) of shape (N, {', '.join(map(str, model.sample_shape))}),"
                         f" got {images.dtype} {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite (no NaN or Inf)")
    return images.detach().float()


def invert(model: Model, images, solver: str | None = None, steps: int | None = None, cond=None,
           guidance: float | None = None, uncond=None, kind: str = "ode", schedule=None, backend="auto",
           device=None, latents: bool = False, seed: int = 0, progress=False, **options) -> Inversion:
    """Invert ``images`` (module docstring): the noise that ``solver`` with ``steps`` on ``schedule`` (the model
    card's defaults where None) samples back into them, under the same ``cond`` / ``guidance`` / ``uncond``.

    ==========  ===========================================================================================
    images      (N, *sample_shape): floating point in the data's range, or uint8 images; with
                ``latents=True`` the state itself (for a latent model, VAE latents you encoded)
    solver      "ode": one of ``edmrt.solvers.UPWARD_SOLVERS`` (deterministic ODE solvers; default dpmpp_2m);
                "ddpm": a solver with noise on every stage (default dpmpp_2m_sde; dpmpp_3m_sde)
    kind        "ode" (the probability-flow ODE run upward) or "ddpm" (edit-friendly noise maps)
    steps       network evaluations, both ways (None: the model card's)
    schedule    "ddpm": a named schedule is built with steps + 1 levels and stops at its last positive one
                (sigma_min), so that every stage adds noise; a list must stop at a positive level itself
    seed        "ddpm": the seed of the path's independent noises eps_i
    progress    True: a progress bar over the stages; or a callable given the stages done
    backend     as ``Sampler``'s; the inversion and its reconstruction share it
    options     the solver's options (``dpmpp_2m(first_order_last=True)``: diffusers' inverse scheduler's
                lower_order_final below 15 steps)
    ==========  ===========================================================================================

    ValueError names an unknown kind, a solver that does not run upward (or adds no noise, for "ddpm"), images
    of the wrong shape or values."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(model, Model):
        raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
    solver = DEFAULT_SOLVER[kind] if solver is None else solver
    if kind == "ddpm":
        return _invert_ddpm(model, image_state(images, model, latents), solver, steps, cond, guidance, uncond,
                            schedule, backend, device, seed, options, progress)
    if solver not in UPWARD_SOLVERS:
        raise ValueError(f"solver {solver!r} does not run upward (an inversion); expected one of {list(UPWARD_SOLVERS)}")
    x = image_state(images, model, latents)
    forward = Sampler(model, solver=solver, steps=steps, schedule=schedule, backend=backend, device=device,
                      **options)
    plan = build_plan(solver, upward(forward.plan.sigmas, model.sigma_min), model.precond, **options)
    up = Sampler(model, plan=plan, backend=forward.backend, device=forward.device)
    seeds = list(range(x.shape[0]))   # an ODE plan draws no noise: the seeds key nothing
    with torch.inference_mode():
        with stage_progress(progress, plan.stages, "invert") as tick:
            end = up.sample(seeds, cond=cond, guidance=guidance, uncond=uncond, x_init=x, output="latent",
                            progress=tick or False)
    return Inversion(latents=end, sigma_end=float(plan.sigmas[-1]), kind=kind, solver=solver,
                     sigmas=np.asarray(forward.plan.sigmas), options=dict(options), nfe=plan.nfe)


def _ddpm_plan(model: Model, solver: str, steps, schedule, backend, device, options) -> Sampler:
    """The stochastic sampler whose noise maps a DDPM inversion fits: its schedule stops at a positive level (the
    last stage lands on the image itself) and every stage adds noise."""
    if schedule is not None and not isinstance(schedule, str):
        forward = Sampler(model, solver=solver, steps=steps, schedule=schedule, backend=backend, device=device,
                          **options)
        if forward.plan.sigmas[-1] == 0.0:
            raise ValueError("schedule: a DDPM inversion's schedule must stop at a positive level (its last stage "
                             "lands on the image, which needs noise there), got one ending in 0")
    else:
        probe = Sampler(model, solver=solver, steps=steps, schedule=schedule, backend=backend, device=device,
                        **options)
        sigmas = probe.plan.sigmas
        if sigmas[-1] == 0.0:    # one level more, then stop at the last positive one: steps stages, all noisy
            sigmas = Sampler(model, solver=solver, steps=probe.steps + 1, schedule=schedule, backend=probe.backend,
                             device=probe.device, **options).plan.sigmas[:-1]
        forward = Sampler(model, plan=build_plan(solver, sigmas, model.precond, **options), backend=probe.backend,
                          device=probe.device)
    p = forward.plan
    if p.n_init != 0.0 or not bool(np.all(p.n > 0.0)) or not bool(np.all(p.commit)):
        raise ValueError(f"solver {solver!r} (with options {options}) has stages without noise: a DDPM inversion "
                         "needs noise on every stage; expected dpmpp_2m_sde or dpmpp_3m_sde with eta > 0")
    return forward


def _invert_ddpm(model, x0, solver, steps, cond, guidance, uncond, schedule, backend, device, seed, options,
                 progress=False):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    forward = _ddpm_plan(model, solver, steps, schedule, backend, device, options)
    sigmas = np.asarray(forward.plan.sigmas)
    N = x0.shape[0]
    # The path x_{t_i} = x_0 + t_i eps_i (independent eps_i, float64), ending at x_0 itself.
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((sigmas.size - 1,) + tuple(x0.shape), generator=gen, dtype=torch.float64)
    x64 = x0.double()
    path = [x64 + float(t) * e for t, e in zip(sigmas[:-1], eps)] + [x64]
    start = path[0].float()
    targets = torch.stack(path[1:])
    seeds = list(range(N))   # every stage's noise is given: the seeds key nothing
    with torch.inference_mode():
        maps = forward.fit_noise_maps(seeds, start, targets, cond=cond, guidance=guidance, uncond=uncond,
                                      progress=progress)
    return Inversion(latents=start, sigma_end=float(sigmas[0]), kind="ddpm", solver=solver, sigmas=sigmas,
                     options=dict(options), nfe=forward.plan.nfe, noise_maps=maps.cpu(),
                     plan=forward.plan)
