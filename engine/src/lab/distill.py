"""Consistency distillation of an EDM teacher into a few-step student (Song, Dhariwal, Chen, Sutskever 2023,
"Consistency Models", arXiv 2303.01469, Algorithm 2).

The student f_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in x; c_noise) uses the consistency
parameterisation (``ConsistencyPrecond``: f(x; sigma_min) = x exactly).  The levels are Karras et al.'s
discretisation (EDM Eq. 5, used by Song et al. Sec. 6) of [sigma_min, sigma_max] into N levels

    t_i = (sigma_min^(1/rho) + (i - 1) / (N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,   i = 1..N.

One iteration: training images y with labels, n ~ U{1, ..., N - 1} per sample, x = y + t_{n+1} z; one Heun step of
the teacher's probability-flow ODE dx/dt = (x - D(x; t)) / t (EDM Algorithm 1's step, no churn) from t_{n+1} to t_n
gives x_hat; the loss is

    lambda(t_n) d( f_theta(x; t_{n+1}), f_theta-(x_hat; t_n) )

with theta- the target network (an EMA of theta with decay ``mu``, never differentiated), d the pseudo-Huber
distance sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, "Improved techniques for
training consistency models", arXiv 2310.14189, Sec. 3.3) or the mean squared error, and lambda = 1 (Song et al.'s
CD) or 1 / (t_{n+1} - t_n) (the improved recipe).  Student and target start from the teacher's weights (Song et al.
Sec. 6).  The shipped student is a further EMA of theta (``ema_decay``, ramped up as in ``edmrt.lab.train``).
Labels are the same for teacher and student and are dropped to the null label with ``p_uncond`` (as in training),
so the student keeps the unconditional mode.

Checkpoints and resume work as in ``edmrt.lab.train`` (safetensors + ``torch.load(weights_only=True)`` for Adam).

A few-step *adapter* (``lora_rank`` > 0: the LCM-LoRA recipe, Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion
Acceleration Module", arXiv 2311.05556): the teacher's weights stay frozen and only a LoRA (Hu et al. 2021, arXiv
2106.09685: W + (alpha / r) B A, B = 0 at the start) or DoRA (Liu et al. 2024, arXiv 2402.09353: m (W + s B A) /
||W + s B A|| per output channel, m initialised to ||W||) on every convolution and linear layer of the network is
trained, with the same loss.  The adapters are peft's own layers (``peft.inject_adapter_in_model``); the student,
the target and the shipped EMA are three injected copies whose base weights are the teacher's (the EMAs touch only
the adapter's tensors).  ``export_adapter`` writes a peft adapter folder plus an edmrt card that switches the base
model to the consistency parameterisation when the adapter is loaded (``edmrt.load("digits", adapters=...)``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model import Model
from ..precond import ConsistencyPrecond
from .common import denoise

__all__ = ["DistillOptions", "DistillResult", "distill", "heun_step", "karras_levels", "export_student", "student_model",
           "select_levels", "self_consistency", "lora_config", "export_adapter", "adapter_targets", "adapted_model"]


def karras_levels(N: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """t_1 = sigma_min < ... < t_N = sigma_max (float64), the discretisation above."""
    i = torch.arange(N, dtype=torch.float64) / (N - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    t = (lo + i * (hi - lo)) ** rho
    t[0], t[-1] = sigma_min, sigma_max
    return t


@dataclass
class DistillOptions:
    """Consistency-distillation hyper-parameters (Song et al.'s names where they have one)."""

    iters: int = 3000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 100
    N: int = 18                  # discretisation levels (Song et al.'s CIFAR-10 CD setting)
    rho: float = 7.0
    mu: float = 0.95             # target network EMA decay
    ema_decay: float = 0.999     # the shipped student's EMA
    loss: str = "pseudo_huber"   # or "l2"
    weighting: str = "uniform"   # lambda = 1, or "inverse_gap": 1 / (t_{n+1} - t_n)
    p_uncond: float = 0.1
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    seed: int = 0
    lora_rank: int = 0           # > 0: train a LoRA / DoRA adapter of this rank on the frozen teacher
    dora: bool = False
    lora_alpha: float | None = None  # LoRA's alpha (scale alpha / rank); default the rank (scale 1)

    def __post_init__(self):
        for name, lo in (("iters", 0), ("batch", 1), ("seed", 0), ("warmup", 0), ("N", 2), ("lora_rank", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.loss not in ("pseudo_huber", "l2"):
            raise ValueError(f"loss must be 'pseudo_huber' or 'l2', got {self.loss!r}")
        if self.weighting not in ("uniform", "inverse_gap"):
            raise ValueError(f"weighting must be 'uniform' or 'inverse_gap', got {self.weighting!r}")
        if not (0.0 <= self.mu < 1.0 and 0.0 <= self.ema_decay < 1.0 and 0.0 <= self.p_uncond < 1.0):
            raise ValueError(f"mu, ema_decay and p_uncond must lie in [0, 1), got {self.mu}, {self.ema_decay}, "
                             f"{self.p_uncond}")
        if not (self.lr > 0 and self.rho > 0 and 0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max)):
            raise ValueError(f"need lr > 0, rho > 0 and 0 < sigma_min < sigma_max < inf, got {self}")
        if not isinstance(self.dora, bool) or (self.dora and not self.lora_rank):
            raise ValueError(f"dora must be a bool and needs lora_rank > 0, got dora={self.dora!r}, "
                             f"lora_rank={self.lora_rank}")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0
                                                 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number > 0 or None, got {self.lora_alpha!r}")


@dataclass
class DistillResult:
    options: DistillOptions
    student: torch.nn.Module      # theta (trained)
    target: torch.nn.Module       # theta- (EMA, decay mu)
    ema: torch.nn.Module          # the shipped student
    precond: ConsistencyPrecond
    step: int
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    adapter_config: object = None  # the peft LoraConfig of an adapter run (lora_rank > 0), else None


def _pair(teacher, y: torch.Tensor, labels, t: torch.Tensor, n: torch.Tensor, z: torch.Tensor):
    """(x, x_hat, t_cur, t_next): the images noised to t_{n+1} with ``z`` and the teacher's Heun step from there to
    t_n (no gradient), for 0-based level indices ``n`` into the ascending levels ``t``."""
    t_cur, t_next = t[n + 1], t[n]
    x = y + t_cur.to(y.dtype).view((-1,) + (1,) * (y.ndim - 1)) * z
    with torch.no_grad():
        x_hat = heun_step(teacher, x, t_cur, t_next, labels)
    return x, x_hat, t_cur, t_next


def heun_step(teacher, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, labels) -> torch.Tensor:
    """One Heun step of dx/dt = (x - D(x; t)) / t from t_cur to t_next > 0 (EDM Algorithm 1, lines 5-8)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    tc, tn = t_cur.to(x.dtype).view(shape), t_next.to(x.dtype).view(shape)
    d = (x - denoise(teacher.network, teacher.precond, x, t_cur, labels)) / tc
    x_e = x + (tn - tc) * d
    d2 = (x_e - denoise(teacher.network, teacher.precond, x_e, t_next, labels)) / tn
    return x + (tn - tc) * 0.5 * (d + d2)


def _distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(dim=1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c


def self_consistency(net: torch.nn.Module, precond, teacher, y: torch.Tensor, labels: torch.Tensor,
                     opts: DistillOptions, seed: int = 0) -> float:
    """Mean distance (``opts.loss``) between f(x; t_{n+1}) and f(x_hat; t_n) with the *same* network on both sides:
    how far ``net`` is from being consistent along the teacher's ODE, on a fixed draw (seed) of n and noise for
    the images ``y``.  The teacher itself scores > 0; distillation drives it down."""
    g = torch.Generator().manual_seed(seed)
    t = karras_levels(opts.N, opts.sigma_min, opts.sigma_max, opts.rho)
    n = torch.randint(0, opts.N - 1, (y.shape[0],), generator=g)
    z = torch.randn(y.shape, generator=g)
    x, x_hat, t_cur, t_next = _pair(teacher, y, labels, t, n, z)
    with torch.no_grad():
        d = _distance(denoise(net, precond, x, t_cur, labels), denoise(net, precond, x_hat, t_next, labels),
                      opts.loss)
    return float(d.mean())


def _state_json(opts: DistillOptions, step: int, losses: list, seconds: float) -> dict:
    return {"format": "edmrt-distill-checkpoint-1", "step": step, "options": dataclasses.asdict(opts),
            "losses": [float(v) for v in losses], "seconds": seconds}


def adapter_targets(network: torch.nn.Module) -> list[str]:
    """The full names of every convolution and linear layer of ``network`` (a few-step adapter's targets)."""
    return [n for n, m in network.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def lora_config(opts: DistillOptions, network: torch.nn.Module):
    """peft's LoraConfig of an adapter run on ``network``: rank, alpha (default the rank), DoRA, every conv / linear
    layer (``adapter_targets``)."""
    from ..adapters.lora import import_peft

    peft = import_peft()
    return peft.LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha or opts.lora_rank, use_dora=opts.dora,
                           lora_dropout=0.0, target_modules=adapter_targets(network), init_lora_weights=True)


def _networks(tnet: torch.nn.Module, opts: DistillOptions):
    """(student, target, ema, LoraConfig or None): three copies of the teacher's network; for an adapter run each
    carries peft's adapter layers and only the student's adapter tensors train."""
    if not opts.lora_rank:
        return copy.deepcopy(tnet).requires_grad_(True), copy.deepcopy(tnet), copy.deepcopy(tnet), None
    from ..adapters.lora import import_peft

    peft = import_peft()
    config = lora_config(opts, tnet)
    if not config.target_modules:
        raise ValueError("the teacher's network has no convolution or linear layer to adapt")
    with torch.random.fork_rng(devices=[]):  # peft draws A's initial values from torch's RNG: seed them
        torch.manual_seed(opts.seed)
        student = peft.inject_adapter_in_model(config, copy.deepcopy(tnet), adapter_name="default")
    for n, p in student.named_parameters():
        p.requires_grad_("lora_" in n)
    target, ema = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    return student, target, ema, config


def distill(teacher, opts: DistillOptions | None = None, data: tuple[torch.Tensor, torch.Tensor] | None = None,
            checkpoint: str | Path | None = None, resume: str | Path | None = None, progress: bool = True,
            checkpoint_every: int = 500, callback=None, callback_every: int = 0) -> DistillResult:
    """Distil ``teacher`` (an ``edmrt.Model`` whose network is a class-conditional ``nn.Module`` and whose
    preconditioning has a ``sigma_data``) into a consistency model (``opts.lora_rank`` > 0: into a LoRA / DoRA
    adapter on the frozen teacher); ``data``: (images, labels), default the digits training split.  The teacher's
    network is put in eval mode and frozen (requires_grad False).  ``callback(result)`` runs every
    ``callback_every`` iterations (and at the end) with the EMA network in eval mode, e.g. to record FD against
    iterations."""
    from tqdm import tqdm

    from .common import load_checkpoint_folder, record_loss, save_checkpoint_folder

    opts = opts or DistillOptions()
    sigma_data, images, labels = _check_teacher(teacher, data)
    state = tensors = optim_state = None
    if resume is not None:
        state, tensors, optim_state = load_checkpoint_folder(Path(resume), "edmrt-distill-checkpoint-1")
        opts = DistillOptions(**{**state["options"], "iters": opts.iters})
    precond = ConsistencyPrecond(float(sigma_data), opts.sigma_min)
    tnet = teacher.network.eval().requires_grad_(False)
    student, target, ema, adapter_config = _networks(tnet, opts)
    nets = {"net": student, "target": target, "ema": ema}
    g = torch.Generator().manual_seed(opts.seed)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=opts.lr, betas=(0.9, 0.999), eps=1e-8)
    step, losses, seconds = 0, [], 0.0
    if state is not None:
        try:
            for prefix, net in nets.items():
                net.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")},
                                    strict=True)
            optimizer.load_state_dict(optim_state)
            g.set_state(tensors["rng"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint {str(resume)!r} does not fit this teacher: {exc}") from None
        step, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
    t = karras_levels(opts.N, opts.sigma_min, opts.sigma_max, opts.rho)
    result = DistillResult(opts, student, target, ema, precond, step, losses, seconds, adapter_config)
    target_params, ema_params = dict(target.named_parameters()), dict(ema.named_parameters())
    pairs = [(target_params[n], ema_params[n], p) for n, p in student.named_parameters() if p.requires_grad]

    def ema_updates(step: int) -> None:  # the target (decay mu) and the shipped EMA, on the trained tensors only
        with torch.no_grad():
            for p_t, p_e, p in pairs:
                p_t.lerp_(p.detach(), 1.0 - opts.mu)
                p_e.lerp_(p.detach(), 1.0 - min(opts.ema_decay, (1 + step) / (10 + step)))

    def report() -> None:
        ema.eval()
        callback(result)

    def save():
        save_checkpoint_folder(Path(checkpoint), nets, g, optimizer,
                               _state_json(opts, result.step, result.losses, result.seconds))

    student.train()
    target.eval()
    bar = tqdm(total=opts.iters, initial=step, disable=not progress, desc="distill", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < opts.iters:
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / max(1, opts.warmup))
        loss = _loss(teacher, student, target, precond, opts, images, labels, t, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_updates(step)
        step += 1
        record_loss(losses, loss, step, opts.iters, bar, "distillation")
        result.step, result.seconds = step, seconds + time.perf_counter() - t0
        if checkpoint is not None and step % checkpoint_every == 0 and step < opts.iters:
            save()
        if callback is not None and callback_every and step % callback_every == 0 and step < opts.iters:
            t_cb = time.perf_counter()
            report()
            t0 += time.perf_counter() - t_cb  # the callback's time is not training time
    bar.close()
    result.seconds = seconds + time.perf_counter() - t0
    if checkpoint is not None:
        save()
    for net in nets.values():
        net.eval()
    if callback is not None:
        report()
    return result


def _check_teacher(teacher, data):
    """(sigma_data, images, labels) for distilling ``teacher`` on ``data`` (default the digits training split)."""
    from .common import load_digits_split

    if not isinstance(teacher, Model) or not isinstance(teacher.network, torch.nn.Module):
        raise ValueError("teacher must be an edmrt Model whose network is a torch.nn.Module (e.g. edmrt.load('digits'))")
    sigma_data = getattr(teacher.precond, "sigma_data", None)
    if sigma_data is None:
        raise ValueError(f"the teacher's preconditioning {teacher.precond.name!r} has no sigma_data for the student")
    if teacher.num_classes < 1:
        raise ValueError("distill needs a class-conditional teacher (num_classes >= 1, the null label for CFG)")
    images, labels = data if data is not None else load_digits_split("train")
    if tuple(images.shape[1:]) != tuple(teacher.sample_shape) or labels.shape != images.shape[:1]:
        raise ValueError(f"data must be images (N, {', '.join(map(str, teacher.sample_shape))}) with labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    return sigma_data, images, labels


def _loss(teacher, student, target, precond, opts: DistillOptions, images, labels, t, g) -> torch.Tensor:
    """One batch of Algorithm 2: lambda(t_n) d(f_theta(x; t_{n+1}), f_theta-(x_hat; t_n)), randomness from ``g``."""
    B = opts.batch
    idx = torch.randint(0, images.shape[0], (B,), generator=g)
    y, lab = images[idx], labels[idx]
    drop = torch.rand(B, generator=g) < opts.p_uncond
    lab = torch.where(drop, torch.full_like(lab, teacher.null_label), lab)
    n = torch.randint(0, opts.N - 1, (B,), generator=g)        # 0-based: levels t[n] < t[n + 1]
    z = torch.randn(y.shape, generator=g)
    x, x_hat, t_cur, t_next = _pair(teacher, y, lab, t, n, z)
    with torch.no_grad():
        f_target = denoise(target, precond, x_hat, t_next, lab)
    f_online = denoise(student, precond, x, t_cur, lab)
    dist = _distance(f_online, f_target, opts.loss)
    weight = torch.ones(B) if opts.weighting == "uniform" else (1.0 / (t_cur - t_next)).float()
    return (weight * dist).mean()


def student_model(result: DistillResult, teacher, metadata: dict | None = None):
    """The EMA student as an ``edmrt.Model`` (consistency parameterisation, the teacher's shape and classes)."""
    return Model(result.ema.eval().requires_grad_(False), result.precond, sample_shape=teacher.sample_shape,
                 num_classes=teacher.num_classes, sigma_min=result.options.sigma_min,
                 sigma_max=result.options.sigma_max, metadata=dict(metadata or {}))


def _run_card(result: DistillResult, levels: dict | None) -> dict:
    """The card entries a student and an adapter share: the sampling defaults (``select_levels``' levels) and the
    run's options, iterations, time and final loss."""
    return {"sampling": {"solver": "consistency", "steps": 2, "solvers": ["consistency", "tcd"],
                         **({"levels": levels["levels"], "fd_train": levels["fd_train"],
                             "levels_note": "greedy choice by FD against the training split (edmrt.lab.distill."
                                            "select_levels); the test split is not used"} if levels else {})},
            "distillation": {**dataclasses.asdict(result.options), "iterations_done": result.step,
                             "wall_time_s": round(result.seconds, 1),
                             "final_loss_mean_last_100": float(np.mean(result.losses[-100:])) if result.losses
                             else None}}


def export_student(result: DistillResult, teacher, weights: str | Path, card: dict, levels: dict | None = None) -> dict:
    """Write the EMA student (safetensors) and its model card (JSON beside it, same stem); returns the card.

    ``levels``: ``select_levels``'s result, the card's default noise levels per step count (else Karras')."""
    from ..models.bundled import write_model

    card = {"format": "edmrt-model-card-1", "kind": "unet",
            "architecture": dataclasses.asdict(result.ema.config),
            "precond": result.precond.to_dict(), "sample_shape": list(teacher.sample_shape),
            "num_classes": teacher.num_classes, "sigma_min": result.options.sigma_min,
            "sigma_max": result.options.sigma_max,
            "teacher": teacher.metadata.get("name"),
            **_run_card(result, levels), **card}
    return write_model(result.ema, weights, card)


def export_adapter(result: DistillResult, teacher, folder: str | Path, card: dict, levels: dict | None = None) -> dict:
    """Write the EMA adapter of an adapter run (``lora_rank`` > 0) as a peft adapter folder: adapter_config.json
    (peft's ``LoraConfig.save_pretrained``), adapter_model.safetensors (peft's ``get_peft_model_state_dict``) and
    edmrt's card ``edmrt.json`` (the base model, the consistency preconditioning and sampling levels the adapted
    model needs, the run's options).  The folder is written beside its destination and moved into place.
    Returns the card."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ..adapters.lora import ADAPTER_CARD, import_peft

    if result.adapter_config is None:
        raise ValueError("export_adapter needs an adapter run (DistillOptions.lora_rank > 0); use export_student")
    peft = import_peft()
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not (folder / "adapter_config.json").is_file()):
        raise ValueError(f"{str(folder)!r} exists and is not an adapter folder: refusing to replace it")
    sd = peft.get_peft_model_state_dict(result.ema, adapter_name="default")
    card = {"format": "edmrt-adapter-card-1", "kind": "few-step adapter", "base": teacher.metadata.get("name"),
            "adapter": "DoRA" if result.options.dora else "LoRA", "rank": result.options.lora_rank,
            "parameters": int(sum(v.numel() for v in sd.values())),
            "precond": result.precond.to_dict(), "sigma_min": result.options.sigma_min,
            "sigma_max": result.options.sigma_max,
            **_run_card(result, levels), **card}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        result.adapter_config.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's folder is private; the adapter is a plain folder of the user's
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def adapted_model(result: DistillResult, teacher):
    """The teacher's network with the run's EMA adapter fused (a plain network, no peft layers) as an
    ``edmrt.Model`` with the consistency preconditioning: what ``edmrt.load(teacher, adapters=...)`` gives."""
    from ..adapters.lora import AdapterSet, import_peft

    peft = import_peft()
    net = copy.deepcopy(teacher.network)
    adapters = AdapterSet(net)
    adapters.add("default", result.adapter_config, peft.get_peft_model_state_dict(result.ema, adapter_name="default"))
    adapters.apply({"default": 1.0})
    return Model(net, result.precond, sample_shape=teacher.sample_shape, num_classes=teacher.num_classes,
                 sigma_min=result.options.sigma_min, sigma_max=result.options.sigma_max, metadata={})


def select_levels(model, max_steps: int = 4, grid: int = 24, samples: int = 400, solver: str = "consistency",
                  progress: bool = True, **options) -> dict:
    """Greedy choice of the intermediate noise levels for 2..max_steps step sampling (Song et al. 2023 Sec. 6
    search tau_1 for two steps, then fix it and search the next): each candidate level, on a log grid of
    ``grid`` values from 1/1000 of the previous level (not below 1.5 sigma_min) to 0.95 of it, is scored by
    the Frechet distance between the shipped classifier's features of ``samples`` samples (seeds 10000.., the training split's labels) and of the *training* split, so that the
    held-out test split that FD-digits reports on plays no part.  Returns {"levels": {"1": [sigma_max, 0],
    "2": [sigma_max, tau_1, 0], ...}, "fd_train": {...}}."""
    from tqdm import tqdm

    from ..sampler import Sampler
    from .common import load_digits_split
    from .metrics import digits_features, frechet_distance, load_classifier

    clf = load_classifier()
    x_train, y_train = load_digits_split("train")
    ref = digits_features(x_train, clf)
    labels = y_train[:samples].tolist()
    seeds = list(range(10_000, 10_000 + len(labels)))

    def score(levels):
        s = Sampler(model, solver=solver, steps=len(levels) - 1, schedule=levels, backend="torch", device="cpu",
                    **options)
        return frechet_distance(digits_features(s.sample(seeds, cond=labels), clf), ref)

    top = float(model.sigma_max)
    out = {"levels": {"1": [top, 0.0]}, "fd_train": {"1": score([top, 0.0])}}
    chosen: list[float] = [top]
    floor = 1.5 * float(getattr(model.precond, "sigma_min", model.sigma_min))

    def candidates(prev: float) -> np.ndarray:  # log grid from prev / 1000 (not below 1.5 sigma_min) to 0.95 prev
        return np.exp(np.linspace(math.log(max(prev * 1e-3, floor)), math.log(0.95 * prev), grid))

    bar = tqdm(total=grid * (max_steps - 1), disable=not progress, desc="levels", unit="run", dynamic_ncols=True)
    for k in range(2, max_steps + 1):
        best = None
        for tau in candidates(chosen[-1]):
            fd = score(chosen + [float(tau), 0.0])
            bar.update(1)
            if best is None or fd < best[1]:
                best = (float(tau), fd)
        chosen.append(best[0])
        out["levels"][str(k)] = chosen + [0.0]
        out["fd_train"][str(k)] = best[1]
    bar.close()
    return out
