"""Flux (Black Forest Labs' rectified-flow transformer; diffusers' ``FluxTransformer2DModel`` with
``FlowMatchEulerDiscreteScheduler`` and dynamic shifting) as an edmrt network.

The network predicts the flow velocity v = eps - x_0 (``edmrt.precond.FlowPrecond``, as SD3).  edmrt's state keeps the
VAE's latent layout (C, H, W); the wrapper packs it into Flux's sequence of 2 x 2 patches, (H/2 W/2, 4 C), with the
patches' positions as ``img_ids`` and zeros as ``txt_ids``, as ``FluxPipeline._pack_latents`` and
``_prepare_latent_image_ids`` do, and unpacks the output.  ``FluxPipeline`` gives the transformer ``timestep`` = t
(its scheduler's timestep / 1000) and, for guidance-distilled models (FLUX.1-dev: ``guidance_embeds``), the
guidance scale as an input of its own (``guidance``, here a conditioning input whose unconditional row repeats the
conditional one); its "true" classifier-free guidance (``true_cfg_scale`` with a negative prompt) is edmrt's CFG.

Dynamic shifting: the pipeline shifts flow time by mu, linear in the image's sequence length L = H/2 W/2
(``calculate_shift``: mu = base_shift + (max_shift - base_shift) (L - base_seq) / (max_seq - base_seq)); the
"exponential" time shift e^mu / (e^mu + 1 / t - 1) is SD3's shift s t / (1 + (s - 1) t) with s = e^mu (the "linear"
one with s = mu), so a Flux model's card carries that shift for its sample shape (``dynamic_shift``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model import CondInput

__all__ = ["FluxNetwork", "flux_network", "dynamic_shift", "FLUX_TOKENS", "FLUX_STEPS"]

FLUX_TOKENS = 512   # FluxPipeline's max_sequence_length (T5 tokens)
FLUX_STEPS = 28     # FluxPipeline's num_inference_steps
_LATENTS = 128      # the latents' side at the pipeline's default 1024 px (VAE scale 8)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h w, 3): (0, row, column) of each 2 x 2 patch, row-major (``FluxPipeline._prepare_latent_image_ids``)."""
    rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)


class FluxNetwork(nn.Module):
    """``FluxTransformer2DModel`` as ``network(x_in, c_noise, encoder_hidden_states, pooled_projections[, guidance])
    -> F`` on latents (B, C, H, W) (module docstring); c_noise is num_train_timesteps t (``FlowPrecond``), the
    scheduler's timestep, which ``FluxPipeline`` divides by 1000."""

    def __init__(self, transformer: nn.Module, cond_inputs: tuple):
        super().__init__()
        self.transformer, self.cond_inputs = transformer, tuple(cond_inputs)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None):
        dtype = _dtype(self.transformer)
        B, C, H, W = x_in.shape
        packed = x_in.to(dtype).reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(B, (H // 2) * (W // 2), 4 * C)
        t = c_noise.reshape(-1).to(torch.float32)
        t = (t.expand(B) if t.numel() == 1 else t) / 1000.0   # the pipeline's timestep / 1000, whatever the scheduler
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x_in.device, dtype=dtype)
        out = self.transformer(hidden_states=packed, timestep=t.to(dtype),
                               guidance=None if guidance is None else guidance.reshape(-1).to(torch.float32),
                               pooled_projections=pooled_projections.to(dtype),
                               encoder_hidden_states=encoder_hidden_states.to(dtype), txt_ids=txt_ids,
                               img_ids=_image_ids(H // 2, W // 2, x_in.device, dtype), return_dict=False)[0]
        out = out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return out.to(x_in.dtype)


def flux_network(transformer: nn.Module, shapes: dict) -> tuple[FluxNetwork, tuple]:
    """(wrapped network, default sample shape (C, 128, 128): 1024 px) of a ``FluxTransformer2DModel``: text
    (``FLUX_TOKENS`` by default, any length on the torch backends), pooled text and, with ``guidance_embeds``, the
    distilled guidance scale (one number per sample)."""
    cfg = dict(transformer.config)
    if int(cfg.get("patch_size", 1)) != 1 or int(cfg["in_channels"]) % 4:
        raise ValueError(f"the FluxTransformer2DModel's patch_size {cfg.get('patch_size')} / in_channels "
                         f"{cfg['in_channels']}: edmrt packs 2 x 2 latent patches (patch_size 1, in_channels 4 C)")
    inputs = [CondInput("encoder_hidden_states", tuple(shapes.get("encoder_hidden_states",
                                                                  (FLUX_TOKENS, int(cfg["joint_attention_dim"])))),
                        free=(0,)),
              CondInput("pooled_projections", tuple(shapes.get("pooled_projections",
                                                               (int(cfg["pooled_projection_dim"]),))))]
    if cfg.get("guidance_embeds"):
        inputs.append(CondInput("guidance", (), null="cond"))
    channels = int(cfg["in_channels"]) // 4
    return FluxNetwork(transformer, tuple(inputs)), (channels, _LATENTS, _LATENTS)


def dynamic_shift(config, sample_shape: tuple) -> float:
    """The flow-time shift that ``FluxPipeline``'s dynamic shifting applies at ``sample_shape`` (C, H, W): s = e^mu
    ("exponential" time shift) or mu ("linear"), mu of the packed sequence length H/2 W/2 (module docstring)."""
    if len(sample_shape) != 3 or sample_shape[1] % 2 or sample_shape[2] % 2:
        raise ValueError(f"sample_shape must be (C, H, W) with even H and W (Flux packs 2 x 2 patches), got "
                         f"{tuple(sample_shape)}")
    seq = (sample_shape[1] // 2) * (sample_shape[2] // 2)
    base, top = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
    lo, hi = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    mu = lo + (hi - lo) * (seq - base) / (top - base)
    kind = config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if mu <= 0.0:
        raise ValueError(f"the linear time shift needs mu > 0; this scheduler gives mu = {mu:g} at sequence length "
                         f"{seq}")
    return mu
