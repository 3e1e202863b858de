"""Zero-shot inpainting and masked editing: the known pixels re-imposed on the denoiser's output at every stage
(Song et al. 2023, "Consistency Models", Alg. 4, with A = identity).

For a consistency model the algorithm is: x = y (1 - m) + t_0 z; then per level tau_n: x <- f(x, tau_n);
x <- y (1 - m) + x m; x <- x + sqrt(tau_{n+1}^2 - eps^2) z, with m = 1 where pixels are generated (the mask) and
y the image.  edmrt's consistency plan computes exactly f, then D + n z, per stage; ``InpaintEngine`` replaces the
network output F, where pixels are known, by the value whose denoised output is the image there:
F' = F + (1 - m) ((y - c_skip x_eval) / c_out - F), so D' = c_skip x_eval + c_out F' = y (1 - m) + D m (EDM Eq. 7),
and the fused step goes on as before.  The same replacement makes any plan whose stages all have c_out != 0 an
inpainter (for the ODE solvers it is the "replacement" baseline, D-side); the few-step samplers (consistency, TCD,
LCM) are Alg. 4.  A latent model's images and mask go through its VAE (the mask resized to the latents, nearest).
The result is composited at the end, y (1 - m) + x m, as Alg. 4's last step is.

Masked editing is the same call with another condition (``cond``): the masked region is regenerated under it.
The mask follows diffusers' inpainting convention: 1 (white) is generated, 0 (black) is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.lora import reading_weights
from ..checks import check_seeds
from ..engine import Engine
from ..kernels.philox import INITIAL_STREAM, philox_normal
from ..model import Model
from ..progress import stage_progress
from ..request import Request, make_request
from ..sampler import Sampler
from .inversion import image_state

__all__ = ["inpaint", "InpaintEngine"]


@dataclass(frozen=True)
class InpaintRequest(Request):
    known: torch.Tensor | None = None      # (B, *shape) float32: the image y
    keep: torch.Tensor | None = None       # (B, *shape) float32: 1 where y is kept (1 - m)


class InpaintEngine(Engine):
    """An engine that re-imposes known pixels on D at every stage (module docstring); the image and the mask are
    static buffers, so a CUDA graph replays any inpainting of this shape."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        zero = [s for s in range(self.plan.stages) if float(self.plan.c_out[s]) == 0.0]
        if zero:
            raise ValueError(f"plan {self.plan.solver!r} has stages {zero} with c_out = 0, where the network's output "
                             "does not reach D: known pixels cannot be re-imposed there")
        self.known = torch.zeros_like(self.x)
        self.keep = torch.zeros_like(self.x)
        self.F_mix = torch.zeros_like(self.F)

    def _network(self, stage: int, cond) -> torch.Tensor:
        F = super()._network(stage, cond)
        c_skip, c_out = float(self.plan.c_skip[stage]), float(self.plan.c_out[stage])
        target = (self.known - c_skip * self.x_eval) / c_out                   # F whose D is y
        rows = F.shape[0] // self.batch                                       # 2 with guidance: both halves
        view = (rows,) + tuple(self.x.shape)
        mixed = torch.lerp(F.view(view).float(), target.expand(view), self.keep.expand(view))
        self.F_mix.view(view).copy_(mixed)
        return self.F_mix

    def _copy_inputs(self, req) -> None:
        super()._copy_inputs(req)
        self.known.copy_(req.known)
        self.keep.copy_(req.keep)


def _mask(mask, images: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The mask as (N, *state_shape) float32 in {0, 1} (1: generate): given as (H, W), (1 or N, H, W) or
    (1 or N, 1 or C, H, W) at the images' resolution, bool or 0/1 values; resized to a latent state, nearest."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor (H, W), (N, H, W) or (N, 1, H, W), got {type(mask).__name__}")
    m = mask.detach().float() if mask.dtype == torch.bool or mask.is_floating_point() else None
    if m is None or not bool(torch.isfinite(m).all()) or not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must hold 0 (keep) and 1 (generate) only, as bool or float")
    N, H, W = images.shape[0], images.shape[-2], images.shape[-1]
    while m.ndim < 4:
        m = m.unsqueeze(0)
    if m.ndim != 4 or m.shape[-2:] != (H, W) or m.shape[0] not in (1, N) or m.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"mask must be (H, W), (1 or N, H, W) or (1 or N, 1 or C, H, W) with (H, W) = {(H, W)} "
                         f"and N = {N}, got {tuple(mask.shape)}")
    if tuple(state.shape[-2:]) != (H, W):
        m = torch.nn.functional.interpolate(m, size=tuple(state.shape[-2:]), mode="nearest")
    return m.expand(N, state.shape[1], *state.shape[2:]).contiguous()


def inpaint(model: Model, images, mask, cond=None, guidance: float | None = None, uncond=None, seeds=None,
            solver: str | None = None, steps: int | None = None, schedule=None, backend="auto", device=None,
            output: str | None = None, latents: bool = False, progress=False, **options) -> torch.Tensor:
    """Fill the masked pixels of ``images`` (module docstring); returns what ``Sampler.sample`` returns.

    ==========  ===========================================================================================
    images      (N, *sample_shape) in the data's range or uint8 (a latent model: (N, 3, H, W), encoded)
    mask        1 (True) where pixels are generated, 0 where kept: (H, W), (N, H, W) or (N, 1, H, W)
    cond        the condition the masked region is generated under (masked editing: another class)
    seeds       one per image (default 0 .. N-1): the initial noise and every stage's noise
    solver      as ``Sampler``'s (the model card's default: the consistency solver for digits-cd)
    progress    True: a progress bar over the stages; or a callable given the stages done
    ==========  ===========================================================================================

    ValueError names what is wrong: the images, the mask's shape or values, a plan with c_out = 0 stages."""
    if not isinstance(model, Model):
        raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
    raw = images
    y = image_state(images, model, latents)
    if y.ndim != 4:
        raise ValueError(f"inpaint takes image-shaped states (N, C, H, W); this model's are {tuple(y.shape[1:])}")
    m = _mask(mask, raw if isinstance(raw, torch.Tensor) and not latents else y, y)
    output = Sampler._check_output_for(model, output)
    sampler = Sampler(model, solver=solver, steps=steps, schedule=schedule, backend=backend, device=device,
                      **options)
    N = y.shape[0]
    seeds = list(range(N)) if seeds is None else check_seeds(seeds)
    if len(seeds) != N:
        raise ValueError(f"seeds: one per image ({N}), got {len(seeds)}")
    req = make_request(model.cond, model.sample_shape, sampler.device, seeds, cond, guidance, uncond)
    dev = sampler.device
    y, m = y.to(dev), m.to(dev)
    keep = 1.0 - m
    t0 = float(sampler.plan.sigmas[0])
    z = philox_normal(req.seeds, INITIAL_STREAM, model.sample_shape, torch.float32, dev)
    x_init = y * keep + t0 * z          # Alg. 4's start: the kept pixels plus t_0 z, t_0 z elsewhere
    req = InpaintRequest(req.seeds, req.cond, req.guidance, req.uncond, x_init, known=y, keep=keep)
    engine = InpaintEngine(sampler.backend, sampler.plan, N, model.sample_shape, dev, req.guidance is not None,
                           graph=sampler.graph, null_label=model.null_label, cond_inputs=model.cond)
    with stage_progress(progress, sampler.plan.stages, "inpaint") as tick, reading_weights(model):
        x = engine.run_request(req, tick)
    x = y * keep + x * m                # Alg. 4's composite
    return sampler.decode(x) if output == "image" else x
