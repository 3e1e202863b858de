"""One sampling request, checked once at the edge: what an ``Engine`` runs.

``make_request`` takes what a caller of ``Sampler.sample`` gives (seeds as ints, class labels or {name: values} per
sample or once for all, a guidance weight, the unconditional rows, noise) and returns a frozen ``Request`` of
tensors on the device, each of its input's dtype and shape: the seeds checked (``check_seeds``), the guidance weight
(``check_guidance``), every conditioning input (integers only for integer inputs, finite reals for float ones, class
labels in range), the initial state.  Below the Sampler nothing checks these values again; an ``Engine`` checks only
that the request is one it can run (its batch, guidance on or off, the inputs its buffers hold).

``named_cond`` is the one place where a conditioning value that is not a dict means class labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .checks import check_seeds, is_real
from .model import CondInput

__all__ = ["Request", "make_request", "named_cond", "check_guidance", "GUIDANCE_MAX"]

GUIDANCE_MAX = 100.0        # classifier-free guidance weights beyond this are typos (practice: 1 - 20)


@dataclass(frozen=True)
class Request:
    """What one engine run samples; built by ``make_request`` (checked) or ``Engine.run`` (checked there)."""

    seeds: torch.Tensor                     # (B,) int64 on the device
    cond: dict | None                       # {name: (B, *shape)} of every conditioning input, or None
    guidance: float | None = None           # the CFG weight w, or None (no guidance)
    uncond: dict = field(default_factory=dict)   # {name: (B, *shape)}: unconditional rows for inputs without a null
    x_init: torch.Tensor | None = None      # (B, *sample_shape) float32: the initial state before x_init_scale
    x_init_scale: float = 1.0               # the initial state is x_init_scale * x_init
    noise_maps: torch.Tensor | None = None  # (stages, B, *sample_shape) float32: each stage's noise (DDPM inversion)

    @property
    def batch(self) -> int:
        return self.seeds.shape[0]


def named_cond(cond):
    """The conditioning as {name: value}: None stays None, a dict is as given, any other value is the class labels
    (the shorthand every entry point takes: a tensor, a list or one int)."""
    if cond is None or isinstance(cond, dict):
        return cond
    return {"class_labels": cond}


def check_guidance(guidance) -> float | None:
    """None, or a real number in [0, GUIDANCE_MAX] (w = 1: plain conditional sampling; w = 0: unconditional)."""
    if guidance is None:
        return None
    if not is_real(guidance):
        raise ValueError(f"guidance must be a number in [0, {GUIDANCE_MAX}], got {guidance!r}")
    w = float(guidance)
    if not (math.isfinite(w) and 0.0 <= w <= GUIDANCE_MAX):
        raise ValueError(f"guidance must be a number in [0, {GUIDANCE_MAX}] (F = F_u + w (F_c - F_u)), got {guidance!r}")
    return w


def make_request(inputs: Sequence[CondInput], sample_shape: Sequence[int], device: torch.device, seeds, cond=None,
                 guidance=None, uncond=None, noise=None, t0: float = 1.0, x_init=None) -> Request:
    """The checked request of a ``Sampler.sample`` call for a model with conditioning ``inputs`` (``Model.cond``).

    ``cond``: {name: value} ((N, *shape) or one (*shape) for all), or class labels for a model whose only input they
    are; inputs left out take their null value or are refused.  ``uncond``: the unconditional rows, with guidance
    only.  ``noise``: (N, *sample_shape) standard normal noise; the initial state is ``t0 * noise`` (float64 product,
    then float32).  ``x_init``: the initial state itself (an image an inversion starts from, an inversion's end), in
    place of noise.  ValueError names what is wrong."""
    seeds_t = torch.tensor(check_seeds(seeds), dtype=torch.int64)
    N = seeds_t.numel()
    w = check_guidance(guidance)
    if w is not None and cond is None:
        raise ValueError("guidance needs cond (class labels or the conditioning inputs)")
    if uncond is not None and w is None:
        raise ValueError("uncond is used only with classifier-free guidance (pass guidance=w)")
    inputs = tuple(inputs)
    cond_t = _cond(inputs, cond, N, device, "cond")
    uncond_t = _cond(inputs, uncond, N, device, "uncond") or {}
    if w is not None:
        missing = [c.name for c in inputs if c.null is None and c.name not in uncond_t]
        if missing:
            raise ValueError(f"classifier-free guidance needs uncond for {missing} (e.g. negative prompt "
                             "embeddings): these inputs have no null value")
    if noise is not None and x_init is not None:
        raise ValueError("pass noise (the state starts at sigma_0 * noise) or x_init (the state itself), not both")
    start = _x_init(noise, N, sample_shape, device, t0) if x_init is None else \
        _x_init(x_init, N, sample_shape, device, 1.0, "x_init")
    return Request(seeds_t.to(device), cond_t, w, uncond_t, start)


def _cond(inputs: tuple, cond, N: int, device: torch.device, what: str) -> dict | None:
    """{name: (N, *shape)} from the caller's ``cond`` (a dict, or class labels for a class-only model); inputs it
    leaves out take their null value (class labels: the null label, an unconditional draw) or are refused."""
    if not inputs and cond is None:
        return None
    if cond is None and what == "cond":
        cond = {}  # every input takes its null value, or is named as missing
    if cond is None:
        return None
    if not inputs:
        raise ValueError(f"this model is unconditional: {what} must be None")
    if not isinstance(cond, dict) and [c.name for c in inputs] != ["class_labels"]:
        raise ValueError(f"{what} must be a dict {{name: tensor}} of the model's inputs "
                         f"{[c.name for c in inputs]}, got {type(cond).__name__}")
    cond = named_cond(cond)
    unknown = sorted(set(cond) - {c.name for c in inputs})
    if unknown:
        raise ValueError(f"{what} has inputs {unknown} the model does not take; it takes {[c.name for c in inputs]}")
    out = {}
    for c in inputs:
        if c.name in cond:
            out[c.name] = _cond_value(c, cond[c.name], N, device, what)
        elif what == "cond" and isinstance(c.null, (int, float)):
            out[c.name] = torch.full((N,) + c.shape, c.null, dtype=c.dtype, device=device)
        elif what == "cond":
            raise ValueError(f"cond must give {c.name!r} (shape {c.shape}, {c.dtype}): it has no null value")
    return out


def _cond_value(c: CondInput, value, N: int, device: torch.device, what: str) -> torch.Tensor:
    """One input's value for N samples: (N, *shape), or (*shape) / (1, *shape) for all; integers only for integer
    inputs (floats and bools refused, never truncated), finite reals for float inputs; ValueError naming it."""
    if c.num_classes:
        want = f"{what} must hold one class in [0, {c.num_classes}) per seed (or one for all), as integers"
    else:
        want = f"{what}[{c.name!r}] must be {'integers' if c.dtype == torch.int64 else 'finite real numbers'} of " \
               f"shape ({N}, {', '.join(map(str, c.shape))}) or {c.shape} for all"
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(
            np.asarray(value) if isinstance(value, np.ndarray) else value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{want}, got {value!r:.200}") from None
    if t.dtype == torch.bool or t.is_complex() or (c.dtype == torch.int64 and t.is_floating_point()):
        raise ValueError(f"{want}, got {t.dtype} values {value!r:.200}")
    if t.shape == c.shape or t.shape == (1,) + c.shape:
        t = t.reshape((1,) + c.shape).expand((N,) + c.shape)
    elif tuple(t.shape) != (N,) + c.shape:
        raise ValueError(f"{want}, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{want}: it holds NaN or Inf")
    if c.num_classes and bool(((t < 0) | (t >= c.num_classes)).any()):
        raise ValueError(f"{want}, got {value!r:.200}")
    return t.detach().to(device=device, dtype=c.dtype).contiguous()


def _x_init(noise, N: int, sample_shape, device: torch.device, t0: float, what: str = "noise"
            ) -> torch.Tensor | None:
    """t0 * noise as the initial state, after checking noise: (N, *sample_shape), real, finite."""
    if noise is None:
        return None
    shape = (N,) + tuple(sample_shape)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or tuple(noise.shape) != shape:
        got = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{what} must be a floating-point tensor of shape {shape}, got {got}")
    x = (noise.detach().to(device, torch.float64) * float(t0)).float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} must be finite" + (" (and sigma_max * noise within float32)" if what == "noise" else ""))
    return x
