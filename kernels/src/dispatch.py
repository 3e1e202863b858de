"""The choice of implementation for the fused step: validate buffers once at the boundary, then dispatch.

Triton on CUDA tensors, the C++ core (OpenMP) on CPU tensors, the torch reference on request
(``impl="reference"``), and Triton on CPU tensors under ``TRITON_INTERPRET=1`` (``impl="triton"``, for tests).
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

try:  # the compiled core; a tree used without building it (a bare GPU image) still has Triton and torch
    from edmrt import _core
except ImportError:  # pragma: no cover - exercised only where the extension is not built
    _core = None

from .reference import fused_step_reference, init_state_reference
from .table import FIXED

__all__ = ["IMPLS", "overlaps", "core_available", "triton_available", "default_impl", "check_step_args",
           "check_init_args", "fused_step", "Stepper", "init_state"]

IMPLS = ("auto", "reference", "cpp", "triton")
_LOW = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """Whether triton is installed (imported only when a Triton step runs: ``import edmrt`` stays light)."""
    return importlib.util.find_spec("triton") is not None


def _triton():
    from . import triton_step

    return triton_step


def core_available() -> bool:
    """Whether the compiled core ``edmrt._core`` is built (``pip install -e .`` builds it)."""
    return _core is not None


def default_impl(device: torch.device) -> str:
    """The implementation ``impl="auto"`` picks on ``device``."""
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and _core is not None:
        return "cpp"
    return "reference"


def _resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    impl = default_impl(device) if impl == "auto" else impl
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"impl 'cpp' runs on CPU tensors, got device {device}")
    if impl == "cpp" and _core is None:
        raise ValueError("impl 'cpp' needs the compiled core edmrt._core: pip install -e . (with pybind11) builds it")
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl 'triton' needs the triton package")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return impl


def _tensor(name: str, t, device, dtypes, shape=None, contiguous=True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like x, got {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _check_state(x) -> tuple[torch.device, int, tuple[int, ...]]:
    """x: a contiguous float32 tensor of shape (B, ...); returns its device, B and shape."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("x must be a contiguous float32 tensor of shape (B, ...)")
    return x.device, x.shape[0], tuple(x.shape)


def _check_table(table, device) -> int:
    """The plan table: float64, contiguous, on x's device, shape (S, FIXED + K) with S >= 1, 1 <= K <= 16; returns K."""
    _tensor("table", table, device, (torch.float64,))
    if table.ndim != 2 or table.shape[0] < 1 or not FIXED < table.shape[1] <= FIXED + 16:
        raise ValueError(f"table must have shape (S, {FIXED} + K) with S >= 1 and 1 <= K <= 16, got "
                         f"{tuple(table.shape)}")
    return table.shape[1] - FIXED


def _check_inputs(x_in, sigma_in, seeds, device, B, shape, low) -> None:
    """The network input buffers (B or 2B samples, dtype in ``low``) and the (B,) int64 seeds."""
    if not isinstance(x_in, torch.Tensor) or x_in.ndim < 1 or x_in.shape[0] not in (B, 2 * B):
        raise ValueError(f"x_in must have shape ({B} or {2 * B}, ...) like x")
    _tensor("x_in", x_in, device, low, (x_in.shape[0],) + shape[1:])
    _tensor("sigma_in", sigma_in, device, low, (x_in.shape[0],))
    _tensor("seeds", seeds, device, (torch.int64,), (B,))


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect (on one device, neither empty)."""
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_disjoint(written: dict, read: dict) -> None:
    """No buffer a step writes may overlap another buffer it reads or writes: every implementation assumes it
    (the C++ loop declares its pointers __restrict__; the reference would read what it just wrote)."""
    items = list(written.items()) + list(read.items())
    for i, (a, ta) in enumerate(written.items()):
        for b, tb in items[i + 1:]:
            if overlaps(ta, tb):
                raise ValueError(f"{a} and {b} must not overlap in memory: {a} is written by the step")


def check_step_args(table, stage, x, x_eval, F, Y, x_in, sigma_in, seeds, guidance, impl: str) -> None:
    """Raise ValueError naming the first argument that is wrong (host metadata only: no device sync)."""
    dev, B, shape = _check_state(x)
    K = _check_table(table, dev)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < table.shape[0]:
        raise ValueError(f"stage must be an int in [0, {table.shape[0]}), got {stage!r}")
    _tensor("x_eval", x_eval, dev, (torch.float32,), shape)
    if guidance is not None and not _real(guidance):
        raise ValueError(f"guidance must be a finite float or None, got {guidance!r}")
    nF = 2 * B if guidance is not None else B
    low = (torch.float32,) if impl == "cpp" else _LOW
    _tensor("F", F, dev, low, (nF,) + shape[1:])
    _tensor("Y", Y, dev, (torch.float32,), (K,) + shape)
    _check_inputs(x_in, sigma_in, seeds, dev, B, shape, low)
    _check_disjoint({"x": x, "x_eval": x_eval, "Y": Y, "x_in": x_in, "sigma_in": sigma_in},
                    {"F": F, "table": table, "seeds": seeds})


def check_init_args(table, t0, n_init, seeds, x, x_eval, x_in, sigma_in, x0, impl: str) -> None:
    """Raise ValueError naming the first argument of ``init_state`` that is wrong (host metadata only)."""
    dev, B, shape = _check_state(x)
    _check_table(table, dev)
    for name, v in (("t0", t0), ("n_init", n_init)):
        if not _real(v) or float(v) < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    _tensor("x_eval", x_eval, dev, (torch.float32,), shape)
    _check_inputs(x_in, sigma_in, seeds, dev, B, shape, (torch.float32,) if impl == "cpp" else _LOW)
    read = {"table": table, "seeds": seeds}
    if x0 is not None:
        _tensor("x0", x0, dev, (torch.float32,), shape)
        if x0.data_ptr() != x.data_ptr():  # x0 may be x itself
            read["x0"] = x0
    _check_disjoint({"x": x, "x_eval": x_eval, "x_in": x_in, "sigma_in": sigma_in}, read)


def check_noise(noise, x) -> None:
    """A stage's given noise (an inversion's noise map): float32, shaped like x, on x's device, contiguous, and not
    one of the buffers the step writes."""
    _tensor("noise", noise, x.device, (torch.float32,), tuple(x.shape))


def fused_step(table: torch.Tensor, stage: int, x: torch.Tensor, x_eval: torch.Tensor, F: torch.Tensor,
               Y: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor, seeds: torch.Tensor,
               guidance: float | None = None, impl: str = "auto", check: bool = True,
               noise: torch.Tensor | None = None) -> None:
    """Run stage ``stage`` of a plan table in place on the given buffers (see ``reference.py`` for the math).

    ``check=False`` skips validation: for a loop whose buffers were validated once (the engine).  ``noise``: the
    stage's given noise z in place of the Philox draw (``check_noise``).
    """
    impl = _resolve(impl, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    if check:
        check_step_args(table, stage, x, x_eval, F, Y, x_in, sigma_in, seeds, guidance, impl)
        if noise is not None:
            check_noise(noise, x)
            _check_disjoint({"x": x, "x_eval": x_eval, "Y": Y, "x_in": x_in, "sigma_in": sigma_in}, {"noise": noise})
    if impl == "reference":
        fused_step_reference(table, stage, x, x_eval, F, Y, x_in, sigma_in, seeds, guidance, noise)
    elif impl == "cpp":
        if sigma_in.dtype != torch.float32 or x_in.dtype != torch.float32:
            raise ValueError("impl 'cpp' writes float32 x_in and sigma_in")
        _core.fused_step(table.numpy(), stage, x.numpy(), x_eval.numpy(), F.numpy(), Y.numpy(), x_in.numpy(),
                         sigma_in.numpy(), seeds.numpy(), x.shape[0], math.nan if guidance is None else float(guidance),
                         None if noise is None else noise.numpy())
    else:
        _triton().fused_step_triton(table, stage, x, x_eval, F, Y, x_in, sigma_in, seeds, guidance, noise)


class Stepper:
    """The fused step bound to one set of buffers: validated once here, then ``step(stage, F)`` per network
    evaluation with only F's metadata checked (what an engine loop calls; no host sync, no allocation)."""

    def __init__(self, table: torch.Tensor, x: torch.Tensor, x_eval: torch.Tensor, Y: torch.Tensor,
                 x_in: torch.Tensor, sigma_in: torch.Tensor, seeds: torch.Tensor, guidance: float | None = None,
                 f_dtype: torch.dtype = torch.float32, impl: str = "auto"):
        _check_state(x)
        if guidance is not None and not _real(guidance):
            raise ValueError(f"guidance must be a finite float or None, got {guidance!r}")
        self.impl = _resolve(impl, x.device)
        B = x.shape[0]
        f_shape = ((2 * B if guidance is not None else B),) + tuple(x.shape[1:])
        probe = torch.empty(f_shape, dtype=f_dtype, device=x.device)
        check_step_args(table, 0, x, x_eval, probe, Y, x_in, sigma_in, seeds, guidance, self.impl)
        self.table, self.x, self.x_eval, self.Y, self.x_in, self.sigma_in, self.seeds = \
            table, x, x_eval, Y, x_in, sigma_in, seeds
        self.guidance, self.f_shape, self.f_dtype, self.stages = guidance, f_shape, f_dtype, table.shape[0]
        if self.impl == "cpp":  # the buffers checked once more, in C++, and bound: a call converts only F
            self._bound = _core.BoundStep(*(t.numpy() for t in (table, x, x_eval, Y, x_in, sigma_in, seeds)),
                                          B, math.nan if guidance is None else float(guidance))
        elif self.impl == "triton":
            self._launch = _triton().fused_step_triton

    def __call__(self, stage: int, F: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """Stage ``stage`` with network output F; ``noise``: the stage's given noise in place of the Philox draw
        (float32, shaped like x, e.g. a row of an engine's noise-map buffer), checked per call."""
        if F.shape != self.f_shape or F.dtype != self.f_dtype or F.device != self.x.device or not F.is_contiguous():
            raise ValueError(f"F must be a contiguous {self.f_dtype} tensor of shape {self.f_shape} on {self.x.device}, "
                             f"got {F.dtype} {tuple(F.shape)} on {F.device}")
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < self.stages:
            raise ValueError(f"stage must be in [0, {self.stages}) (an int), got {stage!r}")
        if noise is not None:
            check_noise(noise, self.x)
        if self.impl == "cpp":
            self._bound(stage, F.numpy(), None if noise is None else noise.numpy())
        elif self.impl == "reference":
            fused_step_reference(self.table, stage, self.x, self.x_eval, F, self.Y, self.x_in, self.sigma_in,
                                 self.seeds, self.guidance, noise)
        else:
            self._launch(self.table, stage, self.x, self.x_eval, F, self.Y, self.x_in, self.sigma_in, self.seeds,
                         self.guidance, noise)


def init_state(table: torch.Tensor, t0: float, n_init: float, seeds: torch.Tensor, x: torch.Tensor,
               x_eval: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor, impl: str = "auto",
               x0: torch.Tensor | None = None, check: bool = True) -> None:
    """The state before stage 0, in place on the given buffers.

    x = x_eval = t0 N(seed, INITIAL_STREAM) + n_init N(seed, CHURN_STREAM) (``philox.py``'s streams), or with a
    given initial state ``x0`` (float32, shaped like x, on x's device, contiguous; may be x itself)
    x = x_eval = x0 + n_init N(seed, CHURN_STREAM); then x_in = c_in[0] x (both halves when x_in holds 2B
    samples) and sigma_in = c_noise[0].

    ``check=False`` skips the Python-side validation (the C++ binding still checks every buffer): for an engine
    whose buffers were validated once.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    impl = _resolve(impl, x.device)
    if check:
        check_init_args(table, t0, n_init, seeds, x, x_eval, x_in, sigma_in, x0, impl)
    if impl == "reference":
        init_state_reference(table, t0, n_init, seeds, x, x_eval, x_in, sigma_in, x0)
    elif impl == "cpp":
        _core.init_state(table.numpy(), float(t0), float(n_init), seeds.numpy(), x.numpy(), x_eval.numpy(),
                         x_in.numpy(), sigma_in.numpy(), x.shape[0], None if x0 is None else x0.detach().numpy())
    else:
        _triton().init_state_triton(table, t0, n_init, seeds, x, x_eval, x_in, sigma_in, x0)
