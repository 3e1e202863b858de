"""The engine: static buffers and the sampling loop for one (backend, plan, batch, sample shape, device, guidance).

Per request the loop is: the initial state (Philox noise from the seeds, or a given state), then for every stage
one backend call (the network writes F into a static buffer) and one fused step (which writes the next network
input).  No allocation, no host sync and no Python branching on device values inside the loop; on CUDA the whole
loop is captured once in one ``torch.cuda.CUDAGraph`` and replayed for later requests after the seeds and the
conditioning (class labels, text embeddings, ...) are copied into their static buffers.

Conditioning: one static buffer per conditioning input the model declares (``edmrt.CondInput``), of shape
(B, *shape), or (2B, *shape) under classifier-free guidance: rows [0, B) the unconditional half (the input's null
value, the caller's ``uncond``, or the conditional rows again), rows [B, 2B) the conditional half; the network runs
both halves in one batch and the fused step forms F_u + w (F_c - F_u).

A request reaches ``run_request`` checked (``edmrt.request``: ``Sampler.sample`` checks it once, ``Engine.run``
checks its tensors against the buffers); the engine checks only that it fits.  Every result is checked once for NaN
and Inf (one reduction per request, not per stage); only when it fails is the loop run again, checked stage by
stage, to name where the values first went non-finite.

Thread safety: an ``Engine`` holds one set of buffers, so ``run_request`` takes the engine's lock; requests from
several threads are served one after another.  The engine imports no backend (the backend is an argument): the
backends' own code (int8 calibration) may run an engine.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import torch

from .checks import is_real
from .model import CondInput
from .plan import Plan
from .request import Request, check_guidance, named_cond

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["all_finite", "lru_get", "Engine", "MAX_GUIDANCE_VALUES"]

MAX_GUIDANCE_VALUES = 8     # fused-step bindings (and CUDA graphs) an Engine keeps, one per guidance weight, LRU


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite: one sum (a NaN or Inf anywhere makes it
    non-finite), confirmed element by element only when the sum is not finite (finite values can overflow it)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def lru_get(cache: OrderedDict, key, make, limit: int):
    """cache[key], made on a miss; the least recently used entry goes beyond ``limit``."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > limit:
        cache.popitem(last=False)
    return value


def _check_int64(name: str, t, B: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (B,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape ({B},), got {got}")


class Engine:
    """Static buffers and the sampling loop for one (backend, plan, batch, sample shape, device, guidance)."""

    def __init__(self, backend: Backend, plan: Plan, batch: int, sample_shape: Sequence[int],
                 device: torch.device | str = "cpu", guidance: bool = False, f_dtype: torch.dtype = torch.float32,
                 in_dtype: torch.dtype = torch.float32, graph: bool = True, impl: str = "auto", null_label: int = 0,
                 cond_inputs: Sequence[CondInput] | None = None):
        """``cond_inputs``: the model's conditioning inputs (``Model.cond``), each given on every request; None (the
        low-level default) means optional class labels with ``null_label`` as the unconditional label."""
        from edmrt.kernels import plan_table

        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be an edmrt Plan, got {type(plan).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self.device = torch.device(device)
        self.backend, self.plan, self.batch = backend, plan, batch
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.guidance = bool(guidance)
        B, shp, dev = batch, self.sample_shape, self.device
        nB = 2 * B if self.guidance else B
        self.table = plan_table(plan, dev)
        self.x = torch.zeros((B,) + shp, device=dev)                          # (B, C, H, W) committed state
        self.x_eval = torch.zeros_like(self.x)                               # (B, C, H, W) evaluation point
        self.x0: torch.Tensor | None = None                                  # (B, C, H, W) a given initial state
        self.Z: torch.Tensor | None = None                                   # (S, B, C, H, W) given noise maps
        self.Y = torch.zeros((plan.history, B) + shp, device=dev)             # (K, B, C, H, W) history ring
        self.x_in = torch.zeros((nB,) + shp, device=dev, dtype=in_dtype)      # (B or 2B, C, H, W) network input
        self.sigma_in = torch.zeros(nB, device=dev, dtype=in_dtype)           # (B or 2B,) c_noise
        self.F = torch.zeros((nB,) + shp, device=dev, dtype=f_dtype)          # (B or 2B, C, H, W) network output
        self.seeds = torch.zeros(B, dtype=torch.int64, device=dev)
        self.null_label = int(null_label)
        self.optional_cond = cond_inputs is None
        self.cond_inputs = ((CondInput("class_labels", (), torch.int64, null=self.null_label),) if cond_inputs is None
                            else tuple(cond_inputs))
        if not all(isinstance(c, CondInput) for c in self.cond_inputs):
            raise ValueError(f"cond_inputs must be edmrt.CondInput objects, got {cond_inputs!r:.200}")
        # (B or 2B, *shape) per input: [uncond rows; cond rows] with guidance.
        self.cond = {c.name: torch.zeros((nB,) + c.shape, dtype=c.dtype, device=dev) for c in self.cond_inputs}
        self.impl = impl
        self._steppers: OrderedDict = OrderedDict()
        self._graphs: OrderedDict = OrderedDict()
        self.use_graph = bool(graph) and dev.type == "cuda"
        self.lock = threading.Lock()
        self.stepper(None if not self.guidance else 1.0)  # validates every buffer now

    def stepper(self, w: float | None):
        """The fused step bound to this engine's buffers for guidance weight ``w`` (validated once)."""
        from edmrt.kernels import Stepper

        return lru_get(self._steppers, w, lambda: Stepper(
            self.table, self.x, self.x_eval, self.Y, self.x_in, self.sigma_in, self.seeds, guidance=w,
            f_dtype=self.F.dtype, impl=self.impl), MAX_GUIDANCE_VALUES)

    def _init(self, step, given: bool) -> None:
        """Initial state: t_0 N(seed) (+ churn), or the given x0 (+ churn)."""
        from edmrt.kernels import init_state

        init_state(self.table, float(self.plan.sigmas[0]), self.plan.n_init, self.seeds, self.x, self.x_eval,
                   self.x_in, self.sigma_in, impl=step.impl, x0=self.x0 if given else None, check=False)

    @property
    def labels(self) -> torch.Tensor | None:
        """The class-label buffer (B or 2B,), when the model has class labels."""
        return self.cond.get("class_labels")

    def _loop(self, w: float | None, conditioned: bool, given: bool, maps: bool = False, progress=None) -> None:
        step = self.stepper(w)
        self._init(step, given)
        cond = self.cond if conditioned else None
        Z = self.Z if maps else None
        for s in range(self.plan.stages):
            # Network evaluation, then the fused update (which writes the next network input).
            step(s, self._network(s, cond), None if Z is None else Z[s])
            if progress is not None:
                progress(1)

    def _network(self, stage: int, cond) -> torch.Tensor:
        """The network's output F for stage ``stage`` at the current input.  A backend may hand back its own output
        tensor to be read as F (CallableBackend(pass_through=True)); else F is self.F.  (An engine that combines
        several rows into F, ``edmrt.pipelines.edit.EditEngine``, overrides this.)"""
        F = self.backend(self.x_in, self.sigma_in, cond, self.F)
        if F is None:
            return self.F
        if self.use_graph:  # a captured graph replays fixed addresses
            return self.F.copy_(F)
        return F

    def _first_nonfinite(self, w: float | None, conditioned: bool, given: bool, maps: bool = False) -> str:
        """Run the loop again (eagerly), checking after every stage: where NaN or Inf first appears."""
        step = self.stepper(w)
        self._init(step, given)
        if not bool(torch.isfinite(self.x).all()):
            return "the initial state (check x_init)"
        cond = self.cond if conditioned else None
        for s in range(self.plan.stages):
            F = self._network(s, cond)
            where = f"stage {s} of {self.plan.stages} (sigma = {float(self.plan.sigma[s]):.4g})"
            if not bool(torch.isfinite(F).all()):
                return f"the network's output at {where}: check the network and its weights"
            step(s, F, self.Z[s] if maps else None)
            if not bool(torch.isfinite(self.x_eval).all()):
                return (f"the update of {where}: the network's output is finite but too large "
                        f"(max |F| = {float(F.abs().max()):.3g})")
        return "no stage when run again (the network is not deterministic?)"

    def run(self, seeds: torch.Tensor, cond=None, guidance: float | None = None, x_init: torch.Tensor | None = None,
            uncond: dict | None = None, x_init_scale: float = 1.0,
            noise_maps: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``batch`` images for ``seeds`` (B,) int64; returns a new tensor.

        ``cond``: {name: (B, *shape) tensor} for every conditioning input (a bare (B,) int64 tensor is class labels);
        ``uncond``: the unconditional rows of inputs whose null is None (negative prompt embeddings), same form.
        ``x_init``: a given initial state (float32, shaped like the state) instead of t_0 times the seeds' noise;
        the seeds then only key the plan's own noise (churn, stochastic stages).  ``x_init_scale``: the initial state
        is ``x_init_scale * x_init``, computed into the engine's buffer (``edmrt.solve`` passes t_0 and its noise
        rather than allocating t_0 * noise).  ``noise_maps``: (stages, B, *shape) float32, stage s's noise z in place
        of its Philox draw (a DDPM inversion's maps, ``fit_noise_maps``)."""
        return self.run_request(self.request(seeds, cond, guidance, x_init, uncond, x_init_scale, noise_maps))

    def request(self, seeds: torch.Tensor, cond=None, guidance: float | None = None, x_init: torch.Tensor | None = None,
                uncond: dict | None = None, x_init_scale: float = 1.0,
                noise_maps: torch.Tensor | None = None) -> Request:
        """``run``'s arguments as a ``Request``, checked against this engine's buffers; ValueError naming the argument."""
        B = self.batch
        _check_int64("seeds", seeds, B)
        cond = self._check_cond("cond", cond)
        uncond = self._check_cond("uncond", uncond) if uncond is not None else {}
        if x_init is not None and (not isinstance(x_init, torch.Tensor) or x_init.dtype != torch.float32
                                   or x_init.shape != self.x.shape or x_init.device != self.device):
            raise ValueError(f"x_init must be a float32 tensor of shape {tuple(self.x.shape)} on {self.device}")
        if not is_real(x_init_scale) or not math.isfinite(float(x_init_scale)):
            raise ValueError(f"x_init_scale must be a finite real number, got {x_init_scale!r}")
        if x_init is None and x_init_scale != 1.0:
            raise ValueError("x_init_scale scales x_init: pass x_init too")
        maps_shape = (self.plan.stages,) + tuple(self.x.shape)
        if noise_maps is not None and (not isinstance(noise_maps, torch.Tensor) or noise_maps.dtype != torch.float32
                                       or tuple(noise_maps.shape) != maps_shape or noise_maps.device != self.device
                                       or not all_finite(noise_maps)):
            raise ValueError(f"noise_maps must be a finite float32 tensor of shape {maps_shape} (stages, batch, "
                             f"*shape) on {self.device}")
        if self.guidance:
            if guidance is None:
                raise ValueError("this engine was built for classifier-free guidance: pass a guidance weight")
            if cond is None:
                raise ValueError("classifier-free guidance needs cond (the conditional half: labels, embeddings)")
            missing = [c.name for c in self.cond_inputs if c.null is None and c.name not in uncond]
            if missing:
                raise ValueError(f"classifier-free guidance needs uncond for {missing} (e.g. negative prompt "
                                 "embeddings): these inputs have no null value")
        elif guidance is not None:
            raise ValueError("this engine was built without guidance (Engine(..., guidance=True) enables it)")
        elif uncond:
            raise ValueError("uncond is used only with classifier-free guidance (pass guidance=w)")
        w = check_guidance(guidance) if self.guidance else None
        return Request(seeds, cond, w, uncond, x_init, float(x_init_scale), noise_maps)

    def run_request(self, req: Request, progress=None) -> torch.Tensor:
        """Sample the checked request ``req`` (``make_request`` or ``request``); returns a new tensor.  Only that it
        fits this engine is checked here: its batch, guidance on or off, the inputs its buffers hold.
        ``progress``: called with the number of stages done since its last call (after every stage eagerly; once,
        with all of them, after a CUDA graph's replay), e.g. a tqdm bar's ``update``."""
        cond_names = None if req.cond is None else set(req.cond)
        maps = req.noise_maps
        if maps is not None and tuple(maps.shape) != (self.plan.stages,) + tuple(self.x.shape):
            raise ValueError(f"the request's noise maps {tuple(maps.shape)} are not this engine's (stages, batch, "
                             f"*shape) = {(self.plan.stages,) + tuple(self.x.shape)}")
        if (req.batch != self.batch or (req.guidance is not None) != self.guidance
                or (self.guidance and req.cond is None)
                or (cond_names is not None and cond_names != {c.name for c in self.cond_inputs})):
            raise ValueError(f"the request (batch {req.batch}, guidance {req.guidance}, inputs "
                             f"{sorted(cond_names or ())}) is not one this engine runs (batch {self.batch}, guidance "
                             f"{'on' if self.guidance else 'off'}, inputs {[c.name for c in self.cond_inputs]})")
        with self.lock:
            self._copy_inputs(req)
            key = (req.guidance, req.cond is not None, req.x_init is not None, maps is not None)
            if self.use_graph:
                lru_get(self._graphs, key, lambda: self._capture(key), MAX_GUIDANCE_VALUES).replay()
                if progress is not None:
                    progress(self.plan.stages)
            else:
                self._loop(*key, progress=progress)
            x = self.x.clone()
            if not all_finite(x):  # one reduction per request
                raise FloatingPointError(f"sampling produced NaN or Inf, first in {self._first_nonfinite(*key)}")
            return x

    def fit_noise_maps(self, req: Request, targets: torch.Tensor, progress=None) -> torch.Tensor:
        """The noise maps that take this engine's loop, started from ``req.x_init``, through ``targets``
        (stages, B, *shape): stage s's map z_s makes its update land on targets[s] (the edit-friendly DDPM
        inversion, Huberman-Spiegelglas et al. 2024, Eq. 5: z_s = (x_{s+1} - mu_s(x_s)) / n_s).

        Teacher-forced and exact in the kernel's own arithmetic: each stage runs once with z = 0 to give its mean
        mu_s (the update without noise, as the fused step computes it), z_s = (targets[s] - mu_s) / n_s in float64,
        then the stage runs again from the same buffers with z_s, so the state is the one ``run`` with these maps
        computes, float for float (same engine, same request).  Stages with n_s = 0 keep their update (z_s = 0).
        Returns (stages, B, *shape) float32; run the request with ``noise_maps=`` to follow them.  ``progress`` as
        ``run_request``'s (after every stage)."""
        shape = (self.plan.stages,) + tuple(self.x.shape)
        if (not isinstance(targets, torch.Tensor) or not targets.is_floating_point() or tuple(targets.shape) != shape
                or targets.device != self.device or not all_finite(targets)):
            raise ValueError(f"targets must be a finite floating-point tensor of shape {shape} on {self.device}")
        if req.x_init is None:
            raise ValueError("fit_noise_maps starts from a given state: the request needs x_init")
        Z = torch.zeros(shape, device=self.device)
        with self.lock:
            self._copy_inputs(req)
            step = self.stepper(req.guidance)
            self._init(step, True)
            cond = self.cond if req.cond is not None else None
            zero = torch.zeros_like(self.x)
            for s in range(self.plan.stages):
                F = self._network(s, cond)
                n = float(self.plan.n[s])
                if n != 0.0:
                    x, x_eval = self.x.clone(), self.x_eval.clone()
                    step(s, F, zero)     # writes x_eval = mu_s (and x, x_in); Y[s] does not depend on z
                    Z[s] = ((targets[s].double() - self.x_eval.double()) / n).float()
                    self.x.copy_(x)
                    self.x_eval.copy_(x_eval)
                step(s, F, Z[s] if n != 0.0 else None)
                if progress is not None:
                    progress(1)
            if not all_finite(self.x):
                raise FloatingPointError("fitting noise maps produced NaN or Inf: check the network and the targets")
        return Z

    def _check_cond(self, what: str, cond) -> dict | None:
        """``cond`` as {name: (B, *shape) tensor of the input's dtype on this device}, or None; ValueError naming it."""
        if cond is None:
            if what == "cond" and not self.optional_cond and self.cond_inputs:
                raise ValueError(f"cond must give the model's conditioning inputs {[c.name for c in self.cond_inputs]}")
            return None
        if not isinstance(cond, (dict, torch.Tensor)):
            raise ValueError(f"{what} must be a dict of tensors (name -> (B, ...) tensor), got {type(cond).__name__}")
        cond = named_cond(cond)
        known = {c.name: c for c in self.cond_inputs}
        unknown = sorted(set(cond) - set(known))
        if unknown or not self.cond_inputs:
            raise ValueError(f"{what} has inputs {unknown or sorted(cond)} the model does not take; it takes {sorted(known)}")
        if what == "cond" and set(cond) != set(known):
            raise ValueError(f"cond must give every conditioning input {sorted(known)}, got {sorted(cond)}")
        for name, t in cond.items():
            c, shape = known[name], (self.batch,) + known[name].shape
            if not isinstance(t, torch.Tensor) or t.dtype != c.dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                dt = str(c.dtype).removeprefix("torch.")
                raise ValueError(f"{name} must be {'an' if dt[0] == 'i' else 'a'} {dt} tensor of shape {shape}, got {got}")
        return cond

    def _copy_inputs(self, req: Request) -> None:
        """The request into the static buffers: seeds, both halves of every conditioning input, the initial state."""
        B, cond, uncond, x_init, scale = self.batch, req.cond, req.uncond, req.x_init, req.x_init_scale
        self.seeds.copy_(req.seeds)
        if req.noise_maps is not None:
            if self.Z is None:
                self.Z = torch.empty((self.plan.stages,) + tuple(self.x.shape), device=self.device)
            self.Z.copy_(req.noise_maps.detach())
        if cond is not None:
            for c in self.cond_inputs:
                buf = self.cond[c.name]
                buf[-B:].copy_(cond[c.name])
                if self.guidance:  # the unconditional half
                    if c.name in uncond:
                        buf[:B].copy_(uncond[c.name])
                    elif c.null == "cond":
                        buf[:B].copy_(cond[c.name])
                    else:
                        buf[:B].fill_(c.null)
        if x_init is not None:
            if self.x0 is None:
                self.x0 = torch.empty_like(self.x)
            if scale == 1.0:
                self.x0.copy_(x_init.detach())  # the engine's buffers never join an autograd graph
            else:
                torch.mul(x_init.detach(), scale, out=self.x0)

    def _capture(self, key) -> "torch.cuda.CUDAGraph":
        """Warm up on a side stream (Triton compilation, cuDNN autotuning), then capture the whole loop."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._loop(*key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._loop(*key)
        return g
