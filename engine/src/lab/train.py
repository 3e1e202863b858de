"""EDM training of the UNet on scikit-learn's 8x8 digits (Karras et al. 2022, arXiv 2206.00364, Sec. 5, Table 1).

One iteration: a batch y of training images with labels, sigma with ln sigma ~ N(P_mean, P_std^2),
n ~ N(0, sigma^2 I), and the loss

    L = E[ lambda(sigma) || D(y + n; sigma, label) - y ||^2 ],   lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

with D the EDM preconditioning of the raw network (``edmrt.EDMPrecond(sigma_data)``).  Labels are
replaced by the null label ``num_classes`` with probability ``p_uncond`` (classifier-free guidance,
Ho & Salimans 2022).  Adam with a linear learning-rate warm-up, and an exponential moving average of
the weights (EMA) whose decay ramps up as min(ema_decay, (1 + k) / (10 + k)) at iteration k: the EMA
weights are the model that is sampled.

Data: ``load_digits`` (1797 images, values 0..16) scaled to [-1, 1]; a fixed split (permutation seed
0) keeps ``N_TEST`` images out of training, for the classifier's accuracy and the FD-digits metric.
sigma_data: the standard deviation of the scaled training pixels is 0.752 (mean -0.39); we use
``SIGMA_DATA = 0.75`` (EDM's 0.5 is CIFAR-10's std in [-1, 1]; sigma_data is meant to be the data's std).

Reproducibility: all randomness (batches, sigmas, noise, label dropout) comes from one
``torch.Generator`` seeded with ``seed``; its state is saved in the checkpoint, so a run resumed from a
checkpoint gives the same weights as an uninterrupted one (on the same machine and torch build).

Checkpoint (a folder): ``model.safetensors`` (net, EMA and generator state), ``optimizer.pt``
(Adam's state, a plain tensor dict read back with ``torch.load(weights_only=True)``) and
``state.json`` (iteration, options, losses).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.unet import UNET_CONFIGS, EDMUNet, UNetConfig
from ..precond import EDMPrecond
from .common import (NUM_CLASSES, SIGMA_DATA, denoise, ema_update_, load_checkpoint_folder, load_digits_split,
                     record_loss, save_checkpoint_folder)

__all__ = ["TrainOptions", "TrainResult", "train", "edm_loss", "save_checkpoint", "export_weights"]

@dataclass
class TrainOptions:
    """Training hyper-parameters (EDM's names where it has them)."""

    config: str = "digits"       # a name in UNET_CONFIGS; overridden to 1 channel, 8x8, 10 classes
    iters: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100            # linear learning-rate warm-up, iterations
    ema_decay: float = 0.999
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = SIGMA_DATA
    p_uncond: float = 0.1        # label dropout to the null label
    seed: int = 0

    def __post_init__(self):
        if self.config not in UNET_CONFIGS:
            raise ValueError(f"unknown UNet config {self.config!r}; expected one of {sorted(UNET_CONFIGS)}")
        for name in ("iters", "batch", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name != "batch" else 1):
                raise ValueError(f"{name} must be a non-negative int (batch >= 1), got {v!r}")
        if not (0.0 <= self.p_uncond < 1.0 and 0.0 <= self.ema_decay < 1.0 and self.lr > 0 and self.P_std > 0
                and self.sigma_data > 0 and self.warmup >= 0):
            raise ValueError(f"invalid training options {self}")

    def unet_config(self) -> UNetConfig:
        return dataclasses.replace(UNET_CONFIGS[self.config], img_resolution=8, img_channels=1,
                                   num_classes=NUM_CLASSES)


@dataclass
class TrainResult:
    options: TrainOptions
    net: EDMUNet
    ema: EDMUNet
    step: int
    losses: list = field(default_factory=list)   # mean loss per iteration
    seconds: float = 0.0


def edm_loss(net: torch.nn.Module, precond: EDMPrecond, y: torch.Tensor, labels: torch.Tensor,
             opts: TrainOptions, g: torch.Generator) -> torch.Tensor:
    """EDM's loss (Sec. 5, Eq. 2 with Table 1's lambda and p_train) for one batch."""
    B = y.shape[0]
    rnd_normal = torch.randn(B, generator=g)
    sigma = (rnd_normal * opts.P_std + opts.P_mean).exp()
    n = torch.randn(y.shape, generator=g) * sigma[:, None, None, None]
    sd = opts.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    D_x = denoise(net, precond, y + n, sigma, labels)
    return (weight[:, None, None, None] * (D_x - y) ** 2).mean()


def _state_json(opts: TrainOptions, step: int, losses: list, seconds: float) -> dict:
    return {"format": "edmrt-train-checkpoint-1", "step": step, "options": dataclasses.asdict(opts),
            "losses": [float(v) for v in losses], "seconds": seconds}


def save_checkpoint(result: TrainResult, optimizer: torch.optim.Optimizer, g: torch.Generator, path: Path) -> None:
    save_checkpoint_folder(path, {"net": result.net, "ema": result.ema}, g, optimizer,
                           _state_json(result.options, result.step, result.losses, result.seconds))


def train(opts: TrainOptions | None = None, checkpoint: str | Path | None = None, resume: str | Path | None = None,
          progress: bool = True, checkpoint_every: int = 500) -> TrainResult:
    """Train (or, with ``resume``, continue training up to ``opts.iters``) the class-conditional digits UNet.

    ``checkpoint``: folder written every ``checkpoint_every`` iterations and at the end.  On resume the
    options saved in the checkpoint are used except ``iters`` (which may extend the run).
    """
    from tqdm import tqdm

    opts = opts or TrainOptions()
    state = tensors = optim_state = None
    if resume is not None:
        state, tensors, optim_state = load_checkpoint_folder(Path(resume), "edmrt-train-checkpoint-1")
        opts = TrainOptions(**{**state["options"], "iters": opts.iters})
    torch.manual_seed(opts.seed)  # parameter initialisation
    net = EDMUNet(opts.unet_config())
    ema = EDMUNet(opts.unet_config())
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    g = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=opts.lr, betas=(0.9, 0.999), eps=1e-8)
    step, losses, seconds = 0, [], 0.0
    if state is not None:
        try:
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
            optimizer.load_state_dict(optim_state)
            g.set_state(tensors["rng"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint {str(resume)!r} does not fit config {opts.config!r}: {exc}") from None
        step, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
    precond = EDMPrecond(opts.sigma_data)
    images, labels = load_digits_split("train")
    N = images.shape[0]
    result = TrainResult(opts, net, ema, step, losses, seconds)
    net.train()
    bar = tqdm(total=opts.iters, initial=step, disable=not progress, desc="train", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < opts.iters:
        idx = torch.randint(0, N, (opts.batch,), generator=g)
        y, lab = images[idx], labels[idx]
        drop = torch.rand(opts.batch, generator=g) < opts.p_uncond
        lab = torch.where(drop, torch.full_like(lab, NUM_CLASSES), lab)
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / max(1, opts.warmup))
        loss = edm_loss(net, precond, y, lab, opts, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update_(ema, net, min(opts.ema_decay, (1 + step) / (10 + step)))
        step += 1
        record_loss(losses, loss, step, opts.iters, bar, "training")
        result.step, result.seconds = step, seconds + time.perf_counter() - t0
        if checkpoint is not None and step % checkpoint_every == 0 and step < opts.iters:
            save_checkpoint(result, optimizer, g, Path(checkpoint))
    bar.close()
    result.seconds = seconds + time.perf_counter() - t0
    if checkpoint is not None:
        save_checkpoint(result, optimizer, g, Path(checkpoint))
    ema.eval()
    net.eval()
    return result


def export_weights(result: TrainResult, weights: str | Path, card: dict) -> dict:
    """Write the EMA weights (safetensors) and the model card (JSON beside it, same stem); returns the card."""
    from ..models.bundled import write_model

    card = {"format": "edmrt-model-card-1", "kind": "unet", "architecture": dataclasses.asdict(result.ema.config),
            "precond": {"name": "edm", "sigma_data": result.options.sigma_data}, "sample_shape": [1, 8, 8],
            "num_classes": NUM_CLASSES, "sigma_min": 0.002, "sigma_max": 80.0,
            "sampling": {"solver": "heun", "steps": 18},
            "training": {**dataclasses.asdict(result.options), "iterations_done": result.step,
                         "wall_time_s": round(result.seconds, 1),
                         "final_loss_mean_last_100": float(np.mean(result.losses[-100:])) if result.losses else None},
            **card}
    return write_model(result.ema, weights, card)
