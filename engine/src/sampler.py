"""The Sampler: a model, a plan built once from the model card's defaults or the caller's choice, a backend, and one
engine (``edmrt.engine``) per (batch size, guidance on/off), built on first use.

``Sampler.sample`` checks its arguments once (``edmrt.request.make_request``) and hands the checked request to the
engine for its batch size.

Thread safety: a ``Sampler`` may be shared by threads: its engines (one per batch size and guidance on/off, at most
``max_engines``, least recently used evicted) are built under its lock, and requests of different batch sizes run
concurrently on different engines (the backends allow it: torch modules, ONNX Runtime with one I/O binding per
engine, TensorRT under a lock); an engine serves one request at a time.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict

import torch

from .adapters.lora import adapters_of, reading_weights
from .backends import Backend, resolve_backend
from .checks import check_device, check_seeds, check_signature
from .engine import Engine, lru_get
from .model import Model, card_options, card_schedule_options, card_shift, free_inputs, sampling_defaults
from .plan import Plan
from .progress import stage_progress
from .request import make_request
from .schedules import make_sigmas
from .solvers import build_plan

__all__ = ["Sampler", "MAX_ENGINES"]

FREE_SIZE_BACKENDS = ("torch", "torch-compile", "torch-bf16")   # run a model with other free sizes (longer prompts)
MAX_ENGINES = 8             # engines a Sampler keeps (one per batch size and guidance on/off), LRU


class Sampler:
    """High-level sampler: ``Sampler(model, solver="heun", steps=18, backend="auto").sample(seeds, cond, guidance)``.

    ``solver``, ``steps`` and ``schedule`` left at None take the model card's defaults (``sampling_defaults``:
    Heun with 18 steps for the teacher; the consistency solver with 2 steps on its chosen levels for a student).
    ``plan``: a ``Plan`` built for this model's preconditioning (``edmrt.plan(solver, sigmas, model.precond)``: a
    schedule that runs upward, a fitted plan, a plan read from JSON) instead of solver, steps, schedule and options.
    ``backend``: a name (``edmrt.backends``) or a backend object.  Engines are built on first use for each
    (batch size, guidance on/off) and reused; at most ``max_engines`` are kept (least recently used evicted).
    Safe to share between threads (module docstring).
    """

    def __init__(self, model, solver: str | None = None, steps: int | None = None, backend: str | Backend = "auto",
                 schedule=None, rho: float = 7.0, device: torch.device | str | None = None, graph: bool = True,
                 max_engines: int = MAX_ENGINES, plan: Plan | None = None, **options):
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
        if plan is not None:
            self.plan = self._check_plan(plan, model, solver, steps, schedule, options)
            self.solver, self.steps = plan.solver, plan.steps
        else:
            if solver is None and not options:
                options = card_options(model)   # the card's solver runs with the card's options
            self.solver, self.steps, schedule = sampling_defaults(model, solver, steps, schedule)
            sigmas = make_sigmas(schedule, self.steps, model.sigma_min, model.sigma_max, rho, card_shift(model),
                                 card_schedule_options(model))
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
        self._free_backends: OrderedDict[tuple, Backend] = OrderedDict()   # by resolved inputs (longer prompts), LRU
        self._lock = threading.Lock()

    @staticmethod
    def _check_plan(plan, model: Model, solver, steps, schedule, options) -> Plan:
        """A given plan: a Plan, alone (no solver, steps, schedule or options beside it), built for the model's
        preconditioning (another one's coefficients would sample garbage)."""
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be an edmrt Plan (edmrt.plan(...), Plan.load(...)), got {type(plan).__name__}")
        given = [k for k, v in (("solver", solver), ("steps", steps), ("schedule", schedule)) if v is not None]
        if given or options:
            raise ValueError(f"plan is the whole sampler: pass it without {given + sorted(options)}")
        want = json.loads(json.dumps(model.precond.to_dict()))
        if json.loads(json.dumps(plan.precond)) != want:
            raise ValueError(f"plan was built for the preconditioning {plan.precond}, the model's is {want}: build it "
                             "with edmrt.plan(solver, sigmas, model.precond)")
        return plan

    def engine(self, batch: int, guidance: bool, inputs: tuple | None = None) -> Engine:
        """The engine for (batch, guidance on/off), built on first use (under the Sampler's lock); ``inputs``: the
        conditioning inputs with their free sizes resolved (``free_inputs``), default the model's."""
        inputs = self.model.cond if inputs is None else tuple(inputs)
        with self._lock:
            backend = self.backend if inputs == self.model.cond else self._backend_for(inputs)
            return lru_get(self._engines, (batch, guidance, inputs), lambda: Engine(
                backend, self.plan, batch, self.model.sample_shape, self.device, guidance, graph=self.graph,
                null_label=self.model.null_label, cond_inputs=inputs), self.max_engines)

    def _backend_for(self, inputs: tuple):
        """A backend for the model with other free sizes (a longer prompt): the torch backends run any shape and
        are built again for it (the same network); the others were built (exported) for the model's sizes."""
        if self.backend_name not in FREE_SIZE_BACKENDS:
            diff = {c.name: c.shape for c, m in zip(inputs, self.model.cond) if c.shape != m.shape}
            model = {c.name: c.shape for c in self.model.cond if c.name in diff}
            raise ValueError(f"cond gives {diff} per sample; backend {self.backend_name!r} was built for {model}: "
                             f"build the model with cond_shapes={diff} (from_diffusers / edmrt.load), or use one of "
                             f"the backends {list(FREE_SIZE_BACKENDS)}")
        return lru_get(self._free_backends, inputs, lambda: resolve_backend(
            self.backend_name, dataclasses.replace(self.model, cond=inputs), self.device)[1], self.max_engines)

    def set_adapters(self, weights=None, combination: str = "linear", **merge_kw) -> None:
        """Fuse the model's loaded LoRA / DoRA adapters (``edmrt.adapters.lora.load_adapter``) with ``weights``
        {name: weight} into the network's weights, in place: no engine, CUDA graph or backend is rebuilt.

        The fused weights (``AdapterSet.fused_weights``: one adapter scaled by its weight; several combined by peft's
        ``add_weighted_adapter`` with ``combination`` and ``merge_kw``: density, majority_sign_method, seed) are
        copied into the same parameter tensors (same data_ptr) once no request reads them (the network's
        ``AdapterSet.swap``: every Sampler and engine on it), so no request sees half a swap.  ``weights`` {} or None restores the base weights bit for bit.  A backend that runs the network's own
        parameters (``shares_weights``: torch, torch-compile, torch-bf16, custom) sees the change at once; one that
        holds a copy is told by ``update_weights({param_name: tensor})`` (an ONNX session taking ``AdapterSet.targets``
        as inputs, a refittable TensorRT engine); a backend with neither is refused.

        ValueError: no adapters loaded, an unknown adapter name, a weight that is not finite, an unknown
        combination, or a backend that baked the weights in."""
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
        # The weights are the network's: the swap waits for every request that reads them (this Sampler's, an evicted
        # engine's, another Sampler's on the same network) and holds new ones back until it is done.
        with adapters.swap.writing():
            adapters.write(fused, adapters.check_weights(weights))
            if callable(update):
                update(fused)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def sample(self, seeds, cond=None, guidance: float | None = None, uncond=None, noise=None,
               output: str | None = None, x_init=None, inversion=None, progress=False) -> torch.Tensor:
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
        ``x_init``: the initial state itself instead (e.g. the images a plan that runs upward inverts).
        ``inversion``: an ``edmrt.invert`` result: the state starts where it ended (its latents), so sampling with
        the inverted solver and steps reconstructs its images; this plan must start at the level it reached.
        ``output``: "latent" (the final state) or "image" (decoded by the model's decoder; the default when it has
        one).  ``progress``: True for a progress bar over the stages (tqdm), or a callable given the number of
        stages done since its last call.  Raises FloatingPointError, naming the stage, when the result holds NaN or
        Inf."""
        output = self._check_output(output)
        maps = None
        if inversion is not None:
            x_init, maps = self._inversion_start(inversion, x_init, noise)
            n = len(check_seeds(seeds))
            if n != x_init.shape[0]:
                raise ValueError(f"seeds: the inversion holds {x_init.shape[0]} images; got {n} seeds")
        inputs = free_inputs(self.model.cond, cond, uncond)
        req = make_request(inputs, self.model.sample_shape, self.device, seeds, cond, guidance, uncond, noise,
                           t0=float(self.plan.sigmas[0]), x_init=x_init)
        if maps is not None:
            req = dataclasses.replace(req, noise_maps=maps.to(self.device))
        with stage_progress(progress, self.plan.stages, "sample") as tick:
            x = self._locked(req, lambda engine: engine.run_request(req, tick), inputs)
        return self.decode(x) if output == "image" else x

    def _locked(self, req, fn, inputs: tuple | None = None):
        """``fn(engine)`` on the engine for ``req`` (and its ``inputs``), reading the live weights for the whole run:
        an adapter swap waits (SwapLock)."""
        engine = self.engine(req.batch, req.guidance is not None, inputs)
        with reading_weights(self.model):
            return fn(engine)

    def fit_noise_maps(self, seeds, x_init, targets, cond=None, guidance: float | None = None,
                       uncond=None, progress=False) -> torch.Tensor:
        """The noise maps (stages, N, *sample_shape) with which this sampler's plan, started at ``x_init``, passes
        through ``targets`` (stages, N, *sample_shape): the state after each stage (``Engine.fit_noise_maps``; the
        DDPM inversion of ``edmrt.invert(kind="ddpm")``).  Arguments as ``sample``'s."""
        inputs = free_inputs(self.model.cond, cond, uncond)
        req = make_request(inputs, self.model.sample_shape, self.device, seeds, cond, guidance, uncond,
                           t0=float(self.plan.sigmas[0]), x_init=x_init)
        with stage_progress(progress, self.plan.stages, "invert") as tick:
            return self._locked(req, lambda engine: engine.fit_noise_maps(req, targets.to(self.device), tick),
                                inputs)

    def _inversion_start(self, inversion, x_init, noise) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latents an inversion reached and its noise maps (None for an ODE inversion), checked against this
        sampler's plan: it starts at that level; a DDPM inversion's maps are for this very plan."""
        latents, level = getattr(inversion, "latents", None), getattr(inversion, "sigma_end", None)
        if not isinstance(latents, torch.Tensor) or level is None:
            raise ValueError(f"inversion must be an edmrt.invert result (an Inversion), got {type(inversion).__name__}")
        if x_init is not None or noise is not None:
            raise ValueError("inversion gives the initial state: pass it without noise or x_init")
        if self.plan.direction != "down" or abs(float(self.plan.sigmas[0]) - level) > 1e-9 * level:
            raise ValueError(f"inversion ended at sigma = {level:g}; this sampler's plan starts at "
                             f"{float(self.plan.sigmas[0]):g} ({self.plan.direction}): sample with the plan it inverted "
                             "(inversion.sampler_args)")
        maps = getattr(inversion, "noise_maps", None)
        if maps is not None and getattr(inversion, "plan", None) != self.plan:
            raise ValueError(f"inversion's noise maps are for the plan it fitted ({inversion.solver}, "
                             f"{inversion.plan.stages} stages); this sampler runs {self.plan.solver} with "
                             f"{self.plan.stages}: sample with Sampler(model, **inversion.sampler_args)")
        return latents, maps

    def _check_output(self, output):
        return self._check_output_for(self.model, output)

    @staticmethod
    def _check_output_for(model, output):
        """"latent" or "image" (the default when the model has a decoder); ValueError otherwise."""
        if output is None:
            return "image" if model.decoder is not None else "latent"
        if output not in ("latent", "image"):
            raise ValueError(f"output must be 'latent' or 'image', got {output!r}")
        if output == "image" and model.decoder is None:
            raise ValueError("output='image' needs a model with a decoder (a VAE: edmrt.from_diffusers(..., vae=vae))")
        return output

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
