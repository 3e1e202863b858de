"""An EDM-style UNet denoiser network F(x_in; c_noise, class_labels), written from the papers.

The architecture is the DDPM++ / ADM family that Karras et al. (2022, arXiv 2206.00364, Appendix
F.2-F.3) use as the raw network F inside the preconditioning D = c_skip x + c_out F(c_in x; c_noise):

- Ho et al. (2020) / Song et al. (2021, "Score-Based Generative Modeling through SDEs", DDPM++):
  residual blocks GroupNorm -> SiLU -> conv3x3, two per block, with the residual sum rescaled by
  1/sqrt(2) ("skip_rescale"), a positional (sinusoidal) embedding of the noise level, self-attention
  at low resolutions, and a U-shaped encoder/decoder whose decoder concatenates every encoder output.
- Dhariwal & Nichol (2021, "Diffusion Models Beat GANs", ADM): the embedding enters each block as an
  adaptive GroupNorm, h = GroupNorm(h) (1 + scale) + shift; multi-head attention with 64 channels a
  head; a class embedding added to the noise embedding; GroupNorm evaluated in float32 when the rest
  of the network runs in float16.
- NCSN++ (Song et al. 2021): random Fourier features of the noise level (``embedding="fourier"``).
- Classifier-free guidance (Ho & Salimans 2022): the label index ``num_classes`` is the null label,
  a learned embedding like the others, trained by dropping labels at random.

The net is resolution-agnostic: attention is placed by level (a resolution of ``img_resolution``
halved per level), and any H, W divisible by 2^(levels - 1) runs.  Every shape decision is static in
(C, H, W) and broadcasting does the rest, so ``torch.onnx.export`` gives a graph with a dynamic batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EDMUNet", "UNetConfig", "UNET_CONFIGS", "build_unet", "count_parameters"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of ``EDMUNet`` (names follow ADM / EDM where they have one)."""

    img_resolution: int = 32            # H = W of the training images (sets which levels get attention)
    img_channels: int = 3               # C of x_in and of F
    num_classes: int = 0                # 0: unconditional; > 0: labels 0..num_classes-1, plus num_classes = null
    model_channels: int = 128           # channels at the first level
    channel_mult: tuple = (1, 2, 2, 2)  # per-level multiplier of model_channels
    num_blocks: int = 2                 # residual blocks per level in the encoder (decoder: num_blocks + 1)
    attn_resolutions: tuple = (16,)     # resolutions with self-attention after each block
    channels_per_head: int = 64         # attention heads = max(1, channels // channels_per_head)
    emb_mult: int = 4                   # embedding width = emb_mult * model_channels
    embedding: str = "positional"       # "positional" (DDPM++, ADM) or "fourier" (NCSN++)
    fourier_scale: float = 16.0         # std of the Fourier frequencies (NCSN++ / EDM use 16)
    dropout: float = 0.0                # inside residual blocks, training only
    mid_attention: bool = True          # ADM's middle block: res, attention, res at the lowest level

    def __post_init__(self):
        for name in ("img_resolution", "img_channels", "model_channels", "channels_per_head", "emb_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {self.num_blocks!r}")
        mult = tuple(self.channel_mult)
        if not mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of ints >= 1, got {self.channel_mult!r}")
        object.__setattr__(self, "channel_mult", mult)
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.img_resolution % 2 ** (len(mult) - 1):
            raise ValueError(f"img_resolution {self.img_resolution} must be divisible by 2^{len(mult) - 1} "
                             f"for {len(mult)} levels")
        if self.embedding not in ("positional", "fourier"):
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {self.embedding!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.fourier_scale) and self.fourier_scale > 0):
            raise ValueError(f"fourier_scale must be a finite number > 0, got {self.fourier_scale!r}")


UNET_CONFIGS: dict[str, UNetConfig] = {
    # For tests: 2 channels at 8x8, ~12k parameters, every part of the net present (attention at 4x4).
    "tiny": UNetConfig(img_resolution=8, img_channels=2, model_channels=4, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), emb_mult=2),
    # scikit-learn's 8x8 digits (1 channel, 10 classes + the null label), ~2M parameters: trains on 2 CPU cores
    # in minutes.  Native 8x8 (``img_resolution=16`` for upsampled digits): levels 8, 4, 2, attention at 4 and 2.
    "digits": UNetConfig(img_resolution=8, img_channels=1, num_classes=10, model_channels=32, channel_mult=(1, 2, 2),
                         num_blocks=2, attn_resolutions=(4, 2), embedding="fourier"),
    # CIFAR-10 at 32x32x3, ~54M parameters (the layout of EDM's 56M DDPM++ CIFAR-10 net: 128 channels x (2, 2, 2),
    # 4 blocks a level, attention at 16x16; a 256-wide embedding): random weights, for benchmarks.
    "cifar10": UNetConfig(img_resolution=32, img_channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                          attn_resolutions=(16,), emb_mult=2),
}


def build_unet(name: str, **overrides) -> "EDMUNet":
    """``EDMUNet`` of the named config in ``UNET_CONFIGS``, with fields overridden (e.g. ``num_classes=3``)."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; expected one of {sorted(UNET_CONFIGS)}")
    fields = set(UNetConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown UNet option(s) {unknown}; expected some of {sorted(fields)}")
    return EDMUNet(replace(UNET_CONFIGS[name], **overrides))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """GroupNorm groups: up to 32 (Wu & He 2018, ADM), at least 4 channels each, dividing ``channels``."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype (ADM's GroupNorm32): a float16 net keeps
    its mean and variance exact, and its affine parameters stay float32 (see ``EDMUNet.to_fp16``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a scalar (Vaswani et al. 2017, DDPM): [cos(c f_i), sin(c f_i)],
    f_i = (1 / max_positions)^(i / half), i = 0..half-1.  Frequencies are made in forward, in float32."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        if channels % 2:
            raise ValueError(f"embedding channels must be even, got {channels}")
        self.channels, self.max_positions = channels, max_positions

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # (N,) float32 -> (N, channels)
        half = self.channels // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=c.device) * (-math.log(self.max_positions) / half))
        arg = c[:, None] * freqs[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (Tancik et al. 2020, NCSN++): [cos(2 pi c f_i), sin(2 pi c f_i)], f_i ~ N(0, scale^2).
    The frequencies are a float32 buffer drawn from a fixed seed (saved with the weights)."""

    def __init__(self, channels: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if channels % 2:
            raise ValueError(f"embedding channels must be even, got {channels}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels // 2, generator=g) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # (N,) float32 -> (N, channels)
        arg = (2 * math.pi) * c[:, None] * self.freqs.float()[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (DDPM++, ADM), residual, rescaled by 1/sqrt(2).
    q and k are each scaled by d^(-1/4) before the product (ADM), and the logits are softmaxed in float32,
    so a float16 net cannot overflow there."""

    def __init__(self, channels: int, channels_per_head: int):
        super().__init__()
        self.heads = max(1, channels // channels_per_head)
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} heads")
        self.norm = GroupNorm32(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        d = C // self.heads
        qkv = self.qkv(self.norm(x)).reshape(-1, 3, self.heads, d, H * W)          # (B, 3, heads, d, HW)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                                  # (B, heads, d, HW)
        s = d ** -0.25
        logits = torch.matmul((q * s).transpose(2, 3), k * s)                      # (B, heads, HW, HW)
        w = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        a = torch.matmul(v, w.transpose(2, 3)).reshape(-1, C, H, W)               # (B, C, H, W)
        return (x + self.proj(a)) * (0.5 ** 0.5)


class ResBlock(nn.Module):
    """DDPM++ residual block with ADM's adaptive GroupNorm:
    h = conv(SiLU(GN(x))); h = conv(dropout(SiLU(GN(h) (1 + scale) + shift))); out = (h + skip(x)) / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm0 = GroupNorm32(_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = GroupNorm32(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))                                      # (B, C_out, H, W)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)         # (N, C_out, 1, 1) each
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * (0.5 ** 0.5)


class Downsample(nn.Module):
    """Strided 3x3 convolution (DDPM, ADM with ``conv_resample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (DDPM, ADM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One residual block, optionally followed by attention (a UNet stage at one resolution)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, attention: bool, cfg: UNetConfig):
        super().__init__()
        self.block = ResBlock(in_channels, out_channels, emb_channels, cfg.dropout)
        self.attn = Attention(out_channels, cfg.channels_per_head) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        return self.attn(x) if self.attn is not None else x


class EDMUNet(nn.Module):
    """The raw network F of EDM: ``F = net(x_in, c_noise, class_labels)``, the same shape as ``x_in``.

    ============  ==============================================================================
    x_in          (B, C, H, W) float32 (or float16): the preconditioned input c_in x
    c_noise       the noise input c_noise(sigma), shape (B,), (1,), () or (B, 1, 1, 1); embedded in
                  float32 whatever the network's dtype
    class_labels  (B,) int64 in [0, num_classes], num_classes being the null label of classifier-free
                  guidance; None means the null label.  Must be None for an unconditional net.
                  The range is not checked (that would sync the device): torch raises on an index
                  out of range, an ONNX Runtime session may not
    returns       F, (B, C, H, W), in ``x_in``'s dtype
    ============  ==============================================================================
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = replace(config, **kwargs) if config is not None else UNetConfig(**kwargs)
        self.config = cfg
        mc, mult = cfg.model_channels, cfg.channel_mult
        emb_ch = cfg.emb_mult * mc
        self.levels = len(mult)
        self.num_classes = cfg.num_classes

        # Noise-level (and class) embedding.
        self.map_noise = (PositionalEmbedding(mc) if cfg.embedding == "positional"
                          else FourierEmbedding(mc, cfg.fourier_scale))
        self.map_layer0 = nn.Linear(mc, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)
        self.map_label = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes > 0 else None

        # Encoder: every output (conv_in, each block, each downsample) is kept for a decoder skip.
        self.conv_in = nn.Conv2d(cfg.img_channels, mc * mult[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [mc * mult[0]]
        ch = mc * mult[0]
        for lvl, m in enumerate(mult):
            res = cfg.img_resolution >> lvl
            for _ in range(cfg.num_blocks):
                self.enc.append(Level(ch, mc * m, emb_ch, res in cfg.attn_resolutions, cfg))
                ch = mc * m
                skips.append(ch)
            if lvl < self.levels - 1:
                self.enc.append(Downsample(ch))
                skips.append(ch)

        # Middle (ADM): block, attention, block at the lowest resolution.
        self.mid0 = Level(ch, ch, emb_ch, cfg.mid_attention, cfg)
        self.mid1 = Level(ch, ch, emb_ch, False, cfg)

        # Decoder: num_blocks + 1 blocks per level, each eats one encoder output by concatenation.
        self.dec = nn.ModuleList()
        for lvl in reversed(range(self.levels)):
            res = cfg.img_resolution >> lvl
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(Level(ch + skips.pop(), mc * mult[lvl], emb_ch, res in cfg.attn_resolutions, cfg))
                ch = mc * mult[lvl]
            if lvl > 0:
                self.dec.append(Upsample(ch))

        self.norm_out = GroupNorm32(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, cfg.img_channels, 3, padding=1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        c = self.config
        return (c.img_channels, c.img_resolution, c.img_resolution)

    def to_fp16(self) -> "EDMUNet":
        """Mixed precision in place (ADM's ``convert_to_fp16``): convolutions, linear maps and the label
        embedding in float16; GroupNorm and the noise embedding stay float32.  Inputs and F keep their dtype."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                m.half()
        return self

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x_in, torch.Tensor) or x_in.ndim != 4 or not x_in.is_floating_point():
            raise ValueError(f"x_in must be a floating-point tensor of shape (B, C, H, W), got "
                             f"{tuple(x_in.shape) if isinstance(x_in, torch.Tensor) else type(x_in).__name__}")
        C, H, W = x_in.shape[1:]
        if C != self.config.img_channels or H % 2 ** (self.levels - 1) or W % 2 ** (self.levels - 1):
            raise ValueError(f"x_in must have {self.config.img_channels} channels and H, W divisible by "
                             f"{2 ** (self.levels - 1)}, got shape {tuple(x_in.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x_in.device)
        if c_noise.ndim > 1:  # (B, 1, ..., 1) as the executors pass it
            if any(s != 1 for s in c_noise.shape[1:]):
                raise ValueError(f"c_noise must have shape (B,) or (B, 1, ..., 1), got {tuple(c_noise.shape)}")
            c_noise = c_noise.reshape(c_noise.shape[0])
        elif c_noise.ndim == 0:
            c_noise = c_noise.reshape(1)

        # Embedding: (N, emb) with N = B or 1; broadcasting against (B, ...) does the rest.
        dtype = self.conv_in.weight.dtype
        emb = self.map_noise(c_noise.float()).to(dtype)                           # (N, mc)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))                        # (N, emb)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full((x_in.shape[0],), self.num_classes, dtype=torch.int64, device=x_in.device)
            elif (not isinstance(class_labels, torch.Tensor) or class_labels.ndim != 1
                  or class_labels.dtype not in (torch.int64, torch.int32)):
                got = (f"{class_labels.dtype} {tuple(class_labels.shape)}" if isinstance(class_labels, torch.Tensor)
                       else type(class_labels).__name__)
                raise ValueError(f"class_labels must be an int64 tensor of shape (B,) in [0, {self.num_classes}] "
                                 f"({self.num_classes} = null label), got {got}")
            emb = emb + self.map_label(class_labels)                                # (B, emb)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes = 0)")
        emb = F.silu(emb)

        # Encoder.
        h = self.conv_in(x_in.to(dtype))
        hs = [h]
        for layer in self.enc:
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            hs.append(h)

        # Middle.
        h = self.mid1(self.mid0(h, emb), emb)

        # Decoder.
        for layer in self.dec:
            if isinstance(layer, Level):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)

        return self.conv_out(F.silu(self.norm_out(h))).to(x_in.dtype)
