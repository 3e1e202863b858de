"""Stable Cascade as one call: the prior (stage C) samples image embeddings from text, the decoder (stage B) samples
latents conditioned on them, the VQGAN (stage A) decodes those to pixels (Pernias et al. 2024, "Wuerstchen", Sec. 3;
diffusers' ``StableCascadePriorPipeline`` followed by ``StableCascadeDecoderPipeline``).

Each stage is an ordinary edmrt ``Sampler`` (its plan, backend, engines and CUDA graphs), by default the card's
``euler_ancestral`` on the ``cosine`` schedule, which is ``DDPMWuerstchenScheduler``'s DDPM step.  Between stages the
state is handed over as diffusers hands it: edmrt's final state x at the last level sigma_N (t = 0: 0.01) is the
pipeline's variance-preserving latents x_vp = x / sqrt(1 + sigma_N^2).
"""
from __future__ import annotations

import math

import torch

from ..backends.base import Backend
from ..checks import check_seeds
from ..model import Model
from ..sampler import Sampler

__all__ = ["CascadeSampler", "cascade", "OUTPUTS"]

OUTPUTS = ("image", "latent", "embeddings")
# Decoder seeds: each seed mixed by a multiplicative hash (Knuth's golden-ratio constant, odd so it permutes the
# integers mod 2^64), so that the decoder's Philox noise is not the prior's for the same seed.
_MIX, _MASK = 0x9E3779B97F4A7C15, (1 << 63) - 1


def decoder_seeds(seeds) -> list[int]:
    """The decoder's seeds of the prior's ``seeds`` (one per sample, fixed: the same seeds give the same images)."""
    return [((s + 1) * _MIX) & _MASK for s in check_seeds(seeds)]


def _vp_scale(plan) -> float:
    """1 / sqrt(1 + sigma_N^2): edmrt's final state -> the pipeline's latents (1 for a plan ending at 0)."""
    end = float(plan.sigmas[-1])
    return 1.0 / math.sqrt(1.0 + end * end)


def _stage_inputs(model: Model, given: dict | None, name: str) -> dict | None:
    """The entries of ``given`` that ``model`` takes (the prior's text, the decoder's pooled text)."""
    if given is None:
        return None
    if not isinstance(given, dict):
        raise ValueError(f"{name} must be a dict of conditioning tensors by name, got {type(given).__name__}")
    return {k: v for k, v in given.items() if k in model.cond_names}


class CascadeSampler:
    """Stable Cascade's prior and decoder, each a ``Sampler`` built once (``prior_*`` / ``decoder_*``: solver, steps
    and schedule, default the cards': 20 and 10 steps of ``euler_ancestral`` on the cosine schedule).

    The decoder's ``effnet`` input must have the prior's sample shape (both follow from the image size: at 1024 px
    the prior's (16, 24, 24) and the decoder's (4, 256, 256)): ValueError otherwise, naming both.  Safe to share
    between threads as the Samplers are."""

    def __init__(self, prior: Model, decoder: Model, prior_solver: str | None = None, prior_steps: int | None = None,
                 decoder_solver: str | None = None, decoder_steps: int | None = None,
                 backend: str | Backend = "auto", device=None, graph: bool = True, prior_schedule=None,
                 decoder_schedule=None):
        for name, m, want in (("prior", prior, "clip_text"), ("decoder", decoder, "effnet")):
            if not isinstance(m, Model) or want not in m.cond_names:
                raise ValueError(f"{name} must be an edmrt Model of Stable Cascade's {name} (with a {want!r} input: "
                                 f"edmrt.from_diffusers(StableCascadeUNet, DDPMWuerstchenScheduler)), got "
                                 f"{getattr(m, 'cond_names', type(m).__name__)}")
        effnet = next(c for c in decoder.cond if c.name == "effnet")
        if effnet.shape != prior.sample_shape:
            raise ValueError(f"decoder: its effnet input is {effnet.shape}, the prior samples {prior.sample_shape}: "
                             f"build the decoder with cond_shapes={{'effnet': {prior.sample_shape}}}")
        if decoder.decoder is None:
            raise ValueError("decoder: the decoder Model has no VQGAN (pass vae=vqgan to from_diffusers)")
        self.prior = Sampler(prior, prior_solver, prior_steps, backend, prior_schedule, device=device, graph=graph)
        self.decoder = Sampler(decoder, decoder_solver, decoder_steps, backend, decoder_schedule, device=device,
                               graph=graph)

    def sample(self, seeds, cond: dict, uncond: dict | None = None, guidance: float | None = 4.0,
               decoder_guidance: float | None = None, noise=None, decoder_noise=None, output: str = "image",
               progress=False) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 for N seeds (``output="latent"``: the decoder's latents, "embeddings": the
        prior's image embeddings, both as the pipelines return them).

        ``cond``: ``clip_text`` (N, tokens, C) and ``clip_text_pooled`` (N, 1, C) (a prior pipeline's
        ``prompt_embeds`` and ``prompt_embeds_pooled``), optionally ``clip_img``; ``uncond``: the negative ones,
        needed with guidance.  ``guidance``: the prior's CFG weight (diffusers' default 4), ``decoder_guidance`` the
        decoder's (None: off, as diffusers' default 0).  ``noise`` / ``decoder_noise``: each stage's standard-normal
        start instead of the seeds' Philox draws (the decoder's seeds are ``decoder_seeds(seeds)``)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if not isinstance(cond, dict) or "clip_text_pooled" not in cond:
            raise ValueError("cond must be a dict with the prompt's clip_text_pooled (and clip_text for the prior)")
        prior_uncond = _stage_inputs(self.prior.model, uncond, "uncond") if guidance is not None else None
        emb = self.prior.sample(seeds, cond=_stage_inputs(self.prior.model, cond, "cond"), guidance=guidance,
                                uncond=prior_uncond, noise=noise, output="latent", progress=progress)
        emb = emb * _vp_scale(self.prior.plan)
        if output == "embeddings":
            return emb
        dec_cond = {"clip_text_pooled": cond["clip_text_pooled"], "effnet": emb}
        dec_uncond = None
        if decoder_guidance is not None:
            if uncond is None or "clip_text_pooled" not in uncond:
                raise ValueError("uncond: decoder_guidance needs the negative prompt's clip_text_pooled")
            dec_uncond = {"clip_text_pooled": uncond["clip_text_pooled"]}   # effnet's unconditional rows: zeros
        latents = self.decoder.sample(decoder_seeds(seeds), cond=dec_cond, guidance=decoder_guidance,
                                      uncond=dec_uncond, noise=decoder_noise, output="latent", progress=progress)
        latents = latents * _vp_scale(self.decoder.plan)
        return latents if output == "latent" else self.decoder.decode(latents)


def cascade(prior: Model, decoder: Model, seeds, cond: dict, uncond: dict | None = None,
            guidance: float | None = 4.0, decoder_guidance: float | None = None, prior_steps: int | None = None,
            decoder_steps: int | None = None, backend: str | Backend = "auto", device=None, output: str = "image",
            noise=None, decoder_noise=None, progress=False) -> torch.Tensor:
    """Stable Cascade text -> image in one call: ``CascadeSampler(prior, decoder, ...).sample(...)`` (its docstrings).
    Build a ``CascadeSampler`` to reuse the stages' engines across calls."""
    sampler = CascadeSampler(prior, decoder, prior_steps=prior_steps, decoder_steps=decoder_steps, backend=backend,
                             device=device)
    return sampler.sample(seeds, cond, uncond, guidance, decoder_guidance, noise, decoder_noise, output, progress)
