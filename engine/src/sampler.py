"""The engine (static buffers and the sampling loop) and the Sampler in front of it.

``Engine``: one set of buffers for (backend, plan, batch, sample shape, device, guidance).  Per request the
loop is: the initial state (Philox noise from the seeds, or a given state), then for every stage one
backend call (the network writes F into a static buffer) and one fused step (which writes the next
network input).  No allocation, no host sync and no Python branching on device values inside the loop;
on CUDA the whole loop is captured once in one ``torch.cuda.CUDAGraph`` and replayed for later requests
after the seeds and the conditioning (class labels, text embeddings, ...) are copied into their static buffers.

Conditioning: one static buffer per conditioning input the model declares (``edmrt.CondInput``), of shape
(B, *shape), or (2B, *shape) under classifier-free guidance: rows [0, B) the unconditional half (the input's null
value, the caller's ``uncond``, or the conditional rows again), rows [B, 2B) the conditional half; the network runs
both halves in one batch and the fused step forms F_u + w (F_c - F_u).

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
from .checks import check_device, check_seeds, check_signature, is_real
from .model import CondInput, Model, sampling_defaults
from .plan import Plan
from .schedules import make_sigmas
from .solvers import build_plan

__all__ = ["all_finite", "Engine", "Sampler", "GUIDANCE_MAX", "MAX_ENGINES", "MAX_GUIDANCE_VALUES"]

GUIDANCE_MAX = 100.0        # classifier-free guidance weights beyond this are typos (practice: 1 - 20)
MAX_ENGINES = 8             # engines a Sampler keeps (one per batch size and guidance on/off), LRU
MAX_GUIDANCE_VALUES = 8     # fused-step bindings (and CUDA graphs) an Engine keeps, one per guidance weight, LRU



def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite: one sum (a NaN or Inf anywhere makes it
    non-finite), confirmed element by element only when the sum is not finite (finite values can overflow it)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())

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

        return _lru_get(self._steppers, w, lambda: Stepper(
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

    def _loop(self, w: float | None, conditioned: bool, given: bool) -> None:
        step = self.stepper(w)
        self._init(step, given)
        cond = self.cond if conditioned else None
        for s in range(self.plan.stages):
            # Network evaluation, then the fused update (which writes the next network input).  A backend may hand
            # back its own output tensor to be read as F (CallableBackend(pass_through=True)); else F is self.F.
            F = self.backend(self.x_in, self.sigma_in, cond, self.F)
            if F is None:
                F = self.F
            elif self.use_graph:  # a captured graph replays fixed addresses
                F = self.F.copy_(F)
            step(s, F)

    def _first_nonfinite(self, w: float | None, conditioned: bool, given: bool) -> str:
        """Run the loop again (eagerly), checking after every stage: where NaN or Inf first appears."""
        step = self.stepper(w)
        self._init(step, given)
        if not bool(torch.isfinite(self.x).all()):
            return "the initial state (check x_init)"
        cond = self.cond if conditioned else None
        for s in range(self.plan.stages):
            F = self.backend(self.x_in, self.sigma_in, cond, self.F)
            F = self.F if F is None else F
            where = f"stage {s} of {self.plan.stages} (sigma = {float(self.plan.sigma[s]):.4g})"
            if not bool(torch.isfinite(F).all()):
                return f"the network's output at {where}: check the network and its weights"
            step(s, F)
            if not bool(torch.isfinite(self.x_eval).all()):
                return (f"the update of {where}: the network's output is finite but too large "
                        f"(max |F| = {float(self.F.abs().max()):.3g})")
        return "no stage when run again (the network is not deterministic?)"

    def run(self, seeds: torch.Tensor, cond=None, guidance: float | None = None, x_init: torch.Tensor | None = None,
            uncond: dict | None = None, x_init_scale: float = 1.0) -> torch.Tensor:
        """Sample ``batch`` images for ``seeds`` (B,) int64; returns a new tensor.

        ``cond``: {name: (B, *shape) tensor} for every conditioning input (a bare (B,) int64 tensor is class labels);
        ``uncond``: the unconditional rows of inputs whose null is None (negative prompt embeddings), same form.
        ``x_init``: a given initial state (float32, shaped like the state) instead of t_0 times the seeds' noise;
        the seeds then only key the plan's own noise (churn, stochastic stages).  ``x_init_scale``: the initial state
        is ``x_init_scale * x_init``, computed into the engine's buffer (``edmrt.solve`` passes t_0 and its noise
        rather than allocating t_0 * noise)."""
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
        with self.lock:
            self._copy_inputs(seeds, cond, uncond, x_init, float(x_init_scale))
            key = (w, cond is not None, x_init is not None)
            if self.use_graph:
                _lru_get(self._graphs, key, lambda: self._capture(key), MAX_GUIDANCE_VALUES).replay()
            else:
                self._loop(*key)
            x = self.x.clone()
            if not all_finite(x):  # one reduction per request
                raise FloatingPointError(f"sampling produced NaN or Inf, first in {self._first_nonfinite(*key)}")
            return x

    def _check_cond(self, what: str, cond) -> dict | None:
        """``cond`` as {name: (B, *shape) tensor of the input's dtype on this device}, or None; ValueError naming it."""
        if cond is None:
            if what == "cond" and not self.optional_cond and self.cond_inputs:
                raise ValueError(f"cond must give the model's conditioning inputs {[c.name for c in self.cond_inputs]}")
            return None
        if isinstance(cond, torch.Tensor):
            cond = {"class_labels": cond}
        if not isinstance(cond, dict):
            raise ValueError(f"{what} must be a dict of tensors (name -> (B, ...) tensor), got {type(cond).__name__}")
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

    def _copy_inputs(self, seeds, cond, uncond, x_init, scale: float = 1.0) -> None:
        B = self.batch
        self.seeds.copy_(seeds)
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
            check_signature(backend, "backend", "backend(x_in, c_noise, cond, out)", 4)
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
                null_label=self.model.null_label, cond_inputs=self.model.cond), self.max_engines)

    def set_adapters(self, weights=None, combination: str = "linear", **merge_kw) -> None:
        """Fuse the model's loaded LoRA / DoRA adapters (``edmrt.adapters.lora.load_adapter``) with ``weights``
        {name: weight} into the network's weights, in place: no engine, CUDA graph or backend is rebuilt.

        The fused weights (``AdapterSet.fused_weights``: one adapter scaled by its weight; several combined by peft's
        ``add_weighted_adapter`` with ``combination`` and ``merge_kw``: density, majority_sign_method, seed) are
        copied into the same parameter tensors (same data_ptr), under every engine's lock, so no request sees half
        a swap.  ``weights`` {} or None restores the base weights bit for bit.  A backend that runs the network's own
        parameters (``shares_weights``: torch, torch-compile, torch-bf16, custom) sees the change at once; one that
        holds a copy is told by ``update_weights({param_name: tensor})`` (an ONNX session taking ``AdapterSet.targets``
        as inputs, a refittable TensorRT engine); a backend with neither is refused.

        ValueError: no adapters loaded, an unknown adapter name, a weight that is not finite, an unknown
        combination, or a backend that baked the weights in."""
        from .adapters.lora import adapters_of

        adapters = adapters_of(self.model)
        if adapters is None:
            raise ValueError("this model has no adapters loaded (edmrt.adapters.lora.load_adapter(model, ...))")
        update = getattr(self.backend, "update_weights", None)
        # A backend object of the caller's own that says neither is taken to run the module's parameters.
        if not getattr(self.backend, "shares_weights", True) and not callable(update):
            raise ValueError(f"backend {self.backend_name!r} holds its own copy of the weights: set_adapters needs "
                             "backend 'torch' (or a backend with update_weights); or fuse before building it")
        fused = adapters.fused_weights(weights, combination, **merge_kw)  # validates names, weights, combination
        few = adapters.few_step_card(weights)
        current = self.model.precond.to_dict()
        needed = few[1]["precond"] if few else self.model.metadata.get("base_precond", current)
        if needed != current:
            raise ValueError(f"adapters {dict(weights or {})} need the preconditioning {needed}, this sampler's plan is "
                             f"built for {current} (a few-step adapter changes it): load the model with "
                             "edmrt.load(name, adapters=...) and build a new Sampler")
        with self._lock:
            engines = list(self._engines.values())
            for e in engines:
                e.lock.acquire()
            try:
                adapters.write(fused, adapters.check_weights(weights))
                if callable(update):
                    update(fused)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                for e in reversed(engines):
                    e.lock.release()

    def _cond_value(self, c: CondInput, value, N: int, what: str) -> torch.Tensor:
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
        return t.detach().to(device=self.device, dtype=c.dtype).contiguous()

    def _cond(self, cond, N: int, what: str = "cond") -> dict | None:
        """{name: (N, *shape)} from the caller's ``cond`` (a dict, or class labels for a class-only model); inputs it
        leaves out take their null value (class labels: the null label, an unconditional draw) or are refused."""
        inputs = self.model.cond
        if not inputs and cond is None:
            return None
        if cond is None and what == "cond":
            cond = {}  # every input takes its null value, or is named as missing
        if cond is None:
            return None
        if not inputs:
            raise ValueError(f"this model is unconditional: {what} must be None")
        if not isinstance(cond, dict):
            if [c.name for c in inputs] != ["class_labels"]:
                raise ValueError(f"{what} must be a dict {{name: tensor}} of the model's inputs "
                                 f"{[c.name for c in inputs]}, got {type(cond).__name__}")
            cond = {"class_labels": cond}
        unknown = sorted(set(cond) - {c.name for c in inputs})
        if unknown:
            raise ValueError(f"{what} has inputs {unknown} the model does not take; it takes {[c.name for c in inputs]}")
        out = {}
        for c in inputs:
            if c.name in cond:
                out[c.name] = self._cond_value(c, cond[c.name], N, what)
            elif what == "cond" and isinstance(c.null, (int, float)):
                out[c.name] = torch.full((N,) + c.shape, c.null, dtype=c.dtype, device=self.device)
            elif what == "cond":
                raise ValueError(f"cond must give {c.name!r} (shape {c.shape}, {c.dtype}): it has no null value")
        return out

    def sample(self, seeds, cond=None, guidance: float | None = None, uncond=None, noise=None,
               output: str | None = None) -> torch.Tensor:
        """Samples for N seeds: (N, *sample_shape) latents, or (N, 3, H, W) uint8 images when decoded.

        ``cond``: {name: tensor} for the model's conditioning inputs, each (N, *shape) or one (*shape) for all
        (a class-labelled model also takes N labels or one label); inputs left out take their null value.
        ``guidance``: CFG weight w in [0, GUIDANCE_MAX] (F = F_u + w (F_c - F_u); w = 1 is plain conditional
        sampling); ``uncond``: the unconditional rows (negative prompt embeddings), required for inputs without a
        null value.  ``noise``: (N, *sample_shape) standard normal noise instead of the seeds' Philox draw; the state
        starts at sigma_0 * noise, sigma_0 the schedule's first sigma (sigma_max for Karras).  A diffusers pipeline
        given ``latents=L`` starts at L * init_noise_sigma, in its own variance-preserving state for most discrete
        schedulers: ``edmrt.adapters.diffusers.initial_noise(L, scheduler)`` is the noise that starts at the same
        point.
        ``output``: "latent" (the final state) or "image" (decoded by the model's decoder; the default when it has
        one).  Raises FloatingPointError, naming the stage, when the result holds NaN or Inf."""
        seeds_t = torch.tensor(check_seeds(seeds), dtype=torch.int64)
        N = seeds_t.numel()
        output = self._check_output(output)
        w = check_guidance(guidance)
        if w is not None and cond is None:
            raise ValueError("guidance needs cond (class labels or the conditioning inputs)")
        if uncond is not None and w is None:
            raise ValueError("uncond is used only with classifier-free guidance (pass guidance=w)")
        cond_t, uncond_t = self._cond(cond, N), self._cond(uncond, N, "uncond")
        x_init = self._x_init(noise, N)
        e = self.engine(N, w is not None)
        x = e.run(seeds_t.to(self.device), cond_t, w, x_init=x_init, uncond=uncond_t)
        return self.decode(x) if output == "image" else x

    def _check_output(self, output):
        if output is None:
            return "image" if self.model.decoder is not None else "latent"
        if output not in ("latent", "image"):
            raise ValueError(f"output must be 'latent' or 'image', got {output!r}")
        if output == "image" and self.model.decoder is None:
            raise ValueError("output='image' needs a model with a decoder (a VAE: edmrt.from_diffusers(..., vae=vae))")
        return output

    def _x_init(self, noise, N: int) -> torch.Tensor | None:
        """sigma_0 * noise as the initial state, after checking noise: (N, *sample_shape), real, finite."""
        if noise is None:
            return None
        shape = (N,) + self.model.sample_shape
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or tuple(noise.shape) != shape:
            got = f"{noise.dtype} {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a floating-point tensor of shape {shape}, got {got}")
        x = (noise.detach().to(self.device, torch.float64) * float(self.plan.sigmas[0])).float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("noise must be finite (and sigma_max * noise within float32)")
        return x

    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 from latents, by the model's decoder (output in [-1, 1]) in chunks of ``batch``."""
        if self.model.decoder is None:
            raise ValueError("this model has no decoder")
        chunks = []
        with torch.inference_mode():
            for i in range(0, latents.shape[0], batch):
                img = self.model.decoder(latents[i:i + batch])
                if not isinstance(img, torch.Tensor) or img.ndim != 4 or not bool(torch.isfinite(img).all()):
                    raise FloatingPointError(f"the decoder returned {type(img).__name__} "
                                             f"{tuple(getattr(img, 'shape', ()))}: expected finite (N, C, H, W) images")
                chunks.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(chunks)
