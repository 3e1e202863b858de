"""Calibration inputs for int8 post-training quantisation (``OpenVinoBackend(precision="int8")``): what the network
sees while it samples, recorded along the model's own trajectories.

``calibration_inputs(model)`` samples with EDM's Heun solver (``steps`` steps: 2 * steps - 1 evaluations, from
sigma_max down to sigma_min; default 10) on the float32 torch network for ``samples`` seeds (default 32) and records the inputs of every
evaluation: x_in, c_noise and the conditioning inputs, one item per evaluation.  A class-conditional model samples
with classifier-free guidance (labels cycling through the classes, weight ``GUIDANCE``), so each item holds the
unconditional rows (the null label) and the conditional ones; other conditioning inputs (text embeddings) cannot be
made up: ``cond`` gives them, one row per sample.  The quantiser then sees every noise level the sampler visits:
calibrating on noise alone would fit the ranges of sigma_max only.
"""
from __future__ import annotations

import torch

__all__ = ["calibration_inputs", "calibration_recipe", "CALIBRATION_FORMAT", "GUIDANCE", "SAMPLES", "STEPS"]

CALIBRATION_FORMAT = 1   # in the recipe: a change to how the inputs are made changes every int8 cache key
GUIDANCE = 2.0
# 32 samples, Heun with 10 steps (19 evaluations).  Measured on the digits student's endpoints against torch fp32
# (relative RMS, 1 / 4 consistency steps): 8 samples x 18 steps 0.053 / 0.055; 32 x 18 0.013 / 0.015; 32 x 10
# 0.014 / 0.017; 64 x 18 0.014 / 0.016.  More samples help up to ~32; more steps barely.
SAMPLES, STEPS = 32, 10


class _Recorder:
    """A backend that keeps a copy of each call's inputs, then runs the torch network."""

    name = "torch"

    def __init__(self, inner):
        self.inner, self.items = inner, []

    def __call__(self, x_in, c_noise, cond, out):
        item = {"x_in": x_in.detach().cpu().numpy().copy(),
                "c_noise": c_noise.detach().reshape(-1).cpu().numpy().copy()}
        for name, t in (cond or {}).items():
            item[name] = t.detach().cpu().numpy().copy()
        self.items.append(item)
        return self.inner(x_in, c_noise, cond, out)


def calibration_recipe(model, samples: int = SAMPLES, steps: int = STEPS, seed: int = 0) -> str:
    """The string that names what ``calibration_inputs`` makes for these arguments (an int8 blob's cache key holds it
    with the ONNX file's sha256, which fixes the weights)."""
    return (f"edmrt calibration v{CALIBRATION_FORMAT}: heun {steps} steps, seeds {seed}..{seed + samples - 1}, "
            f"sigma {float(model.sigma_min):g}..{float(model.sigma_max):g}, "
            + (f"labels cycling, guidance {GUIDANCE:g}" if model.num_classes else "no guidance"))


def calibration_inputs(model, samples: int = SAMPLES, steps: int = STEPS, seed: int = 0, cond: dict | None = None) -> list:
    """[{input name: numpy array}] for ``OpenVinoBackend(path, precision="int8", calibration=...)``: the network's
    inputs at each of the 2 * steps - 1 evaluations of Heun sampling ``samples`` seeds from ``seed`` (module
    docstring).  ``cond``: {name: (samples, *shape) tensor} for conditioning inputs other than class labels."""
    from ..engine import Engine
    from ..model import sampling_defaults
    from ..request import make_request
    from ..schedules import make_sigmas
    from ..solvers import build_plan
    from .module import TorchBackend

    for name, v, lo in (("samples", samples, 1), ("steps", steps, 2), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(model.network, torch.nn.Module):
        raise ValueError("calibration runs the network in torch: it must be a torch.nn.Module")
    labels = model.num_classes > 0 and [c.name for c in model.cond] == ["class_labels"]
    others = [c.name for c in model.cond if not labels]
    if labels and cond is not None:
        raise ValueError("cond is for conditioning inputs other than class labels; the labels cycle by themselves")
    if others and (not isinstance(cond, dict) or sorted(cond) != sorted(others)):
        raise ValueError(f"the model takes {others}: pass cond={{name: (samples, ...) tensor}} for each (real "
                         "inputs, e.g. prompt embeddings: calibration cannot make them up)")
    # Heun on the model's schedule, run by an Engine on the CPU as Sampler(model, "heun", steps) would (the engine is
    # below the backends; the Sampler above them).
    solver, steps, schedule = sampling_defaults(model, "heun", steps, None)
    plan = build_plan(solver, make_sigmas(schedule, steps, model.sigma_min, model.sigma_max, 7.0), model.precond)
    seeds = list(range(seed, seed + samples))
    cpu = torch.device("cpu")
    rec = _Recorder(TorchBackend(model.network, cond_inputs=model.cond))
    with torch.inference_mode():
        if labels:
            req = make_request(model.cond, model.sample_shape, cpu, seeds, [i % model.num_classes for i in seeds],
                               GUIDANCE)
        else:
            req = make_request(model.cond, model.sample_shape, cpu, seeds, cond)
        Engine(rec, plan, samples, model.sample_shape, cpu, req.guidance is not None, graph=False,
               null_label=model.null_label, cond_inputs=model.cond).run_request(req)
    return rec.items
