"""The engine (static buffers and the sampling loop) and the Sampler in front of it.

``Engine``: one set of buffers for (backend, plan, batch, sample shape, device, guidance).  Per request the
loop is: the initial state (Philox noise from the seeds, or a given state), then for every stage one
backend call (the network writes F into a static buffer) and one fused step (which writes the next
network input).  No allocation, no host sync and no Python branching on device values inside the loop;
on CUDA the whole loop is captured once in one ``torch.cuda.CUDAGraph`` and replayed for later requests
after the seeds and labels are copied into their static buffers.

``Sampler``: a model, a plan built once from the model card's defaults or the caller's choice, a backend,
and one engine per (batch size, guidance on/off), built on first use.

Every result is checked once for NaN and Inf (one reduction per request, not per stage); only when it fails is
the loop run again, checked stage by stage, to name where the values first went non-finite.

Thread safety: an ``Engine`` holds one set of buffers, so ``run`` takes the engine's lock; requests from
several threads are served one after another.  A ``Sampler`` may be shared by threads: its engines (one per
batch size and guidance on/off, at most ``max_engines``, least recently used evicted) are built under its lock,
and requests of different batch sizes run concurrently on different engines (the backends allow it:
torch modules, ONNX Runtime with one I/O binding per engine, TensorRT under a lock).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from .backends import Backend, resolve_backend
from .checks import check_device, check_signature, is_real
from .executor import check_seeds
from .model import Model, sampling_defaults
from .plan import Plan
from .schedules import make_sigmas
from .solvers import build_plan

__all__ = ["Engine", "Sampler", "GUIDANCE_MAX", "MAX_ENGINES", "MAX_GUIDANCE_VALUES"]

GUIDANCE_MAX = 100.0        # classifier-free guidance weights beyond this are typos (practice: 1 - 20)
MAX_ENGINES = 8             # engines a Sampler keeps (one per batch size and guidance on/off), LRU
MAX_GUIDANCE_VALUES = 8     # fused-step bindings (and CUDA graphs) an Engine keeps, one per guidance weight, LRU


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


def _lru_get(cache: OrderedDict, key, make, limit: int):
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
                 in_dtype: torch.dtype = torch.float32, graph: bool = True, impl: str = "auto", null_label: int = 0):
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
        self.Y = torch.zeros((plan.history, B) + shp, device=dev)             # (K, B, C, H, W) history ring
        self.x_in = torch.zeros((nB,) + shp, device=dev, dtype=in_dtype)      # (B or 2B, C, H, W) network input
        self.sigma_in = torch.zeros(nB, device=dev, dtype=in_dtype)           # (B or 2B,) c_noise
        self.F = torch.zeros((nB,) + shp, device=dev, dtype=f_dtype)          # (B or 2B, C, H, W) network output
        self.seeds = torch.zeros(B, dtype=torch.int64, device=dev)
        self.labels = torch.zeros(nB, dtype=torch.int64, device=dev)          # [null labels; labels] with guidance
        self.null_label = int(null_label)
        self.impl = impl
        self._steppers: OrderedDict = OrderedDict()
        self._graphs: OrderedDict = OrderedDict()
        self.use_graph = bool(graph) and dev.type == "cuda"
        self.lock = threading.Lock()
        self.stepper(None if not self.guidance else 1.0)  # validates every buffer now

    def stepper(self, w: float | None):
        """The fused step bound to this engine's buffers for guidance weight ``w`` (validated once)."""
        from edmrt.kernels import Stepper

        return _lru_get(self._steppers, w, lambda: Stepper(
            self.table, self.x, self.x_eval, self.Y, self.x_in, self.sigma_in, self.seeds, guidance=w,
            f_dtype=self.F.dtype, impl=self.impl), MAX_GUIDANCE_VALUES)

    def _init(self, step, given: bool) -> None:
        """Initial state: t_0 N(seed) (+ churn), or the given x0 (+ churn)."""
        from edmrt.kernels import init_state

        init_state(self.table, float(self.plan.sigmas[0]), self.plan.n_init, self.seeds, self.x, self.x_eval,
                   self.x_in, self.sigma_in, impl=step.impl, x0=self.x0 if given else None)

    def _loop(self, w: float | None, labels: bool, given: bool) -> None:
        step = self.stepper(w)
        self._init(step, given)
        lab = self.labels if labels else None
        for s in range(self.plan.stages):
            # Network evaluation, then the fused update (which writes the next network input).
            self.backend(self.x_in, self.sigma_in, lab, self.F)
            step(s, self.F)

    def _first_nonfinite(self, w: float | None, labels: bool, given: bool) -> str:
        """Run the loop again (eagerly), checking after every stage: where NaN or Inf first appears."""
        step = self.stepper(w)
        self._init(step, given)
        if not bool(torch.isfinite(self.x).all()):
            return "the initial state (check x_init)"
        lab = self.labels if labels else None
        for s in range(self.plan.stages):
            self.backend(self.x_in, self.sigma_in, lab, self.F)
            where = f"stage {s} of {self.plan.stages} (sigma = {float(self.plan.sigma[s]):.4g})"
            if not bool(torch.isfinite(self.F).all()):
                return f"the network's output at {where}: check the network and its weights"
            step(s, self.F)
            if not bool(torch.isfinite(self.x_eval).all()):
                return (f"the update of {where}: the network's output is finite but too large "
                        f"(max |F| = {float(self.F.abs().max()):.3g})")
        return "no stage when run again (the network is not deterministic?)"

    def run(self, seeds: torch.Tensor, labels: torch.Tensor | None = None, guidance: float | None = None,
            x_init: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``batch`` images for ``seeds`` (B,) int64 and optional ``labels`` (B,) int64; returns a new tensor.

        ``x_init``: a given initial state (float32, shaped like the state) instead of t_0 times the seeds' noise;
        the seeds then only key the plan's own noise (churn, stochastic stages)."""
        B = self.batch
        _check_int64("seeds", seeds, B)
        if labels is not None:
            _check_int64("labels", labels, B)
        if x_init is not None and (not isinstance(x_init, torch.Tensor) or x_init.dtype != torch.float32
                                   or x_init.shape != self.x.shape or x_init.device != self.device):
            raise ValueError(f"x_init must be a float32 tensor of shape {tuple(self.x.shape)} on {self.device}")
        if self.guidance:
            if guidance is None:
                raise ValueError("this engine was built for classifier-free guidance: pass a guidance weight")
            if labels is None:
                raise ValueError("classifier-free guidance needs labels (the conditional half)")
        elif guidance is not None:
            raise ValueError("this engine was built without guidance (Engine(..., guidance=True) enables it)")
        w = check_guidance(guidance) if self.guidance else None
        with self.lock:
            self._copy_inputs(seeds, labels, x_init)
            key = (w, labels is not None, x_init is not None)
            if self.use_graph:
                _lru_get(self._graphs, key, lambda: self._capture(key), MAX_GUIDANCE_VALUES).replay()
            else:
                self._loop(*key)
            x = self.x.clone()
            if not bool(torch.isfinite(x).all()):  # one reduction per request
                raise FloatingPointError(f"sampling produced NaN or Inf, first in {self._first_nonfinite(*key)}")
            return x

    def _copy_inputs(self, seeds, labels, x_init) -> None:
        B = self.batch
        self.seeds.copy_(seeds)
        if labels is not None:
            if self.guidance:
                self.labels[:B].fill_(self.null_label)
                self.labels[B:].copy_(labels)
            else:
                self.labels.copy_(labels)
        if x_init is not None:
            if self.x0 is None:
                self.x0 = torch.empty_like(self.x)
            self.x0.copy_(x_init.detach())  # the engine's buffers never join an autograd graph

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


class Sampler:
    """High-level sampler: ``Sampler(model, solver="heun", steps=18, backend="auto").sample(seeds, cond, guidance)``.

    ``solver``, ``steps`` and ``schedule`` left at None take the model card's defaults (``sampling_defaults``:
    Heun with 18 steps for the teacher; the consistency solver with 2 steps on its chosen levels for a student).
    ``backend``: a name (``edmrt.backends``) or a backend object.  Engines are built on first use for each
    (batch size, guidance on/off) and reused; at most ``max_engines`` are kept (least recently used evicted).
    Safe to share between threads (module docstring).
    """

    def __init__(self, model, solver: str | None = None, steps: int | None = None, backend: str | Backend = "auto",
                 schedule=None, rho: float = 7.0, device: torch.device | str | None = None, graph: bool = True,
                 max_engines: int = MAX_ENGINES, **options):
        if callable(model) and not isinstance(model, Model) and not isinstance(model, torch.nn.Module):
            raise ValueError("Sampler takes an edmrt Model (edmrt.load(...) or Model(network, ...)); "
                             "for a bare denoiser(x, sigma) use edmrt.solve")
        if not isinstance(model, Model):
            raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
        if isinstance(max_engines, bool) or not isinstance(max_engines, int) or max_engines < 1:
            raise ValueError(f"max_engines must be an int >= 1, got {max_engines!r}")
        self.model, self.max_engines = model, max_engines
        self.device = check_device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.solver, self.steps, schedule = sampling_defaults(model, solver, steps, schedule)
        sigmas = make_sigmas(schedule, self.steps, model.sigma_min, model.sigma_max, rho)
        self.plan = build_plan(self.solver, sigmas, model.precond, **options)
        if callable(backend) and not isinstance(backend, str):
            check_signature(backend, "backend", "backend(x_in, c_noise, class_labels, out)", 4)
            self.backend_name, self.backend = "custom", backend
        elif not isinstance(backend, str):
            raise ValueError(f"backend must be a name (edmrt.backends.BACKENDS, or 'auto') or a backend object, got "
                             f"{type(backend).__name__}")
        else:
            self.backend_name, self.backend = resolve_backend(backend, model, self.device)
        self.graph = graph
        self._engines: OrderedDict[tuple, Engine] = OrderedDict()
        self._lock = threading.Lock()

    def engine(self, batch: int, guidance: bool) -> Engine:
        """The engine for (batch, guidance on/off), built on first use (under the Sampler's lock)."""
        with self._lock:
            return _lru_get(self._engines, (batch, guidance), lambda: Engine(
                self.backend, self.plan, batch, self.model.sample_shape, self.device, guidance, graph=self.graph,
                null_label=self.model.null_label), self.max_engines)

    def _labels(self, cond, N: int) -> torch.Tensor | None:
        """N class labels from ``cond`` (N labels or one for all), the null label for an unconditional draw of a
        conditional model, None for an unconditional model.  Integers only: floats and bools are refused."""
        if cond is None:
            return torch.full((N,), self.model.null_label, dtype=torch.int64) if self.model.num_classes else None
        if not self.model.num_classes:
            raise ValueError("this model is unconditional: cond must be None")
        want = f"cond must hold one class in [0, {self.model.num_classes}) per seed (or one for all), as integers"
        if isinstance(cond, (torch.Tensor, np.ndarray)):
            integer = cond.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64) \
                if isinstance(cond, torch.Tensor) else cond.dtype.kind in "iu"
            if not integer or cond.ndim > 1:
                raise ValueError(f"{want}, got an array of {cond.dtype} and shape {tuple(cond.shape)}")
            values = cond.reshape(-1).tolist()
        else:
            values = list(cond) if isinstance(cond, (list, tuple, range)) else [cond]
            if any(isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__") for v in values):
                raise ValueError(f"{want}, got {cond!r:.200}")
        if any(not 0 <= int(v) < self.model.num_classes for v in values):
            raise ValueError(f"{want}, got {cond!r:.200}")
        labels = torch.tensor([int(v) for v in values], dtype=torch.int64)
        if labels.numel() == 1:
            labels = labels.expand(N).clone()
        if labels.numel() != N or bool((labels < 0).any()) or bool((labels >= self.model.num_classes).any()):
            raise ValueError(f"{want}, got {cond!r}" if labels.numel() <= 20 else f"{want} ({N} seeds)")
        return labels

    def sample(self, seeds, cond=None, guidance: float | None = None) -> torch.Tensor:
        """Samples (N, C, H, W) for N seeds; ``cond``: N class labels (or one for all); ``guidance``: CFG weight w
        in [0, GUIDANCE_MAX] (F = F_u + w (F_c - F_u); w = 1 is plain conditional sampling).  Raises
        FloatingPointError, naming the stage, when the result holds NaN or Inf."""
        seeds_t = torch.tensor(check_seeds(seeds), dtype=torch.int64)
        N = seeds_t.numel()
        labels = self._labels(cond, N)
        w = check_guidance(guidance)
        if w is not None and cond is None:
            raise ValueError("guidance needs cond (class labels)")
        e = self.engine(N, w is not None)
        return e.run(seeds_t.to(self.device), None if labels is None else labels.to(self.device), w)
