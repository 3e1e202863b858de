"""The engine: static buffers for (backend, plan, batch, shape, device, guidance), the whole loop, CUDA graphs.

Per request the loop is: initial Philox noise from the seeds, then for every stage one backend call
(the network writes F into a static buffer) and one fused step (which writes the next network input).
No allocation, no host sync and no Python branching on device values inside the loop; on CUDA the
whole loop (every stage, network and update) is captured once in one ``torch.cuda.CUDAGraph`` and
replayed for later requests after the seeds and labels are copied into their static buffers.

Thread safety: an ``Engine`` holds one set of buffers, so ``run`` takes the engine's lock; requests
from several threads are served one after another.  For concurrency, build one engine per thread.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .backends import Backend
from .plan import Plan
from .precond import EDMPrecond, Precond

__all__ = ["Model", "Engine", "Sampler", "Backend", "sampling_defaults"]



@dataclass
class Model:
    """A model: network + preconditioning + sample shape + conditioning + sigma range + metadata.

    ``network(x_in, c_noise, class_labels)`` returns the raw output F (an ``nn.Module`` or callable);
    ``num_classes`` > 0 makes it class-conditional with label ``num_classes`` as the null label used by
    classifier-free guidance.
    """

    network: Any
    precond: Precond = field(default_factory=EDMPrecond)
    sample_shape: tuple = (3, 32, 32)
    num_classes: int = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sample_shape = tuple(int(d) for d in self.sample_shape)
        if not self.sample_shape or any(d < 1 for d in self.sample_shape):
            raise ValueError(f"sample_shape must be positive dimensions, got {self.sample_shape}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if not (0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")

    @property
    def null_label(self) -> int:
        return self.num_classes


def _as_backend(network) -> Backend:
    """A bare network (x_in, c_noise, labels) -> F becomes a backend writing into ``out``."""
    def backend(x_in, c_noise, labels, out):
        out.copy_(network(x_in, c_noise, labels))
    return backend


class Engine:
    """Static buffers and the sampling loop for one (backend, plan, batch, sample shape, device, guidance)."""

    def __init__(self, backend: Backend, plan: Plan, batch: int, sample_shape: Sequence[int],
                 device: torch.device | str = "cpu", guidance: bool = False, f_dtype: torch.dtype = torch.float32,
                 in_dtype: torch.dtype = torch.float32, graph: bool = True, impl: str = "auto", null_label: int = 0):
        from edmrt.kernels import Stepper, plan_table

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
        self.x = torch.zeros((B,) + shp, device=dev)
        self.x_eval = torch.zeros_like(self.x)
        self.Y = torch.zeros((plan.history, B) + shp, device=dev)
        self.x_in = torch.zeros((nB,) + shp, device=dev, dtype=in_dtype)
        self.sigma_in = torch.zeros(nB, device=dev, dtype=in_dtype)
        self.F = torch.zeros((nB,) + shp, device=dev, dtype=f_dtype)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=dev)
        self.labels = torch.zeros(nB, dtype=torch.int64, device=dev)
        self.null_label = int(null_label)
        self.impl = impl
        self._steppers: dict[float | None, Stepper] = {}
        self._graphs: dict[float | None, torch.cuda.CUDAGraph] = {}
        self.use_graph = bool(graph) and dev.type == "cuda"
        self.lock = threading.Lock()
        self.stepper(None if not self.guidance else 1.0)  # validates every buffer now

    def stepper(self, w: float | None):
        from edmrt.kernels import Stepper

        if w not in self._steppers:
            self._steppers[w] = Stepper(self.table, self.x, self.x_eval, self.Y, self.x_in, self.sigma_in, self.seeds,
                                        guidance=w, f_dtype=self.F.dtype, impl=self.impl)
        return self._steppers[w]

    def _loop(self, w: float | None, labels: bool) -> None:
        from edmrt.kernels import init_state

        step = self.stepper(w)
        init_state(self.table, float(self.plan.sigmas[0]), self.plan.n_init, self.seeds, self.x, self.x_eval,
                   self.x_in, self.sigma_in, impl=step.impl)
        lab = self.labels if labels else None
        for s in range(self.plan.stages):
            self.backend(self.x_in, self.sigma_in, lab, self.F)
            step(s, self.F)

    def run(self, seeds: torch.Tensor, labels: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
        """Sample ``batch`` images for ``seeds`` (B,) int64 and optional ``labels`` (B,) int64; returns a new tensor."""
        B = self.batch
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != (B,):
            raise ValueError(f"seeds must be an int64 tensor of shape ({B},), got "
                             f"{seeds.dtype if isinstance(seeds, torch.Tensor) else type(seeds).__name__} "
                             f"{tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else ''}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64
                                   or labels.shape != (B,)):
            raise ValueError(f"labels must be an int64 tensor of shape ({B},) or None")
        if self.guidance:
            if guidance is None or not math.isfinite(float(guidance)):
                raise ValueError("this engine was built for classifier-free guidance: pass a finite guidance weight")
            if labels is None:
                raise ValueError("classifier-free guidance needs labels (the conditional half)")
        elif guidance is not None:
            raise ValueError("this engine was built without guidance (Engine(..., guidance=True) enables it)")
        w = float(guidance) if self.guidance else None
        with self.lock:
            self.seeds.copy_(seeds)
            if labels is not None:
                if self.guidance:
                    self.labels[:B].fill_(self.null_label)
                    self.labels[B:].copy_(labels)
                else:
                    self.labels.copy_(labels)
            if self.use_graph:
                g = self._graphs.get(w)
                if g is None:
                    g = self._capture(w, labels is not None)
                g.replay()
            else:
                self._loop(w, labels is not None)
            return self.x.clone()

    def _capture(self, w, labels: bool) -> "torch.cuda.CUDAGraph":
        """Warm up on a side stream (Triton compilation, cuDNN autotuning), then capture the whole loop."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._loop(w, labels)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._loop(w, labels)
        self._graphs[w] = g
        return g


BACKEND_NAMES = ("auto", "torch", "torch-compile", "onnxruntime", "tensorrt")


def onnx_cache_path(model: Model, dtype: str = "fp32") -> Path:
    """Where ``model``'s network is exported for ONNX Runtime / TensorRT: keyed by a sha256 of its weights,
    its class and config, the sample shape, the classes, the precision and the torch version."""
    import hashlib
    import os

    net = model.network
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((type(net).__name__, getattr(net, "config", None), model.sample_shape, model.num_classes, dtype,
                   torch.__version__)).encode())
    root = Path(os.environ.get("EDMRT_CACHE", Path.home() / ".cache" / "edmrt")) / "onnx"
    return root / f"{h.hexdigest()[:32]}-{dtype}.onnx"


def resolve_backend(name: str, model: Model, device: torch.device):
    """(name, backend) for a backend name; a torch model is exported to ONNX transparently (cached, verified on
    load, re-exported when the cached file is missing or unusable) for "onnxruntime" and "tensorrt".
    "auto" is the fastest verified backend for the device: ONNX Runtime on the CPU (1.1-1.2x torch eager on
    the CIFAR-sized UNet here), torch eager on CUDA (TensorRT is unverified)."""
    import importlib.util
    import logging

    from .backends import BACKENDS, OnnxRuntimeBackend

    log = logging.getLogger("edmrt")
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    net = model.network
    is_module = isinstance(net, torch.nn.Module)
    if name == "auto":
        name = "onnxruntime" if (device.type == "cpu" and is_module and importlib.util.find_spec("onnxruntime")
                                 and importlib.util.find_spec("onnx")) else "torch"
    if name in ("torch", "torch-compile"):
        if not is_module:
            return name, _as_backend(net)
        return name, BACKENDS[name](net.to(device))
    if not is_module:
        raise ValueError(f"backend {name!r} exports the network to ONNX: it must be a torch.nn.Module")
    from edmrt.export.onnx import export_onnx, load_onnx_session

    path = onnx_cache_path(model)
    session = None
    if path.exists():
        try:
            session = load_onnx_session(path, conditional=model.num_classes > 0)
        except ValueError as exc:
            log.warning("cached ONNX file %s is unusable (%s): exporting again", path, exc)
    if session is None:
        log.warning("exporting the network to ONNX for backend %r (once; cached at %s)", name, path)
        export_onnx(net.cpu().eval(), path, sample_shape=model.sample_shape, num_classes=model.num_classes)
        net.to(device)
    if name == "onnxruntime":
        return name, OnnxRuntimeBackend(session if session is not None else path)
    from edmrt.export.tensorrt import EngineCache, Profile, TensorRTBackend

    engine = EngineCache().get(path, Profile(model.sample_shape, 1, 8, 128), "fp16")
    return name, TensorRTBackend(engine)


def sampling_defaults(model: Model, solver: str | None, steps: int | None, schedule) -> tuple[str, int, Any]:
    """(solver, steps, schedule) with the model card's ``sampling`` entry filling what is None.

    A card's ``sampling`` holds ``solver`` and ``steps`` (the teacher: heun, 18) and, for a distilled model, the
    noise levels chosen for each step count (``levels``: {"2": [80, tau_1, 0], ...}) and the solvers they are meant
    for (``solvers``); otherwise the schedule is Karras et al.'s."""
    sampling = model.metadata.get("sampling") or {}
    solver = solver if solver is not None else sampling.get("solver", "heun")
    steps = steps if steps is not None else int(sampling.get("steps", 18))
    if schedule is None:
        levels = (sampling.get("levels") or {}).get(str(steps))
        schedule = levels if levels is not None and solver in sampling.get("solvers", ()) else "karras"
    return solver, steps, schedule


class Sampler:
    """High-level sampler: ``Sampler(model, solver="heun", steps=18, backend="auto").sample(seeds, cond, guidance)``.

    ``solver``, ``steps`` and ``schedule`` left at None take the model card's defaults (``sampling_defaults``:
    Heun with 18 steps for the teacher; the consistency solver with 2 steps on its chosen levels for a student).
    Engines are built on first use for each (batch size, guidance on/off) and reused.
    """

    def __init__(self, model, solver: str | None = None, steps: int | None = None, backend: str | Backend = "auto",
                 schedule=None, rho: float = 7.0, device: torch.device | str | None = None, graph: bool = True,
                 **options):
        from . import make_sigmas, plan as make_plan

        if callable(model) and not isinstance(model, Model) and not isinstance(model, torch.nn.Module):
            raise ValueError("Sampler takes an edmrt Model (edmrt.load(...) or Model(network, ...)); "
                             "for a bare denoiser(x, sigma) use edmrt.solve")
        if not isinstance(model, Model):
            raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
        self.model = model
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.solver, self.steps, schedule = sampling_defaults(model, solver, steps, schedule)
        sigmas = make_sigmas(schedule, self.steps, model.sigma_min, model.sigma_max, rho)
        self.plan = make_plan(self.solver, sigmas, model.precond, **options)
        self.backend_name, self.backend = self._backend(backend)
        self.graph = graph
        self._engines: dict[tuple, Engine] = {}

    def _backend(self, backend):
        if callable(backend) and not isinstance(backend, str):
            return "custom", backend
        return resolve_backend(backend, self.model, self.device)

    def engine(self, batch: int, guidance: bool) -> Engine:
        key = (batch, guidance)
        if key not in self._engines:
            self._engines[key] = Engine(self.backend, self.plan, batch, self.model.sample_shape, self.device, guidance,
                                        graph=self.graph, null_label=self.model.null_label)
        return self._engines[key]

    def sample(self, seeds, cond=None, guidance: float | None = None) -> torch.Tensor:
        """Samples (N, C, H, W) for N seeds; ``cond``: N class labels (or one for all); ``guidance``: CFG weight w
        (F = F_u + w (F_c - F_u); w = 1 is plain conditional sampling)."""
        seeds_t = torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64)
        if seeds_t.ndim != 1 or seeds_t.numel() < 1 or bool((seeds_t < 0).any()):
            raise ValueError("seeds must be a non-empty sequence of integers in [0, 2**63)")
        N = seeds_t.numel()
        labels = None
        if cond is not None:
            if not self.model.num_classes:
                raise ValueError("this model is unconditional: cond must be None")
            labels = torch.as_tensor(cond, dtype=torch.int64).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(N).clone()
            if labels.numel() != N or bool((labels < 0).any()) or bool((labels >= self.model.num_classes).any()):
                raise ValueError(f"cond must hold one class in [0, {self.model.num_classes}) per seed")
        elif self.model.num_classes:
            labels = torch.full((N,), self.model.null_label, dtype=torch.int64)
        if guidance is not None:
            if cond is None:
                raise ValueError("guidance needs cond (class labels)")
            if not math.isfinite(float(guidance)):
                raise ValueError(f"guidance must be finite, got {guidance!r}")
        e = self.engine(N, guidance is not None)
        return e.run(seeds_t.to(self.device), None if labels is None else labels.to(self.device), guidance)
