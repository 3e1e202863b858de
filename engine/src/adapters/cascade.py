"""Stable Cascade's networks (Pernias et al. 2024, "Wuerstchen"; diffusers' ``StableCascadeUNet`` and
``PaellaVQModel``) as edmrt networks and decoders.

A ``StableCascadeUNet`` is the prior (stage C: text -> a highly compressed image embedding, 16 x 24 x 24 at 1024 px)
or the decoder (stage B: that embedding as ``effnet`` -> 4-channel latents); the VQGAN (stage A) decodes those
latents to pixels.  Both UNets predict epsilon at continuous time t in [0, 1] (``timestep_ratio``) under
``DDPMWuerstchenScheduler``'s clamped cosine schedule: ``edmrt.precond.WuerstchenPrecond``.

Conditioning, as diffusers' ``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline`` call the UNets:

- prior: ``clip_text`` (tokens, C) and ``clip_text_pooled`` (1, C) (negative prompt embeddings as their
  unconditional rows) and ``clip_img`` (1, C_img) (zeros without an image prompt and in the unconditional rows);
- decoder: ``clip_text_pooled`` (1, C) and ``effnet`` (16, h, w), the prior's image embeddings (zeros in the
  unconditional rows); ``pixels`` is the pipelines' zeros (the UNet's own default).
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import CondInput

__all__ = ["CascadeNetwork", "VQGANDecoder", "cascade_network", "is_prior", "PRIOR_STEPS", "DECODER_STEPS",
           "PRIOR_SHAPE", "EFFNET_SIZE", "DECODER_SIZE"]

PRIOR_STEPS, DECODER_STEPS = 20, 10   # the pipelines' num_inference_steps
TEXT_TOKENS = 77
# The shapes at diffusers' default 1024 x 1024: the prior's latents ceil(1024 / 42.67) = 24, the decoder's
# int(24 * 10.67) = 256 (the pipelines' resolution_multiple and latent_dim_scale).
PRIOR_SHAPE, EFFNET_SIZE, DECODER_SIZE = (16, 24, 24), (24, 24), (256, 256)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def is_prior(unet: nn.Module) -> bool:
    """A prior takes text tokens (``clip_text_in_channels``); a decoder takes the prior's embedding (``effnet``)."""
    return unet.config.get("clip_text_in_channels") is not None


class CascadeNetwork(nn.Module):
    """``StableCascadeUNet`` as ``network(x_in, c_noise, clip_text_pooled, **cond) -> F`` (epsilon), c_noise being
    its ``timestep_ratio`` t."""

    def __init__(self, unet: nn.Module, cond_inputs: tuple):
        super().__init__()
        self.unet, self.cond_inputs = unet, tuple(cond_inputs)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, clip_text_pooled: torch.Tensor, **cond):
        dtype = _dtype(self.unet)
        t = c_noise.reshape(-1).to(dtype)
        t = t.expand(x_in.shape[0]) if t.numel() == 1 else t
        extra = {k: cond[k].to(dtype) for k in ("clip_text", "clip_img", "effnet") if k in cond}
        out = self.unet(sample=x_in.to(dtype), timestep_ratio=t, clip_text_pooled=clip_text_pooled.to(dtype),
                        return_dict=False, **extra)[0]
        return out.to(x_in.dtype)


def _inputs(cfg: dict, shapes: dict) -> tuple[CondInput, ...]:
    pooled = CondInput("clip_text_pooled", tuple(shapes.get("clip_text_pooled",
                                                            (1, int(cfg["clip_text_pooled_in_channels"])))))
    if cfg.get("clip_text_in_channels") is not None:
        text = CondInput("clip_text", tuple(shapes.get("clip_text", (TEXT_TOKENS, int(cfg["clip_text_in_channels"])))),
                         free=(0,))
        out = [text, pooled]
        if cfg.get("clip_image_in_channels") is not None:
            out.append(CondInput("clip_img", tuple(shapes.get("clip_img", (1, int(cfg["clip_image_in_channels"])))),
                                 null=0.0))
        return tuple(out)
    if cfg.get("effnet_in_channels") is None:
        raise ValueError("the StableCascadeUNet has neither clip_text_in_channels (a prior) nor effnet_in_channels "
                         "(a decoder): not a Stable Cascade stage edmrt runs")
    effnet = tuple(shapes.get("effnet", (int(cfg["effnet_in_channels"]),) + EFFNET_SIZE))
    if len(effnet) != 3:
        raise ValueError(f"cond_shapes['effnet'] must be (channels, h, w), got {effnet}")
    return pooled, CondInput("effnet", effnet, null=0.0)


def cascade_network(unet: nn.Module, shapes: dict, sample_shape=None) -> tuple[CascadeNetwork, tuple]:
    """(wrapped network, sample shape) of a ``StableCascadeUNet``: its inputs (module docstring) with per-sample
    shapes from ``cond_shapes`` where given, and the sample shape at 1024 px unless ``sample_shape`` says."""
    cfg = dict(unet.config)
    inputs = _inputs(cfg, shapes)
    if sample_shape is None:
        channels = int(cfg["in_channels"])
        sample_shape = (channels, *PRIOR_SHAPE[1:]) if is_prior(unet) else (channels, *DECODER_SIZE)
    return CascadeNetwork(unet, inputs), tuple(sample_shape)


class VQGANDecoder(nn.Module):
    """Stable Cascade's VQGAN (``PaellaVQModel``, stage A) as ``decoder(latents) -> images`` in [-1, 1]:
    ``vqgan.decode(scale_factor * latents).sample`` clamped to [0, 1] as ``StableCascadeDecoderPipeline`` does,
    then mapped to [-1, 1].  ``latents`` are the decoder pipeline's (variance-preserving) state; the final state of an
    edmrt sampler on the cosine schedule is that divided by sqrt(alpha_bar) at its last level (0.99995 at t = 0),
    which ``edmrt.cascade`` undoes before decoding."""

    def __init__(self, vqgan: nn.Module, batch: int = 8):
        super().__init__()
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if not callable(getattr(vqgan, "decode", None)) or not hasattr(vqgan, "config"):
            raise ValueError(f"vqgan must be a diffusers PaellaVQModel (with .decode and .config), "
                             f"got {type(vqgan).__name__}")
        self.vqgan, self.batch = vqgan, batch
        self.scale_factor = float(vqgan.config.get("scale_factor", 1.0))

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = _dtype(self.vqgan)
        out = []
        for chunk in (latents.to(torch.float32) * self.scale_factor).to(dtype).split(self.batch):
            dec = self.vqgan.decode(chunk)
            out.append(dec.sample if hasattr(dec, "sample") else dec[0])
        return torch.cat(out).to(torch.float32).clamp(0.0, 1.0) * 2.0 - 1.0
