"""Probe edmrt with bad and edge-case inputs, the way a new user and an attacker would, and count how it answers.

Run (from the repository root; 875 cases in ~6 min on 2 busy cores, every case in a child process):

    OMP_NUM_THREADS=1 python benchmarks/probe_inputs.py            # all cases; writes the two result files
    OMP_NUM_THREADS=1 python benchmarks/probe_inputs.py --only cli # cases whose group starts with "cli"; no files
    python benchmarks/probe_inputs.py --list                       # the cases, without running them

The report records which edmrt was probed (the commit, and whether the imported tree differs from it).
Writes ``benchmarks/results/probe_inputs.json`` (every case: group, description, input, expected and got class,
first line of the message, seconds) and ``benchmarks/results/probe_inputs.md`` (counts per group and class, then
every case that is neither a clean error nor an accepted valid input).

Each case is one call on the public surface (``edmrt.solve``, ``plan``, ``make_sigmas``, ``Plan.from_json``,
the preconditionings, ``Sampler`` / ``.sample`` on the bundled models with backend "torch", ``Model``, ``load``,
``edmrt.kernels``, ``edmrt._core`` and the ``edmrt`` command line through ``subprocess``), marked valid or invalid
in the table below, with the substrings (any of them, case-insensitive) a clean error message must contain.
Cases run one after another in a worker process that reports each result to this process before the next case;
when the worker dies the case it was running is a "crash" (its signal or status) and a new worker takes the rest;
a case still running after CASE_TIMEOUT_S is a "hang" (its worker is killed).  Workers and the commands they start
run with a 4 GiB address-space limit (RLIMIT_AS), in a scratch folder, with ``EDMRT_CACHE`` pointing into it.

Classes (exactly one per case):
  clean error    ValueError, TypeError or FloatingPointError whose message contains an expected substring (the
                 argument's name, or the problem); a denoiser's own exception propagated unchanged; for the CLI:
                 exit status 2, exactly one line on stderr, no "Traceback", an expected substring in it
  accepted       a valid input: the call returned and the result is finite and equals a cheap reference (the same
                 call with a clean input, the float64 reference executor, the exact ODE endpoint of a Gaussian)
  unclear error  any other exception type, a message without the expected substrings, a CLI traceback or exit
                 status other than 2; also a valid input that was refused (the message says so)
  silent wrong   the call returned for an invalid input, or returned a wrong / non-finite result for a valid one
  crash / hang   the worker died (signal or status) / ran past CASE_TIMEOUT_S
"""
from __future__ import annotations

import argparse
import datetime
import fractions
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch

import edmrt
from edmrt import _core
from edmrt.kernels import Stepper, fused_step, init_state, plan_table
from edmrt.kernels.table import FIXED
from edmrt.models.bundled import WEIGHTS_DIR

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASE_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 50.0
MEMORY_LIMIT = 4 << 30

CLEAN, ACCEPTED, UNCLEAR, SILENT, CRASH, HANG = "clean error", "accepted", "unclear error", "silent wrong", "crash", "hang"
CLASSES = (CLEAN, ACCEPTED, UNCLEAR, SILENT, CRASH, HANG)
CLEAN_TYPES = (ValueError, TypeError, FloatingPointError)

WORK = Path(tempfile.gettempdir())  # the worker's scratch folder (set by --worker)
nan, inf = math.nan, math.inf
SIG = ("sigma", "sigmas", "sigma_min", "sigma_max")  # a message about the noise levels


# ============================================================================ the case table

class Case:
    def __init__(self, group, name, summary, fn, valid, expect, check, cli, propagate):
        self.group, self.name, self.summary, self.fn, self.valid = group, name, summary, fn, valid
        self.expect, self.check, self.cli, self.propagate = expect, check, cli, propagate

    @property
    def id(self) -> str:
        return f"{self.group} / {self.name}"


CASES: list[Case] = []


def case(group, name, summary, fn, *, valid=False, expect=(), check=None, cli=False, propagate=None):
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    if not valid and not expect:
        raise AssertionError(f"invalid case {group}/{name} needs an expected substring")
    CASES.append(Case(group, name, summary, fn, valid, expect, check, cli, propagate))


class Verdict:
    """What a valid case's function returns when it checks its own result."""

    def __init__(self, ok: bool, detail: str):
        self.ok, self.detail = ok, detail


class CLIResult:
    def __init__(self, rc, stdout, stderr, timed_out=False, bad=None, ok=True, detail=""):
        self.rc, self.stdout, self.stderr, self.timed_out = rc, stdout, stderr, timed_out
        self.bad, self.ok, self.detail = bad, ok, detail


_memo: dict = {}


def memo(key, make):
    if key not in _memo:
        _memo[key] = make()
    return _memo[key]


# ---------------------------------------------------------------------------- checks of valid results

def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"ndarray {x.dtype} {x.shape}"
    r = repr(x)
    return f"{type(x).__name__} {r[:80]}"


def close_to(ref, tol: float, what: str = "the clean call"):
    """Check: a finite tensor of ref's shape within tol * max(1, max |ref|) of ref (a tensor or a callable)."""
    def check(x):
        r = ref() if callable(ref) else ref
        if not isinstance(x, torch.Tensor):
            return False, f"returned {describe(x)}"
        if tuple(x.shape) != tuple(r.shape):
            return False, f"shape {tuple(x.shape)} differs from {what}'s {tuple(r.shape)}"
        if not bool(torch.isfinite(x).all()):
            return False, "the result holds NaN or Inf"
        err = float((x.detach().double() - r.detach().double()).abs().max()) if x.numel() else 0.0
        bound = tol * max(1.0, float(r.detach().double().abs().max()) if r.numel() else 1.0)
        return err <= bound, f"max |diff| to {what} {err:.3g} (bound {bound:.3g})"
    return check


def both(*checks):
    """Check: every one of ``checks`` passes (details joined)."""
    def check(x):
        out = [c(x) for c in checks]
        return all(ok for ok, _ in out), "; ".join(d for _, d in out)
    return check


def finite_shape(shape):
    def check(x):
        if not isinstance(x, torch.Tensor):
            return False, f"returned {describe(x)}"
        if tuple(x.shape) != tuple(shape):
            return False, f"shape {tuple(x.shape)}, expected {tuple(shape)}"
        return bool(torch.isfinite(x).all()), "finite" if bool(torch.isfinite(x).all()) else "holds NaN or Inf"
    return check


# ============================================================================ edmrt.solve

def gauss(x, sigma):
    """The exact denoiser of data ~ N(0, I): D(x; sigma) = x / (1 + sigma^2); the ODE endpoint is t_0 n / sqrt(1 + t_0^2)."""
    return x / (1 + sigma ** 2)


def noise(B=4, D=8, dtype=torch.float32, seed=0):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def exact(n, t0=80.0):
    return n.detach().double() * t0 / math.sqrt(1 + t0 ** 2)


_DEFAULT = object()


def S(**kw):
    """edmrt.solve(gauss, noise(), **kw) with ``denoiser=`` / ``noise=`` overridable."""
    den = kw.pop("denoiser", gauss)
    n = kw.pop("noise", _DEFAULT)
    return edmrt.solve(den, noise() if n is _DEFAULT else n, **kw)


def base():
    return memo("base", lambda: S())


def vs_reference(tol=1e-4, make_noise=None, **kw):
    """Check: equal to the same call in float64 through the reference executor (on ``make_noise()`` if given)."""
    def ref():
        n = noise() if make_noise is None else make_noise()
        return S(noise=n.detach().double(), executor="reference", **kw)
    return close_to(ref, tol, "the float64 reference executor")


def near_exact(make_noise=None, tol=6e-2):
    """Check (a sanity bound): near the exact ODE endpoint; Heun with 18 Karras steps is 4.5% off on this Gaussian."""
    return close_to(lambda: exact(noise() if make_noise is None else make_noise()), tol, "the exact ODE endpoint")


def with_value(v, dtype=torch.float32):
    n = noise(dtype=dtype)
    n[1, 3] = v
    return n


def define_solve():
    G = "solve.noise"
    case(G, "NaN", "float32 noise with one NaN", lambda: S(noise=with_value(nan)), expect="noise")
    case(G, "+Inf", "float32 noise with one +Inf", lambda: S(noise=with_value(inf)), expect="noise")
    case(G, "-Inf", "float32 noise with one -Inf", lambda: S(noise=with_value(-inf)), expect="noise")
    case(G, "NaN float64", "float64 noise with one NaN", lambda: S(noise=with_value(nan, torch.float64)), expect="noise")
    for dt in ("int64", "int32", "uint8", "bool", "complex64", "complex128"):
        case(G, f"dtype {dt}", f"noise of dtype torch.{dt}", lambda dt=dt: S(noise=noise().to(getattr(torch, dt))),
             expect="noise")
    case(G, "empty batch", "torch.zeros(0, 8)", lambda: S(noise=torch.zeros(0, 8)), expect="noise")
    case(G, "0-d", "torch.tensor(0.5)", lambda: S(noise=torch.tensor(0.5)), expect="noise")
    case(G, "no elements per sample", "torch.zeros(2, 0)", lambda: S(noise=torch.zeros(2, 0)), expect="noise")
    case(G, "numpy array", "noise().numpy()", lambda: S(noise=noise().numpy()), expect="noise")
    case(G, "list", "noise().tolist()", lambda: S(noise=noise().tolist()), expect="noise")
    case(G, "None", "noise=None", lambda: S(noise=None), expect="noise")
    case(G, "meta device", "torch.empty(4, 8, device='meta')", lambda: S(noise=torch.empty(4, 8, device="meta")),
         expect="noise")
    case(G, "overflowing", "float32 noise of 1e37 (80 * noise overflows float32)",
         lambda: S(noise=torch.full((4, 8), 1e37)), expect="noise")
    case(G, "float32 baseline", "clean float32 (4, 8) noise, heun 18", lambda: S(), valid=True,
         check=both(vs_reference(), near_exact()))
    case(G, "float64", "float64 noise (reference executor)", lambda: S(noise=noise(dtype=torch.float64)), valid=True,
         check=both(close_to(base, 1e-5, "the float32 fused call"), near_exact()))
    case(G, "float16", "float16 noise (reference executor in float16)", lambda: S(noise=noise(dtype=torch.float16)),
         valid=True, check=close_to(base, 2e-2))
    case(G, "bfloat16", "bfloat16 noise", lambda: S(noise=noise(dtype=torch.bfloat16)), valid=True,
         check=close_to(base, 6e-2))
    case(G, "requires_grad", "noise().requires_grad_()", lambda: S(noise=noise().requires_grad_()), valid=True,
         check=close_to(base, 1e-6))
    case(G, "nn.Parameter", "torch.nn.Parameter(noise())", lambda: S(noise=torch.nn.Parameter(noise())), valid=True,
         check=close_to(base, 1e-6))
    case(G, "non-contiguous", "noise().T.contiguous().T (strides (1, 4))", lambda: S(noise=noise().T.contiguous().T),
         valid=True, check=close_to(base, 1e-6))
    case(G, "stride-0 rows", "noise(1).expand(4, 8)", lambda: S(noise=noise(1).expand(4, 8)), valid=True,
         check=close_to(lambda: S(noise=noise(1)).expand(4, 8), 1e-6, "the (1, 8) call, expanded"))
    n1 = lambda: noise()[:, 0].contiguous()  # noqa: E731
    case(G, "1-D noise", "noise()[:, 0] of shape (4,)", lambda: S(noise=n1()), valid=True,
         check=both(vs_reference(make_noise=n1), near_exact(n1)))

    def cl():
        return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    case(G, "channels_last 4-D", "(2, 3, 4, 4) noise in channels_last memory format",
         lambda: S(noise=cl().contiguous(memory_format=torch.channels_last)), valid=True,
         check=close_to(lambda: S(noise=cl()), 1e-6, "the contiguous call"))

    def inference():
        with torch.inference_mode():
            n = noise()
        return S(noise=n)
    case(G, "inference tensor", "noise made under torch.inference_mode()", inference, valid=True,
         check=close_to(base, 1e-6))
    case(G, "batch 300", "noise(300)", lambda: S(noise=noise(300)), valid=True,
         check=both(vs_reference(make_noise=lambda: noise(300)), near_exact(lambda: noise(300))))

    G = "solve.denoiser"
    DEN = ("denoiser", "network")
    for label, den in (("int 5", 5), ("None", None), ("a string", "gmm"), ("a tensor", "tensor")):
        case(G, f"not callable: {label}", f"denoiser={label}",
             lambda den=den: S(denoiser=torch.ones(3) if den == "tensor" else den), expect="denoiser")
    case(G, "the type int", "denoiser=int (callable, wrong signature)", lambda: S(denoiser=int), expect="denoiser")
    case(G, "one-argument lambda", "denoiser=lambda x: x", lambda: S(denoiser=lambda x: x), expect="denoiser")
    outs = [
        ("wrong shape", "returns x[:, :-1]", lambda x, s: x[:, :-1]),
        ("broadcastable shape", "returns x[:1] (1, 8)", lambda x, s: gauss(x, s)[:1]),
        ("extra dimension", "returns x.unsqueeze(-1)", lambda x, s: gauss(x, s).unsqueeze(-1)),
        ("scalar", "returns a 0-d sum", lambda x, s: gauss(x, s).sum()),
        ("NaN output", "returns all NaN", lambda x, s: torch.full_like(x, nan)),
        ("Inf output", "returns all +Inf", lambda x, s: torch.full_like(x, inf)),
        ("NaN at the last stage", "NaN where sigma < 0.01", lambda x, s: torch.where(s < 0.01, nan, gauss(x, s))),
        ("huge output", "returns 1e38 * x", lambda x, s: x * 1e38),
        ("complex output", "returns gauss(x).to(complex64)", lambda x, s: gauss(x, s).to(torch.complex64)),
        ("list output", "returns [D]", lambda x, s: [gauss(x, s)]),
        ("None output", "returns None", lambda x, s: None),
        ("numpy output", "returns D.numpy()", lambda x, s: gauss(x, s).numpy()),
        ("int output", "returns D.long()", lambda x, s: gauss(x, s).long()),
        ("bool output", "returns D > 0", lambda x, s: gauss(x, s) > 0),
    ]
    for name, summary, den in outs:
        case(G, name, summary, lambda den=den: S(denoiser=den), expect=("shape",) if "shape" in name else DEN)
    case(G, "wrong shape, float64", "returns x[:, :-1] (reference executor)",
         lambda: S(denoiser=lambda x, s: x[:, :-1], noise=noise(dtype=torch.float64)), expect=DEN)
    case(G, "NaN output, float64", "returns NaN (reference executor)",
         lambda: S(denoiser=lambda x, s: torch.full_like(x, nan), noise=noise(dtype=torch.float64)), expect=DEN)

    def boom_value(x, s):
        raise ValueError("denoiser-boom")

    def boom_key(x, s):
        raise KeyError("denoiser-boom")
    case(G, "raises ValueError", "the denoiser raises ValueError('denoiser-boom')", lambda: S(denoiser=boom_value),
         expect="denoiser-boom", propagate=ValueError)
    case(G, "raises KeyError", "the denoiser raises KeyError('denoiser-boom')", lambda: S(denoiser=boom_key),
         expect="denoiser-boom", propagate=KeyError)
    case(G, "float64 output", "returns D.double() for float32 noise", lambda: S(denoiser=lambda x, s: gauss(x, s).double()),
         valid=True, check=close_to(base, 1e-6))
    case(G, "float16 output", "returns D.half()", lambda: S(denoiser=lambda x, s: gauss(x, s).half()), valid=True,
         check=close_to(base, 2e-2))
    p = torch.nn.Parameter(torch.ones(()))
    case(G, "output requires grad", "returns D * nn.Parameter(1.0)", lambda: S(denoiser=lambda x, s: gauss(x, s) * p),
         valid=True, check=close_to(base, 1e-6))
    case(G, "non-contiguous output", "returns D.T.contiguous().T",
         lambda: S(denoiser=lambda x, s: gauss(x, s).T.contiguous().T), valid=True, check=close_to(base, 1e-6))
    case(G, "in-place on its input", "returns x.div_(1 + sigma**2)", lambda: S(denoiser=lambda x, s: x.div_(1 + s ** 2)),
         valid=True, check=close_to(base, 1e-6))

    G = "solve.solver"
    for label, v in (("unknown", "nope"), ("empty", ""), ("None", None), ("int", 5), ("upper case", "HEUN"),
                     ("leading space", " heun"), ("list", ["heun"]), ("bytes", b"heun"), ("the function", "fn")):
        case(G, f"solver {label}", f"solver={v!r}",
             lambda v=v: S(solver=edmrt.SOLVERS["heun"] if v == "fn" else v), expect="solver")
    for name in edmrt.SOLVERS:
        kw = dict(solver=name, steps=6, seeds=[0, 1, 2, 3])
        case(G, f"{name}", f"solver={name!r}, steps=6, seeds=[0..3]", lambda kw=kw: S(**kw), valid=True,
             check=vs_reference(**kw))

    G = "solve.steps"
    for v in (0, -1, 1.5, 2.0, 10 ** 7, 10_001, True, False, "18", None, nan, np.float64(3)):
        case(G, f"steps={v!r}", f"steps={v!r}", lambda v=v: S(steps=v), expect="steps")
    for v in (1, np.int64(5), np.int32(3), 10_000):
        case(G, f"steps={v!r}", f"steps={v!r} (valid)", lambda v=v: S(steps=v), valid=True,
             check=vs_reference(steps=v))

    G = "solve.schedule"
    SCH = ("schedule", "sigmas")
    bad = [("unknown name", "nope"), ("empty name", ""), ("capitalised", "Karras"), ("None", None), ("int", 5),
           ("dict", {"karras": 1}), ("ascending list", [1.0, 2.0, 3.0]), ("list with NaN", [80.0, nan, 1.0]),
           ("zeros", [0.0, 0.0]), ("two trailing zeros", [80.0, 0.0, 0.0]), ("single value", [80.0]), ("empty list", []),
           ("nested list", [[80.0, 1.0]]), ("strings", ["80", "1"]), ("with Inf", [inf, 1.0]),
           ("negative", [-1.0, -2.0]), ("ending negative", [80.0, 1.0, -1.0]), ("a set", {80.0, 1.0})]
    for label, v in bad:
        case(G, label, f"schedule={v!r}", lambda v=v: S(schedule=v), expect=SCH)
    case(G, "1e300 level", "schedule=[1e300, 1.0]", lambda: S(schedule=[1e300, 1.0]), expect=SIG + ("schedule",))
    for name in edmrt.SCHEDULES:
        case(G, f"{name}", f"schedule={name!r}, steps=8", lambda name=name: S(schedule=name, steps=8), valid=True,
             check=vs_reference(schedule=name, steps=8))
    good = [("interpolated list", [80.0, 10.0, 1.0], 18), ("list as is", [80.0, 10.0, 1.0, 0.0], 3),
            ("single level to 0", [80.0, 0.0], 1)]
    for label, v, steps in good:
        case(G, label, f"schedule={v}, steps={steps}", lambda v=v, steps=steps: S(schedule=v, steps=steps), valid=True,
             check=vs_reference(schedule=v, steps=steps))
    case(G, "numpy array", "schedule=np.array([80, 10, 1])", lambda: S(schedule=np.array([80.0, 10.0, 1.0]), steps=5),
         valid=True, check=vs_reference(schedule=[80.0, 10.0, 1.0], steps=5))
    case(G, "torch tensor", "schedule=torch.tensor([80, 10, 1])",
         lambda: S(schedule=torch.tensor([80.0, 10.0, 1.0], dtype=torch.float64), steps=5), valid=True,
         check=vs_reference(schedule=[80.0, 10.0, 1.0], steps=5))
    case(G, "tuple", "schedule=(80, 10, 1)", lambda: S(schedule=(80.0, 10.0, 1.0), steps=5), valid=True,
         check=vs_reference(schedule=[80.0, 10.0, 1.0], steps=5))

    G = "solve.sigma"
    for v in (0, -1, nan, inf, None, "abc", True, "0.1", 1e-300):
        case(G, f"sigma_min={v!r}", f"sigma_min={v!r}", lambda v=v: S(sigma_min=v), expect="sigma_min")
    for v in (0, -1, nan, inf, 1e300, 1e11, None, "80"):
        case(G, f"sigma_max={v!r}", f"sigma_max={v!r}", lambda v=v: S(sigma_max=v), expect="sigma_max")
    case(G, "sigma_min > sigma_max", "sigma_min=10, sigma_max=1", lambda: S(sigma_min=10, sigma_max=1),
         expect=("sigma_min", "sigma_max"))
    case(G, "sigma_min == sigma_max", "sigma_min=1, sigma_max=1", lambda: S(sigma_min=1, sigma_max=1),
         expect=("sigma_min", "sigma_max"))
    for v in (0, -1, nan, inf, 1e300, 1e-300, None, "7"):
        case(G, f"rho={v!r}", f"rho={v!r}", lambda v=v: S(rho=v), expect="rho")
    case(G, "sigma_max=1e10", "sigma_max=1e10 (the limit; float32 keeps ~1% here)", lambda: S(sigma_max=1e10),
         valid=True, check=vs_reference(2e-2, sigma_max=1e10))
    # Below schedules.SIGMA_FLOOR (1e-6) float32 updates divide by sigma and overflow: refused by name.
    case(G, "sigma_min=1e-100", "sigma_min=1e-100 (below SIGMA_FLOOR)", lambda: S(sigma_min=1e-100), expect="sigma_min")
    for label, kw in (("rho=np.float64(7)", dict(rho=np.float64(7.0))), ("sigma_max=np.float32(80)", dict(sigma_max=np.float32(80))),
                      ("sigma_min=torch.tensor(0.002)", dict(sigma_min=torch.tensor(0.002))),
                      ("rho=1", dict(rho=1.0))):
        case(G, label, f"{label} (valid)", lambda kw=kw: S(**kw), valid=True, check=vs_reference(**kw))

    G = "solve.seeds"
    SD = dict(solver="dpmpp_2m_sde", steps=4)
    bad = [("floats", [1.5, 2.5, 3.5, 4.5]), ("integral floats", [0.0, 1.0, 2.0, 3.0]), ("bools", [True, False, True, False]),
           ("negative", [-1, 0, 1, 2]), ("2**63", [2 ** 63] * 4), ("2**64", [2 ** 64] * 4), ("3 for a batch of 4", [0, 1, 2]),
           ("5 for a batch of 4", [0, 1, 2, 3, 4]), ("a string", "0123"), ("strings", ["a", "b", "c", "d"]),
           ("None entries", [None] * 4), ("int", 5)]
    for label, v in bad:
        case(G, label, f"seeds={v!r} (dpmpp_2m_sde)", lambda v=v: S(seeds=v, **SD), expect="seeds")
    for label, make in (("float tensor", lambda: torch.arange(4.0)), ("2-D int tensor", lambda: torch.arange(4).view(2, 2)),
                        ("float numpy", lambda: np.arange(4.0)), ("2-D numpy", lambda: np.arange(4).reshape(2, 2)),
                        ("numpy bools", lambda: np.array([True, False, True, False])),
                        ("uint64 2**63", lambda: np.full(4, 2 ** 63, dtype=np.uint64))):
        case(G, label, f"seeds={label}", lambda make=make: S(seeds=make(), **SD), expect="seeds")
    case(G, "wrong count, deterministic solver", "heun with 3 seeds for a batch of 4", lambda: S(seeds=[0, 1, 2]),
         expect="seeds")

    def ref4():
        return S(seeds=[0, 1, 2, 3], **SD)
    for label, make in (("list", lambda: [0, 1, 2, 3]), ("range", lambda: range(4)), ("numpy int64", lambda: np.arange(4)),
                        ("numpy uint8", lambda: np.arange(4, dtype=np.uint8)), ("torch int64", lambda: torch.arange(4)),
                        ("torch int32", lambda: torch.arange(4, dtype=torch.int32)),
                        ("generator", lambda: (i for i in range(4))), ("tuple of np.int64", lambda: tuple(np.arange(4)))):
        case(G, f"valid {label}", f"seeds={label} [0..3]", lambda make=make: S(seeds=make(), **SD), valid=True,
             check=close_to(ref4, 0.0, "seeds=[0, 1, 2, 3]"))
    case(G, "2**63 - 1", "seeds=[2**63 - 1] * 4", lambda: S(seeds=[2 ** 63 - 1] * 4, **SD), valid=True,
         check=vs_reference(seeds=[2 ** 63 - 1] * 4, **SD))
    case(G, "None, stochastic", "seeds=None (drawn)", lambda: S(**SD), valid=True, check=finite_shape((4, 8)))
    case(G, "seeds for heun", "heun with seeds=[0..3] (unused)", lambda: S(seeds=[0, 1, 2, 3]), valid=True,
         check=close_to(base, 0.0))
    case(G, "batch independence", "sample 2 alone equals sample 2 of the batch (bit for bit)",
         lambda: S(noise=noise()[2:3], seeds=[2], **SD), valid=True, check=close_to(lambda: ref4()[2:3], 0.0, "row 2 of the batch"))

    G = "solve.executor"
    for v in ("nope", None, "FUSED", 5, ""):
        case(G, f"executor={v!r}", f"executor={v!r}", lambda v=v: S(executor=v), expect="executor")
    case(G, "fused with float64", "executor='fused', float64 noise",
         lambda: S(executor="fused", noise=noise(dtype=torch.float64)), expect="executor")
    case(G, "reference float32", "executor='reference', float32 noise", lambda: S(executor="reference"), valid=True,
         check=close_to(base, 1e-5))
    case(G, "fused float32", "executor='fused'", lambda: S(executor="fused"), valid=True, check=close_to(base, 0.0))

    G = "solve.options"
    bad = [("unknown option", dict(foo=1), "foo"), ("option of another solver", dict(S_churn=1.0), "S_churn"),
           ("eta for euler", dict(solver="euler", eta=1.0), "eta")]
    for v in (-1, nan, inf, "40", True, None, [40]):
        bad.append((f"S_churn={v!r}", dict(solver="edm", S_churn=v), "S_churn"))
    bad += [("S_noise=-1", dict(solver="edm", S_churn=10, S_noise=-1), "S_noise"),
            ("S_noise=1e300", dict(solver="edm", S_churn=10, S_noise=1e300, seeds=[0, 1, 2, 3]), "S_noise"),
            ("S_tmin > S_tmax", dict(solver="edm", S_churn=10, S_tmin=10, S_tmax=1), ("S_tmin", "S_tmax")),
            ("S_tmin=NaN", dict(solver="edm", S_tmin=nan), "S_tmin"),
            ("S_tmax=-inf", dict(solver="edm", S_tmax=-inf), "S_tmax")]
    for v in (nan, -1, inf, "1"):
        bad.append((f"eta={v!r}", dict(solver="dpmpp_2m_sde", eta=v), "eta"))
    bad += [("solver_type='euler'", dict(solver="dpmpp_2m_sde", solver_type="euler"), "solver_type"),
            ("solver_type=None", dict(solver="dpmpp_2m_sde", solver_type=None), "solver_type"),
            ("solver_type=['heun']", dict(solver="dpmpp_2m_sde", solver_type=["heun"]), "solver_type")]
    for v in (2, -0.1, nan, inf):
        bad.append((f"gamma={v!r}", dict(solver="tcd", gamma=v), "gamma"))
    for v in (7, 0, 2.5, "2", True, None):
        bad.append((f"ipndm order={v!r}", dict(solver="ipndm", order=v), "order"))
    bad += [("lms order=5", dict(solver="lms", order=5), "order"), ("unipc order=4", dict(solver="unipc", order=4), "order"),
            ("unipc variant='bh3'", dict(solver="unipc", variant="bh3"), "variant"),
            ("unipc variant=None", dict(solver="unipc", variant=None), "variant"),
            ("model_sigma_min=-1", dict(solver="consistency", model_sigma_min=-1), "model_sigma_min"),
            ("model_sigma_min=NaN", dict(solver="consistency", model_sigma_min=nan), "model_sigma_min"),
            ("model_sigma_min=100", dict(solver="consistency", model_sigma_min=100.0, seeds=[0, 1, 2, 3]), "model_sigma_min")]
    for label, kw, exp in bad:
        case(G, label, ", ".join(f"{k}={v!r}" for k, v in kw.items()), lambda kw=kw: S(**kw), expect=exp)
    good = [("edm S_churn=40", dict(solver="edm", S_churn=40.0, seeds=[0, 1, 2, 3])),
            ("euler S_churn=1e300 (capped)", dict(solver="euler", S_churn=1e300, seeds=[0, 1, 2, 3])),
            ("edm S_tmax=inf", dict(solver="edm", S_churn=10.0, S_tmax=inf, seeds=[0, 1, 2, 3])),
            ("S_churn=np.float64(40)", dict(solver="edm", S_churn=np.float64(40.0), seeds=[0, 1, 2, 3])),
            ("unipc order=3 bh1", dict(solver="unipc", order=3, variant="bh1")),
            ("dpmpp_2m_sde heun", dict(solver="dpmpp_2m_sde", solver_type="heun", seeds=[0, 1, 2, 3])),
            ("tcd gamma=0", dict(solver="tcd", gamma=0.0, seeds=[0, 1, 2, 3]))]
    for label, kw in good:
        case(G, label, f"{kw} (valid)", lambda kw=kw: S(**kw), valid=True, check=vs_reference(**kw))
    case(G, "ipndm order=2.0", "order=2.0 (an integral float)", lambda: S(solver="ipndm", order=2.0), valid=True,
         check=close_to(lambda: S(solver="ipndm", order=2), 0.0, "order=2"))


# ============================================================================ plan, make_sigmas, preconditionings

def sig(steps=4):
    return edmrt.make_sigmas("karras", steps)


def plan_ok(p):
    if not isinstance(p, edmrt.Plan):
        return False, f"returned {describe(p)}"
    back = edmrt.Plan.from_json(p.to_json())
    return bool(back == p and p.table()), f"{p.solver}: {p.stages} stages; JSON round trip {'equal' if back == p else 'differs'}"


def sigmas_ok(steps):
    def check(s):
        s = np.asarray(s)
        ok = s.shape == (steps + 1,) and np.all(np.isfinite(s)) and s[-1] == 0 and np.all(np.diff(s) < 0)
        return bool(ok), f"{s.size} levels, from {s[0]:.4g}"
    return check


def define_plan():
    G = "plan"
    P = edmrt.plan
    bad = [("unknown solver", lambda: P("nope", sig()), "solver"),
           ("no trailing 0", lambda: P("heun", [80.0, 1.0]), "sigmas"),
           ("empty sigmas", lambda: P("heun", []), "sigmas"),
           ("sigmas a string", lambda: P("heun", "karras"), "sigmas"),
           ("sigmas None", lambda: P("heun", None), "sigmas"),
           ("sigmas a dict", lambda: P("heun", {"a": 1}), "sigmas"),
           ("2-D sigmas", lambda: P("heun", [[80.0, 0.0]]), "sigmas"),
           ("repeated level", lambda: P("heun", [80.0, 80.0, 0.0]), "sigmas"),
           ("NaN level", lambda: P("heun", [80.0, nan, 0.0]), "sigmas"),
           ("1e300 level", lambda: P("heun", [1e300, 0.0]), SIG),
           ("subnormal level", lambda: P("heun", [1e-320, 0.0]), SIG),
           ("precond a string", lambda: P("heun", sig(), "edm"), "precond"),
           ("precond the class", lambda: P("heun", sig(), edmrt.EDMPrecond), "precond"),
           ("precond an int", lambda: P("heun", sig(), 5), "precond"),
           ("unknown option", lambda: P("heun", sig(), foo=1), "foo"),
           ("order=7", lambda: P("ipndm", sig(), order=7), "order"),
           ("epsilon precond, sigma beyond its levels",
            lambda: P("euler", sig(), edmrt.EpsilonPrecond(alphas_cumprod=np.linspace(0.99, 0.5, 50))), SIG)]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)
    good = [("heun karras 4", lambda: P("heun", sig())), ("README unipc order 3",
            lambda: P("unipc", edmrt.make_sigmas("karras", 10), edmrt.EDMPrecond(), order=3)),
            ("sigmas a torch tensor", lambda: P("euler", torch.tensor(sig()))),
            ("sigmas a tuple", lambda: P("euler", tuple(sig()))),
            ("sigmas float32 numpy", lambda: P("euler", sig().astype(np.float32))),
            ("edm with churn", lambda: P("edm", sig(), edmrt.EDMPrecond(), S_churn=40.0)),
            ("VP precond", lambda: P("dpmpp_2m", edmrt.make_sigmas("vp", 6), edmrt.VPPrecond())),
            ("consistency precond", lambda: P("consistency", [80.0, 0.3, 0.0], edmrt.ConsistencyPrecond(0.5, 0.002)))]
    for label, fn in good:
        case(G, label, f"{label} (valid)", fn, valid=True, check=plan_ok)

    G = "make_sigmas"
    M = edmrt.make_sigmas
    bad = [("steps=0", lambda: M("karras", 0), "steps"), ("steps=2.5", lambda: M("karras", 2.5), "steps"),
           ("sigma_min=0", lambda: M("karras", 5, sigma_min=0), "sigma_min"),
           ("unknown", lambda: M("nope", 5), "schedule"), ("None", lambda: M(None, 5), "schedule"),
           ("rho=0", lambda: M("karras", 5, rho=0), "rho"),
           ("rho=1e300", lambda: M("karras", 5, rho=1e300), "rho"),
           ("vp sigma_max=1e300", lambda: M("vp", 5, sigma_max=1e300), "sigma_max"),
           ("ve sigma_min=1e-300", lambda: M("ve", 5, sigma_min=1e-300), "sigma_min"),
           ("ve sigma_max=1e200 (squares overflow)", lambda: M("ve", 5, sigma_max=1e200), "sigma_max"),
           ("polyexponential rho=1e-300", lambda: M("polyexponential", 5, rho=1e-300), "rho"),
           ("polyexponential rho=1e300", lambda: M("polyexponential", 5, rho=1e300), "rho"),
           ("iddpm steps=2000", lambda: M("iddpm", 2000), "steps"),
           ("sigma_min NaN", lambda: M("karras", 5, sigma_min=np.nan), "sigma_min"),
           ("karras sigma_min=None", lambda: M("karras", 5, sigma_min=None), "sigma_min"),
           ("linear sigma_max='80'", lambda: M("linear", 5, sigma_max="80"), "sigma_max"),
           ("list with steps=0", lambda: M([80.0, 1.0], 0), "steps"),
           ("karras sigma_min=1e-300", lambda: M("karras", 5, sigma_min=1e-300), "sigma_min")]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)
    good = [("loglinear 10000", lambda: M("loglinear", 10_000), 10_000),
            ("list steps=2", lambda: M([80.0, 40.0, 0.0], 2), 2), ("karras np.int32(3)", lambda: M("karras", np.int32(3)), 3),
            ("numpy array", lambda: M(np.array([80.0, 1.0]), 2), 2), ("torch tensor", lambda: M(torch.tensor([80.0, 1.0]), 2), 2),
            ("sigma_max torch scalar", lambda: M("karras", 5, sigma_max=torch.tensor(80.0)), 5),
            ("vp sigma_min=None", lambda: M("vp", 5, sigma_min=None), 5), ("iddpm 10", lambda: M("iddpm", 10), 10),
            ("ve defaults", lambda: M("ve", 7), 7)]
    for label, fn, steps in good:
        case(G, label, f"{label} (valid)", fn, valid=True, check=sigmas_ok(steps))

    G = "precond"
    bad = []
    for v in (0, -1, nan, inf, "a", None, True):
        bad.append((f"EDMPrecond(sigma_data={v!r})", lambda v=v: edmrt.EDMPrecond(sigma_data=v), "sigma_data"))
    bad += [("ConsistencyPrecond(sigma_min=-1)", lambda: edmrt.ConsistencyPrecond(0.5, -1.0), "sigma_min"),
            ("VPPrecond(beta_min=-1)", lambda: edmrt.VPPrecond(beta_min=-1.0), "beta_min"),
            ("VPPrecond(M=1)", lambda: edmrt.VPPrecond(M=1), "M must"),
            ("VPPrecond(M=1.5)", lambda: edmrt.VPPrecond(M=1.5), "M must"),
            ("EpsilonPrecond increasing alphas_cumprod", lambda: edmrt.EpsilonPrecond(alphas_cumprod=[0.5, 0.9]),
             "alphas_cumprod"),
            ("EpsilonPrecond alphas_cumprod > 1", lambda: edmrt.EpsilonPrecond(alphas_cumprod=[1.5, 0.5]), "alphas_cumprod"),
            ("EpsilonPrecond empty alphas_cumprod", lambda: edmrt.EpsilonPrecond(alphas_cumprod=[]), "alphas_cumprod"),
            ("EpsilonPrecond NaN alphas_cumprod", lambda: edmrt.EpsilonPrecond(alphas_cumprod=[0.9, nan, 0.1]),
             "alphas_cumprod"),
            ("EpsilonPrecond timestep='x'", lambda: edmrt.EpsilonPrecond(timestep="x"), "timestep"),
            ("EDMPrecond coefficients at sigma 0", lambda: edmrt.EDMPrecond().coefficients(np.array([0.0])), SIG)]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)

    def coeffs_ok(c):
        ok = len(c) == 4 and all(np.all(np.isfinite(v)) for v in c)
        return ok, "4 finite coefficient arrays" if ok else "non-finite coefficients"
    case(G, "EpsilonPrecond valid", "EpsilonPrecond(alphas_cumprod=linspace(0.999, 0.01, 100)).coefficients([1.0])",
         lambda: edmrt.EpsilonPrecond(alphas_cumprod=np.linspace(0.999, 0.01, 100)).coefficients(np.array([1.0])),
         valid=True, check=coeffs_ok)


# ============================================================================ plan JSON: Plan.from_json and the C++ reader

SYNTAX = ("malformed", "json", "expected", "unexpected", "invalid", "parse")


def base_plan():
    return memo("base_plan", lambda: edmrt.plan("heun", edmrt.make_sigmas("karras", 3), edmrt.EDMPrecond()))


def doc(mutate=None, literal=None) -> str:
    """The base plan's JSON after ``mutate(d)``; ``literal`` replaces the placeholder string "@@" by raw text."""
    d = json.loads(base_plan().to_json())
    if mutate is not None:
        mutate(d)
    text = json.dumps(d)
    return text.replace('"@@"', literal) if literal is not None else text


def setter(**kw):
    def m(d):
        for k, v in kw.items():
            if v is DELETE:
                d.pop(k)
            else:
                d[k] = v
    return m


DELETE = object()


def first(field, value="@@"):
    def m(d):
        d[field][0] = value
    return m


def nest(depth):
    v: object = 1
    for _ in range(depth):
        v = {"a": v}
    return v


def json_docs():
    """(name, summary, make text, expected substrings or None for valid)."""
    text = lambda: doc()  # noqa: E731
    P = ("sigmas",)
    return [
        ("valid round trip", "the base plan's to_json()", text, None),
        ("valid as bytes", "to_json().encode()", lambda: doc().encode(), None),
        ("valid indented", "to_json(indent=4)", lambda: base_plan().to_json(indent=4), None),
        ("empty text", "''", lambda: "", SYNTAX),
        ("lone brace", "'{'", lambda: "{", SYNTAX),
        ("truncated", "the first half of the document", lambda: doc()[: len(doc()) // 2], SYNTAX),
        ("null", "'null'", lambda: "null", ("object",)),
        ("array", "'[]'", lambda: "[]", ("object",)),
        ("number", "'5'", lambda: "5", ("object",)),
        ("NaN literal", "c_in[0] = NaN", lambda: doc(first("c_in"), "NaN"), SYNTAX + ("nan",)),
        ("Infinity literal", "c_in[0] = Infinity", lambda: doc(first("c_in"), "Infinity"), SYNTAX + ("infinity",)),
        ("-Infinity literal", "c_in[0] = -Infinity", lambda: doc(first("c_in"), "-Infinity"), SYNTAX + ("infinity",)),
        ("1e400", "c_in[0] = 1e400 (overflows a double)", lambda: doc(first("c_in"), "1e400"), ("c_in", "range")),
        ("-1e400", "c_in[0] = -1e400", lambda: doc(first("c_in"), "-1e400"), ("c_in", "range")),
        ("huge integer", "c_in[0] = 10**400", lambda: doc(first("c_in"), str(10 ** 400)), ("c_in", "range")),
        ("huge integer step", "step[0] = 10**30", lambda: doc(first("step"), str(10 ** 30)), ("step", "plan.step", "range")),
        ("duplicate key", "'solver' twice", lambda: doc(setter(solver="@@"), '"heun", "solver": "euler"'),
         ("twice", "duplicate")),
        ("c_in a string", "c_in = 'abc'", lambda: doc(setter(c_in="abc")), ("c_in",)),
        ("c_in bools", "c_in[0] = true", lambda: doc(first("c_in", True)), ("c_in",)),
        ("c_in numeric strings", "c_in[0] = '1.0'", lambda: doc(first("c_in", "1.0")), ("c_in",)),
        ("version a string", "version = '1'", lambda: doc(setter(version="1")), ("version",)),
        ("version 2", "version = 2", lambda: doc(setter(version=2)), ("version",)),
        # JSON has one number type (RFC 8259): 1.0 is version 1, and both readers take it so.
        ("version 1.0", "version = 1.0 (valid)", lambda: doc(setter(version=1.0)), None),
        ("format wrong", "format = 'other'", lambda: doc(setter(format="other")), ("format",)),
        ("format missing", "no 'format'", lambda: doc(setter(format=DELETE)), ("format",)),
        ("c_skip missing", "no 'c_skip'", lambda: doc(setter(c_skip=DELETE)), ("c_skip",)),
        ("unknown field", "extra field 'foo'", lambda: doc(setter(foo=1)), ("foo",)),
        ("commit 2", "commit[0] = 2", lambda: doc(first("commit", 2)), ("commit",)),
        ("commit a string", "commit[0] = 'yes'", lambda: doc(first("commit", "yes")), ("commit",)),
        ("last commit false", "commit[-1] = false",
         lambda: doc(lambda d: d["commit"].__setitem__(-1, False)), ("commit",)),
        ("b a number", "b = 5", lambda: doc(setter(b=5)), ("'b'", '"b"', "plan.b", "field b", " b ")),
        ("b ragged", "b = [[1.0], [1.0, 2.0], ...]",
         lambda: doc(lambda d: d["b"].__setitem__(0, [d["b"][0][0]])), ("'b'", '"b"', "plan.b", "field b", " b ")),
        ("b with 17 columns", "every row of b padded to 17 entries",
         lambda: doc(lambda d: d.__setitem__("b", [r + [0.0] * (17 - len(r)) for r in d["b"]])), ("16", "history")),
        ("step 0.5", "step[0] = 0.5", lambda: doc(first("step", 0.5)), ("step",)),
        ("step negative", "step[0] = -1", lambda: doc(first("step", -1)), ("step",)),
        ("step decreasing", "step = reversed", lambda: doc(lambda d: d["step"].reverse()), ("step",)),
        ("n_init -1", "n_init = -1", lambda: doc(setter(n_init=-1)), ("n_init",)),
        ("n_init null", "n_init = null", lambda: doc(setter(n_init=None)), ("n_init",)),
        ("n_init a string", "n_init = '0'", lambda: doc(setter(n_init="0")), ("n_init",)),
        ("n negative", "n[0] = -1", lambda: doc(first("n", -1.0)), ("plan.n", "'n'", '"n"', "field n", "noise scale")),
        ("sigma 0 at a stage", "sigma[0] = 0", lambda: doc(first("sigma", 0.0)), SIG),
        ("sigmas ascending", "sigmas reversed", lambda: doc(lambda d: d["sigmas"].reverse()), P),
        ("sigmas without 0", "sigmas without the trailing 0", lambda: doc(lambda d: d["sigmas"].pop()), P),
        ("precond an array", "precond = []", lambda: doc(setter(precond=[])), ("precond",)),
        ("options 100 deep", "options nested 100 levels", lambda: doc(setter(options=nest(100))),
         ("nests", "nesting", "deeper", "depth")),
        ("c_in short", "c_in one entry short", lambda: doc(lambda d: d["c_in"].pop()), ("c_in",)),
        ("no stages", "every per-stage array empty",
         lambda: doc(lambda d: [d.__setitem__(k, []) for k in ("step", "sigma", "c_in", "c_noise", "c_skip", "c_out",
                                                                 "alpha", "beta", "a", "e", "b", "n", "commit")]),
         ("stage",)),
        ("solver empty", "solver = ''", lambda: doc(setter(solver="")), ("solver",)),
        ("lone surrogate", "solver = '\\ud800'", lambda: doc(setter(solver="@@"), '"\\ud800"'), ("surrogate", "utf")),
        ("invalid UTF-8 bytes", "bytes with 0xff inside a string",
         lambda: doc(setter(solver="@@"), '"he\udcffun"').encode("utf-8", "surrogateescape"), ("utf",)),
        ("BOM text", "'\\ufeff' + document", lambda: "\ufeff" + doc(), SYNTAX + ("bom",)),
        ("BOM bytes", "b'\\xef\\xbb\\xbf' + document", lambda: b"\xef\xbb\xbf" + doc().encode(), SYNTAX + ("bom",)),
        ("UTF-16 bytes", "document.encode('utf-16')", lambda: doc().encode("utf-16"), SYNTAX + ("utf",)),
        ("UTF-32 bytes", "document.encode('utf-32-le')", lambda: doc().encode("utf-32-le"), SYNTAX + ("utf",)),
        ("plus sign", "c_in[0] = +1", lambda: doc(first("c_in"), "+1"), SYNTAX),
        ("leading dot", "c_in[0] = .5", lambda: doc(first("c_in"), ".5"), SYNTAX),
        ("hex number", "c_in[0] = 0x1", lambda: doc(first("c_in"), "0x1"), SYNTAX),
        ("leading zero", "c_in[0] = 01", lambda: doc(first("c_in"), "01"), SYNTAX),
        ("empty exponent", "c_in[0] = 1e", lambda: doc(first("c_in"), "1e"), SYNTAX),
        ("trailing garbage", "document + ' x'", lambda: doc() + " x", SYNTAX + ("trailing", "extra")),
        ("comment", "'/* c */' + document", lambda: "/* c */" + doc(), SYNTAX + ("comment",)),
        ("control character", "raw U+0001 inside a string", lambda: doc(setter(solver="@@"), '"he\x01un"'),
         SYNTAX + ("control",)),
        ("NUL byte", "raw NUL after the document", lambda: doc() + "\x00", SYNTAX + ("trailing",)),
        ("None", "None", lambda: None, ("json", "text", "str")),
        ("int", "5 (not text)", lambda: 5, ("json", "text", "str")),
    ]


def define_json():
    for name, summary, make, expect in json_docs():
        valid = expect is None
        case("Plan.from_json", name, summary, lambda make=make: edmrt.Plan.from_json(make()), valid=valid,
             expect=expect or (), check=(lambda p: (p == base_plan(), "equal to the plan" if p == base_plan()
                                                    else "differs from the plan")) if valid else None)
        case("_core.plan_table_from_json", name, summary, lambda make=make: _core.plan_table_from_json(make()),
             valid=valid, expect=expect or (),
             check=(lambda t: (np.array_equal(t, plan_table(base_plan()).numpy()), "table compared with plan_table"))
             if valid else None)


# ============================================================================ Sampler, Model, load

def digits():
    return memo("digits", lambda: edmrt.load("digits"))


def student():
    return memo("digits-cd", lambda: edmrt.load("digits-cd"))


def cd_sampler():
    return memo("cd_sampler", lambda: edmrt.Sampler(student(), backend="torch"))


def cd(seeds=(0, 1, 2, 3), **kw):
    return cd_sampler().sample(list(seeds) if isinstance(seeds, tuple) else seeds, **kw)


def cd3():
    return memo("cd3", lambda: cd(cond=3))


def teacher(**kw):
    key = ("teacher",) + tuple(sorted(kw.items()))
    return memo(key, lambda: edmrt.Sampler(digits(), backend="torch", **kw))


def define_sampler():
    G = "Sampler"
    Sm = edmrt.Sampler
    bad = [("model a string", lambda: Sm("digits"), "model"), ("model None", lambda: Sm(None), "model"),
           ("model a lambda", lambda: Sm(lambda x, s: x), "model"),
           ("model the bare network", lambda: Sm(digits().network), "model"),
           ("model a dict", lambda: Sm({"network": None}), "model")]
    for v in ("nope", "", None, 5, "TORCH", "onnx"):
        bad.append((f"backend={v!r}", lambda v=v: Sm(student(), backend=v), "backend"))
    bad.append(("backend='tensorrt' (not installed)", lambda: Sm(edmrt.load("digits-cd"), backend="tensorrt"),
                ("tensorrt",)))
    bad.append(("backend a 1-arg lambda", lambda: Sm(student(), backend=lambda x: x).sample([0], cond=1), "backend"))
    for v in (0, -1, 1.5, True, "8", None):
        bad.append((f"max_engines={v!r}", lambda v=v: Sm(student(), backend="torch", max_engines=v), "max_engines"))
    for v in (10 ** 7, 0, -1, 1.5, True, "2"):
        bad.append((f"steps={v!r}", lambda v=v: Sm(digits(), backend="torch", steps=v), "steps"))
    bad += [("solver 'nope'", lambda: Sm(digits(), solver="nope", backend="torch"), "solver"),
            ("solver 5", lambda: Sm(digits(), solver=5, backend="torch"), "solver"),
            ("schedule 'nope'", lambda: Sm(digits(), schedule="nope", backend="torch"), "schedule"),
            ("schedule ascending", lambda: Sm(digits(), schedule=[1.0, 80.0], backend="torch"), ("schedule", "sigmas")),
            ("edm S_churn=-1", lambda: Sm(digits(), solver="edm", S_churn=-1, backend="torch"), "S_churn"),
            ("unknown option", lambda: Sm(digits(), foo=1, backend="torch"), "foo"),
            ("rho=0", lambda: Sm(digits(), solver="euler", steps=4, rho=0, backend="torch"), "rho"),
            ("device 'cuda' (none here)", lambda: Sm(edmrt.load("digits-cd"), backend="torch", device="cuda"),
             ("cuda", "device")),
            ("device 'nope'", lambda: Sm(edmrt.load("digits-cd"), backend="torch", device="nope"), "device"),
            ("device 5", lambda: Sm(edmrt.load("digits-cd"), backend="torch", device=5), "device"),
            ("tcd gamma=2 on the student", lambda: Sm(student(), solver="tcd", gamma=2, backend="torch"), "gamma")]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)

    def engines_one():
        s = Sm(student(), backend="torch", max_engines=1)
        a = s.sample([0, 1], cond=3)
        s.sample([0, 1, 2], cond=3)
        b = s.sample([0, 1], cond=3)
        return Verdict(bool(torch.equal(a, b)) and len(s._engines) == 1, f"re-sampled equal: {torch.equal(a, b)}")
    case(G, "max_engines=1", "batches 2, 3, 2 with max_engines=1", engines_one, valid=True)
    case(G, "max_engines=10**9", "max_engines=10**9", lambda: Sm(student(), backend="torch", max_engines=10 ** 9).sample(
        [0, 1, 2, 3], cond=3), valid=True, check=close_to(cd3, 1e-6, "the default sampler"))
    case(G, "backend 'custom' on a module", "backend='custom' with the UNet as a callable",
         lambda: Sm(student(), backend="custom").sample([0, 1, 2, 3], cond=3), valid=True, check=close_to(cd3, 1e-6))
    case(G, "backend object", "backend=TorchBackend(network)",
         lambda: Sm(student(), backend=edmrt.backends.TorchBackend(student().network)).sample([0, 1, 2, 3], cond=3),
         valid=True, check=close_to(cd3, 1e-6))
    case(G, "backend 'onnxruntime'", "backend='onnxruntime' (exports into a scratch cache)",
         lambda: Sm(student(), backend="onnxruntime").sample([0, 1, 2, 3], cond=3), valid=True, check=close_to(cd3, 1e-4))
    case(G, "teacher heun 18 with guidance", "Sampler(digits).sample([0, 1], cond=[3, 4], guidance=2)",
         lambda: teacher().sample([0, 1], cond=[3, 4], guidance=2.0), valid=True, check=finite_shape((2, 1, 8, 8)))
    case(G, "student tcd", "Sampler(digits-cd, solver='tcd')",
         lambda: Sm(student(), solver="tcd", backend="torch").sample([0, 1], cond=3), valid=True,
         check=finite_shape((2, 1, 8, 8)))

    G = "Sampler.sample"
    bad = [("floats", [1.5]), ("integral floats", [1.0]), ("bools", [True]), ("True", True), ("negative", [-1]),
           ("2**63", [2 ** 63]), ("2**64", [2 ** 64]), ("a range string", "0-3"), ("a string", "abc"), ("empty", []),
           ("None", None), ("an int", 5), ("None entries", [None]), ("np.float64", [np.float64(1)])]
    for label, v in bad:
        case(G, f"seeds {label}", f"seeds={v!r}", lambda v=v: cd(v, cond=3), expect="seeds")
    for label, make in (("float numpy", lambda: np.array([1.0])), ("bool numpy", lambda: np.array([True])),
                        ("float tensor", lambda: torch.tensor([1.0])), ("2-D tensor", lambda: torch.tensor([[0, 1]])),
                        ("2-D numpy", lambda: np.array([[0, 1]])), ("complex", lambda: [1 + 0j])):
        case(G, f"seeds {label}", f"seeds={label}", lambda make=make: cd(make(), cond=3), expect="seeds")
    for label, make in (("range", lambda: range(4)), ("numpy", lambda: np.arange(4)), ("torch", lambda: torch.arange(4)),
                        ("torch int32", lambda: torch.arange(4, dtype=torch.int32)),
                        ("np.int64 list", lambda: [np.int64(i) for i in range(4)]),
                        ("generator", lambda: (i for i in range(4)))):
        case(G, f"seeds {label}", f"seeds={label} [0..3], cond=3", lambda make=make: cd(make(), cond=3), valid=True,
             check=close_to(cd3, 1e-6, "seeds=[0, 1, 2, 3]"))
    case(G, "seeds 2**63 - 1", "seeds=[2**63 - 1]", lambda: cd([2 ** 63 - 1], cond=3), valid=True,
         check=finite_shape((1, 1, 8, 8)))
    case(G, "duplicate seeds", "seeds=[5, 5]", lambda: cd([5, 5], cond=3), valid=True,
         check=lambda x: (bool(torch.equal(x[0], x[1])), "the two samples are equal" if torch.equal(x[0], x[1]) else "differ"))
    case(G, "batch 1", "seeds=[2] alone equals sample 2 of the batch", lambda: cd([2], cond=3), valid=True,
         check=close_to(lambda: cd3()[2:3], 1e-5, "row 2 of the batch"))
    case(G, "batch 300", "seeds=range(300); sample 2 equals sample 2 of the batch of 4", lambda: cd(range(300), cond=3),
         valid=True, check=lambda x: close_to(lambda: cd3()[2:3], 1e-5, "row 2 of the batch of 4")(x[2:3])
         if isinstance(x, torch.Tensor) and x.shape == (300, 1, 8, 8) and bool(torch.isfinite(x).all())
         else (False, f"returned {describe(x)}"))

    bad = [("the null label 10", 10), ("-1", -1), ("11", 11), ("1.5", 1.5), ("True", True), ("'3'", "3"),
           ("2 labels for 4 seeds", [1, 2]), ("2**70", 2 ** 70), ("nested", [[1, 2]]), ("floats", [3.0] * 4),
           ("None entries", [None] * 4), ("np.bool_", np.bool_(True)), ("np.float64", np.float64(3))]
    for label, v in bad:
        case(G, f"cond {label}", f"cond={v!r}", lambda v=v: cd(cond=v), expect="cond")
    for label, make in (("float numpy", lambda: np.array([3.0])), ("float tensor", lambda: torch.tensor([3.0])),
                        ("2-D tensor", lambda: torch.tensor([[3]])), ("bool tensor", lambda: torch.tensor([True])),
                        ("int tensor of 5 for 4 seeds", lambda: torch.tensor([3] * 5))):
        case(G, f"cond {label}", f"cond={label}", lambda make=make: cd(cond=make()), expect="cond")
    for label, make in (("tensor", lambda: torch.tensor([3])), ("np.int64", lambda: np.int64(3)), ("list", lambda: [3] * 4),
                        ("0-d tensor", lambda: torch.tensor(3)), ("np.uint8", lambda: np.uint8(3)),
                        ("int32 tensor of 4", lambda: torch.full((4,), 3, dtype=torch.int32))):
        case(G, f"cond {label}", f"cond={label} (3)", lambda make=make: cd(cond=make()), valid=True,
             check=close_to(cd3, 1e-6, "cond=3"))
    case(G, "cond None", "cond=None (unconditional draw)", lambda: cd(), valid=True, check=finite_shape((4, 1, 8, 8)))
    case(G, "cond range", "cond=range(4)", lambda: cd(cond=range(4)), valid=True, check=finite_shape((4, 1, 8, 8)))

    bad = [("-5", -5), ("NaN", nan), ("Inf", inf), ("101", 101), ("1e30", 1e30), ("'2'", "2"), ("True", True),
           ("[2]", [2]), ("2 values", "tensor2"), ("complex", 2 + 0j), ("None string", "None")]
    for label, v in bad:
        case(G, f"guidance {label}", f"guidance={v!r}",
             lambda v=v: cd(cond=3, guidance=torch.tensor([2.0, 3.0]) if v == "tensor2" else v), expect="guidance")
    case(G, "guidance without cond", "guidance=2, cond=None", lambda: cd(guidance=2.0), expect=("guidance", "cond"))

    def guided(w):
        return memo(("guided", w), lambda: cd(cond=3, guidance=w))
    checks = {None: finite_shape((4, 1, 8, 8)), "none": close_to(cd3, 1e-4, "no guidance"),
              "2": close_to(lambda: guided(2.0), 1e-6, "guidance=2.0")}
    for label, v, ref in (("0", 0, None), ("1", 1, "none"), ("100", 100, None), ("2.0", 2.0, None),
                          ("np.float32(2)", np.float32(2), "2"), ("torch.tensor(2.)", torch.tensor(2.0), "2"),
                          ("Fraction(2)", fractions.Fraction(2), "2"), ("Decimal('2')", Decimal("2"), "2")):
        case(G, f"guidance {label}", f"guidance={label}, cond=3", lambda v=v: cd(cond=3, guidance=v), valid=True,
             check=checks[ref])


def fn_model(fn, **kw):
    kw.setdefault("num_classes", 3)
    return edmrt.Model(fn, edmrt.EDMPrecond(), sample_shape=(1, 4, 4), **kw)


def fsample(fn, backend="torch", **kw):
    s = edmrt.Sampler(fn_model(fn), solver="euler", steps=3, backend=backend)
    return s.sample(range(3), cond=[0, 1, 2], **kw)


def good_net(x, c, labels):
    return torch.tanh(x) * (1 + labels.view(-1, 1, 1, 1)) / 4


def define_model():
    G = "Model (function network)"
    NET = ("network",)
    ref = lambda: memo("fsample", lambda: fsample(good_net))  # noqa: E731
    case(G, "valid network", "F = tanh(x) (1 + label) / 4", lambda: fsample(good_net), valid=True,
         check=finite_shape((3, 1, 4, 4)))
    case(G, "valid, backend 'custom'", "the same with backend='custom'", lambda: fsample(good_net, backend="custom"),
         valid=True, check=close_to(ref, 0.0, "backend 'torch'"))
    case(G, "float64 output", "returns F.double()", lambda: fsample(lambda x, c, class_labels: good_net(x, c, class_labels).double()),
         valid=True, check=close_to(ref, 1e-6))
    p = torch.nn.Parameter(torch.ones(()))
    case(G, "output requires grad", "returns F * nn.Parameter(1.)", lambda: fsample(lambda x, c, class_labels: good_net(x, c, class_labels) * p),
         valid=True, check=close_to(ref, 1e-6))
    case(G, "with guidance", "guidance=2", lambda: fsample(good_net, guidance=2.0), valid=True,
         check=finite_shape((3, 1, 4, 4)))
    outs = [("wrong shape", "returns x[..., :2]", lambda x, c, class_labels: x[..., :2], ("shape",)),
            ("broadcastable", "returns (1, 1, 4, 4)", lambda x, c, class_labels: good_net(x, c, class_labels)[:1], ("shape",)),
            ("extra dimension", "returns F[..., None]", lambda x, c, class_labels: good_net(x, c, class_labels)[..., None], ("shape",)),
            ("NaN", "returns NaN", lambda x, c, class_labels: torch.full_like(x, nan), NET),
            ("Inf", "returns Inf", lambda x, c, class_labels: torch.full_like(x, inf), NET),
            ("huge", "returns 3e38", lambda x, c, class_labels: torch.full_like(x, 3e38), NET),
            ("complex", "returns complex64", lambda x, c, class_labels: good_net(x, c, class_labels).to(torch.complex64), ("real", "complex")),
            ("list", "returns [F]", lambda x, c, class_labels: [good_net(x, c, class_labels)], NET),
            ("None", "returns None", lambda x, c, class_labels: None, NET),
            ("numpy", "returns F.numpy()", lambda x, c, class_labels: good_net(x, c, class_labels).numpy(), NET),
            ("int tensor", "returns F.long()", lambda x, c, class_labels: good_net(x, c, class_labels).long(), NET),
            ("two-argument function", "lambda x, c: x", lambda x, c: x, NET)]
    for label, summary, fn, exp in outs:
        case(G, label, summary, lambda fn=fn: fsample(fn), expect=exp)

    def raises(x, c, l):
        raise ValueError("network-boom")
    case(G, "raises", "raises ValueError('network-boom')", lambda: fsample(raises), expect="network-boom",
         propagate=ValueError)

    G = "Model"
    M = edmrt.Model
    bad = []
    for v in (-1, 1.5, True, "10", None):
        bad.append((f"num_classes={v!r}", lambda v=v: fn_model(good_net, num_classes=v), "num_classes"))
    for v in ((), (0, 4, 4), (-1,), "abc", None, (1.5, 4, 4), (1, 4, 4.7)):
        bad.append((f"sample_shape={v!r}", lambda v=v: M(good_net, sample_shape=v), "sample_shape"))
    for kw in (dict(sigma_min=0), dict(sigma_min=-1), dict(sigma_min=nan), dict(sigma_min="0.1"), dict(sigma_max=inf),
               dict(sigma_max=nan), dict(sigma_min=10.0, sigma_max=1.0)):
        bad.append((", ".join(f"{k}={v!r}" for k, v in kw.items()), lambda kw=kw: M(good_net, **kw),
                    tuple(kw)))
    bad += [("sigma_max=1e300, then Sampler", lambda: edmrt.Sampler(fn_model(good_net, sigma_max=1e300), backend="torch"),
             "sigma_max"),
            ("precond a string", lambda: M(good_net, precond="edm"), "precond"),
            ("precond the class", lambda: M(good_net, precond=edmrt.EDMPrecond), "precond"),
            ("metadata a list", lambda: M(good_net, metadata=[]), "metadata"),
            ("metadata a string", lambda: M(good_net, metadata="card"), "metadata"),
            ("digits net, num_classes=5", lambda: M(digits().network, sample_shape=(1, 8, 8), num_classes=5), "num_classes"),
            ("digits net, num_classes=0", lambda: M(digits().network, sample_shape=(1, 8, 8)), "num_classes"),
            ("digits net, 3 channels", lambda: M(digits().network, sample_shape=(3, 8, 8), num_classes=10), "sample_shape"),
            ("digits net, 16x16, then sample", lambda: edmrt.Sampler(
                M(digits().network, sample_shape=(1, 16, 16), num_classes=10), solver="euler", steps=2,
                backend="torch").sample([0], cond=1), ("sample_shape", "resolution"))]
    sampling = [("not a dict", "heun", "sampling"), ("solver 5", {"solver": 5}, "solver"), ("steps 0", {"steps": 0}, "steps"),
                ("steps 1.5", {"steps": 1.5}, "steps"), ("steps '18'", {"steps": "18"}, "steps"),
                ("solvers a string", {"solvers": "consistency"}, "solvers"),
                ("levels too short", {"levels": {"2": [80, 1]}}, "levels"),
                ("levels key 'two'", {"levels": {"two": [80, 1, 0]}}, "levels"),
                ("levels with a string", {"levels": {"2": [80, "1", 0]}}, "levels")]
    for label, v, exp in sampling:
        bad.append((f"metadata sampling {label}", lambda v=v: M(good_net, metadata={"sampling": v}), exp))
    card_then_sampler = [
        ("solver 'nope'", {"solver": "nope"}, "solver"), ("steps 10**7", {"steps": 10 ** 7}, "steps"),
        ("ascending levels", {"solver": "euler", "steps": 2, "solvers": ["euler"], "levels": {"2": [1, 80, 0]}},
         ("levels", "sigmas")),
        ("NaN level", {"solver": "euler", "steps": 2, "solvers": ["euler"], "levels": {"2": [80, nan, 0]}},
         ("levels", "sigmas")),
        ("1e300 level", {"solver": "euler", "steps": 2, "solvers": ["euler"], "levels": {"2": [1e300, 1, 0]}},
         ("levels",) + SIG)]
    for label, v, exp in card_then_sampler:
        bad.append((f"metadata sampling {label}, then Sampler and sample",
                    lambda v=v: edmrt.Sampler(fn_model(good_net, metadata={"sampling": v}), backend="torch").sample(
                        [0], cond=1), exp))
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)
    case(G, "metadata sampling levels used", "card levels {'2': [80, 1, 0]} for euler",
         lambda: edmrt.Sampler(fn_model(good_net, metadata={"sampling": {"solver": "euler", "steps": 2, "solvers": ["euler"],
                                                                          "levels": {"2": [80, 1, 0]}}}),
                               backend="torch").sample([0], cond=1), valid=True,
         check=close_to(lambda: edmrt.Sampler(fn_model(good_net), solver="euler", steps=2, schedule=[80.0, 1.0, 0.0],
                                              backend="torch").sample([0], cond=1), 0.0, "schedule=[80, 1, 0]"))
    case(G, "unconditional model", "num_classes=0, cond=None", lambda: edmrt.Sampler(
        fn_model(lambda x, c: torch.tanh(x), num_classes=0), solver="euler", steps=3, backend="torch").sample([0, 1]),
        valid=True, check=finite_shape((2, 1, 4, 4)))
    case(G, "unconditional model with cond", "num_classes=0, cond=1", lambda: edmrt.Sampler(
        fn_model(lambda x, c: torch.tanh(x), num_classes=0), solver="euler", steps=3, backend="torch").sample(
        [0, 1], cond=1), expect="cond")


def root_copy(name="digits", card=None, weights=None) -> Path:
    """A weights folder holding ``name``'s card (edited by ``card(c)``, which may return text) and weights
    (``weights(path)`` writes them; default: a copy)."""
    d = Path(tempfile.mkdtemp(dir=WORK, prefix="root-"))
    c = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    if card is not None:
        c = card(c)
    if c is not None:
        (d / f"{name}.json").write_text(c if isinstance(c, str) else json.dumps(c))
    if weights is None:
        shutil.copy(WEIGHTS_DIR / f"{name}.safetensors", d / f"{name}.safetensors")
    else:
        weights(d / f"{name}.safetensors")
    return d


def edit(path_fn):
    def card(c):
        path_fn(c)
        return c
    return card


def tensors_edit(change):
    def weights(path):
        from safetensors.torch import load_file, save_file
        t = load_file(str(WEIGHTS_DIR / "digits.safetensors"))
        change(t)
        save_file(t, str(path))
    return weights


def first_float(t):
    return next(k for k, v in sorted(t.items()) if v.is_floating_point() and v.ndim >= 2)


def define_load():
    G = "load"
    L = edmrt.load
    for v in ("nope", None, 5, "../digits", "digits/../digits", "/etc/passwd", "", "DIGITS", "digits "):
        case(G, f"name {v!r}", f"edmrt.load({v!r})", lambda v=v: L(v), expect="model")
    bad = [
        ("root missing", lambda: L("digits", root=WORK / "no-such-folder"), ("card", "no-such-folder")),
        ("root a file", lambda: L("digits", root=WEIGHTS_DIR / "digits.json"), ("card", "digits.json")),
        ("truncated weights", lambda: L("digits", root=root_copy(weights=lambda p: p.write_bytes(
            (WEIGHTS_DIR / "digits.safetensors").read_bytes()[: 3_000_000]))), ("safetensors",)),
        ("empty weights", lambda: L("digits", root=root_copy(weights=lambda p: p.write_bytes(b""))), ("safetensors",)),
        ("garbage weights", lambda: L("digits", root=root_copy(weights=lambda p: p.write_bytes(b"\xff" * 64))),
         ("safetensors",)),
        ("huge header length", lambda: L("digits", root=root_copy(weights=lambda p: p.write_bytes(
            (2 ** 62).to_bytes(8, "little") + b"{}"))), ("safetensors",)),
        ("sparse 300 MB weights", lambda: L("digits", root=root_copy(weights=sparse_file)), ("safetensors",)),
        ("weights missing", lambda: L("digits", root=root_copy(weights=lambda p: None)), ("weights", "does not exist")),
        ("weights a folder", lambda: L("digits", root=root_copy(weights=lambda p: p.mkdir())), ("weights",)),
        ("weights -> /dev/zero", lambda: L("digits", root=root_copy(weights=lambda p: p.symlink_to("/dev/zero"))),
         ("weights",)),
        ("dtype tampered", lambda: L("digits", root=root_copy(weights=tensors_edit(
            lambda t: t.__setitem__(first_float(t), t[first_float(t)].half())))), ("dtype",)),
        ("dtype tampered to int32 bits", lambda: L("digits", root=root_copy(weights=tensors_edit(
            lambda t: t.__setitem__(first_float(t), t[first_float(t)].view(torch.int32))))), ("dtype",)),
        ("shape tampered", lambda: L("digits", root=root_copy(weights=tensors_edit(
            lambda t: t.__setitem__(first_float(t), t[first_float(t)].reshape(-1))))), ("shape",)),
        ("tensor renamed", lambda: L("digits", root=root_copy(weights=tensors_edit(
            lambda t: t.__setitem__("renamed", t.pop(first_float(t)))))), ("missing", "unexpected")),
        ("NaN weights", lambda: L("digits", root=root_copy(weights=tensors_edit(
            lambda t: t[first_float(t)].view(-1).__setitem__(0, nan)))), ("nan",)),
        ("card not JSON", lambda: L("digits", root=root_copy(card=lambda c: "{not json")), ("json",)),
        ("card a JSON list", lambda: L("digits", root=root_copy(card=lambda c: "[]")), ("model card",)),
        ("card format wrong", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(format="x")))), ("model card",)),
        ("card missing architecture", lambda: L("digits", root=root_copy(card=edit(lambda c: c.pop("architecture")))),
         ("architecture",)),
        ("card sample_shape 16x16", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(
            sample_shape=[1, 16, 16])))), ("sample_shape",)),
        ("card num_classes 5", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(num_classes=5)))),
         ("num_classes",)),
        ("card num_classes '10'", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(num_classes="10")))),
         ("num_classes",)),
        ("card num_classes 10.0", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(num_classes=10.0)))),
         ("num_classes",)),
        ("card sigma_min 'abc'", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(sigma_min="abc")))),
         ("sigma_min",)),
        ("card sigma_min -1", lambda: L("digits", root=root_copy(card=edit(lambda c: c.update(sigma_min=-1)))),
         ("sigma_min",)),
        ("card sigma_max 1e300, then Sampler", lambda: edmrt.Sampler(L("digits", root=root_copy(card=edit(
            lambda c: c.update(sigma_max=1e300)))), backend="torch"), ("sigma_max",)),
        ("card precond 'vp'", lambda: L("digits", root=root_copy(card=edit(lambda c: c["precond"].update(name="vp")))),
         ("precond", "preconditioning")),
        ("card sigma_data -1", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c["precond"].update(sigma_data=-1)))), ("sigma_data",)),
        ("card img_resolution '8'", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c["architecture"].update(img_resolution="8")))), ("img_resolution",)),
        ("card unknown architecture key", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c["architecture"].update(foo=1)))), ("foo",)),
        ("card model_channels 10**5", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c["architecture"].update(model_channels=10 ** 5)))), ("model_channels", "weights", "does not fit")),
        ("card channel_mult 'abc'", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c["architecture"].update(channel_mult="abc")))), ("channel_mult",)),
        ("card sampling steps 0", lambda: L("digits", root=root_copy(card=edit(
            lambda c: c.setdefault("sampling", {}).update(steps=0)))), ("steps",)),
        ("card -> /dev/zero", lambda: L("digits", root=root_card_link("/dev/zero")), ("card",)),
        ("card a FIFO", lambda: L("digits", root=root_card_fifo()), ("card",)),
        ("device 'nope'", lambda: L("digits", device="nope"), ("device",)),
        ("device 'cuda' (none here)", lambda: L("digits", device="cuda"), ("device", "cuda")),
    ]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)
    ref_state = lambda m: (isinstance(m, edmrt.Model), "a Model")  # noqa: E731

    def same_weights(name):
        def check(m):
            if not isinstance(m, edmrt.Model):
                return False, f"returned {describe(m)}"
            ref = edmrt.load(name).network.state_dict()
            ok = all(torch.equal(v, ref[k]) for k, v in m.network.state_dict().items())
            return ok, "weights equal to the bundled ones" if ok else "weights differ"
        return check
    case(G, "digits", "edmrt.load('digits')", lambda: L("digits"), valid=True, check=ref_state)
    case(G, "digits-cd", "edmrt.load('digits-cd')", lambda: L("digits-cd"), valid=True, check=ref_state)
    case(G, "a copied root", "edmrt.load('digits', root=<copy>)", lambda: L("digits", root=str(root_copy())), valid=True,
         check=same_weights("digits"))


def sparse_file(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(300 << 20)


def root_card_link(target) -> Path:
    """A copied root whose card is a symbolic link to ``target`` (e.g. /dev/zero: endless bytes)."""
    d = root_copy()
    (d / "digits.json").unlink()
    (d / "digits.json").symlink_to(target)
    return d


def root_card_fifo() -> Path:
    """A copied root whose card is a named pipe nobody writes to (opening it for reading blocks)."""
    d = root_copy()
    (d / "digits.json").unlink()
    os.mkfifo(d / "digits.json")
    return d


# ============================================================================ edmrt.kernels and edmrt._core

def kb(B=2, shape=(1, 4, 4), guidance=False, solver="heun"):
    """Valid buffers for a fused step of a 3-step plan (K = 2 for heun)."""
    p = edmrt.plan(solver, edmrt.make_sigmas("karras", 3), edmrt.EDMPrecond())
    nB = 2 * B if guidance else B
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B,) + shape, generator=g)
    return dict(table=plan_table(p), stage=0, x=x, x_eval=x.clone(), F=torch.randn((nB,) + shape, generator=g),
                Y=torch.zeros((p.history, B) + shape), x_in=torch.zeros((nB,) + shape), sigma_in=torch.zeros(nB),
                seeds=torch.arange(B, dtype=torch.int64), guidance=2.0 if guidance else None)


def kstep(impl="cpp", **over):
    d = kb(guidance=over.pop("_guidance", False))
    d.update(over)
    fused_step(**d, impl=impl)
    return d


def step_vs_reference(**kw):
    def run():
        a = kstep("cpp", **kw)
        b = kstep("reference", **kw)
        err = max(float((a[k] - b[k]).abs().max()) for k in ("x", "x_eval", "Y", "x_in", "sigma_in"))
        return Verdict(err <= 1e-5, f"max |C++ - reference| {err:.3g}")
    return run


def kinit(impl="cpp", **over):
    d = kb()
    args = dict(table=d["table"], t0=80.0, n_init=0.0, seeds=d["seeds"], x=d["x"], x_eval=d["x_eval"], x_in=d["x_in"],
                sigma_in=d["sigma_in"], x0=None)
    args.update(over)
    init_state(**args, impl=impl)
    return args


def kstepper(**over):
    d = kb()
    d.pop("F"), d.pop("stage")
    d.update(over)
    return Stepper(**d, impl="cpp")


def readonly_tensor(shape):
    path = WORK / f"ro-{time.monotonic_ns()}.bin"
    np.zeros(shape, np.float32).tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r", shape=shape))


def define_kernels():
    G = "kernels.fused_step"
    K = kb
    S_ = 5  # heun, 3 steps: 5 stages
    bad = [("table float32", dict(table=lambda: K()["table"].float()), "table"),
           ("table without b columns", dict(table=lambda: K()["table"][:, :FIXED].contiguous()), "table"),
           ("table 1-D", dict(table=lambda: K()["table"][0].contiguous()), "table"),
           ("table with 0 rows", dict(table=lambda: K()["table"][:0]), "table"),
           ("table with 17 history columns", dict(table=lambda: torch.zeros(S_, FIXED + 17, dtype=torch.float64)), "table"),
           ("table non-contiguous", dict(table=lambda: K()["table"].T.contiguous().T), "table"),
           ("table a numpy array", dict(table=lambda: K()["table"].numpy()), "table")]
    for v in (-1, S_, 1.5, True, None, "0", 2 ** 40):
        bad.append((f"stage={v!r}", dict(stage=lambda v=v: v), "stage"))
    bad += [("x float64", dict(x=lambda: K()["x"].double()), "x"),
            ("x non-contiguous", dict(x=lambda: K()["x"].transpose(2, 3)), "x"),
            ("x 0-d", dict(x=lambda: torch.tensor(1.0)), "x"),
            ("x None", dict(x=lambda: None), "x"),
            ("x_eval wrong shape", dict(x_eval=lambda: torch.zeros(2, 1, 4, 5)), "x_eval"),
            ("x_eval float16", dict(x_eval=lambda: torch.zeros(2, 1, 4, 4, dtype=torch.float16)), "x_eval"),
            ("F wrong shape", dict(F=lambda: torch.zeros(2, 1, 4, 5)), "F"),
            ("F float16 (cpp)", dict(F=lambda: torch.zeros(2, 1, 4, 4, dtype=torch.float16)), "F"),
            ("F int", dict(F=lambda: torch.zeros(2, 1, 4, 4, dtype=torch.int32)), "F"),
            ("F non-contiguous", dict(F=lambda: torch.zeros(2, 1, 4, 4).transpose(2, 3)), "F"),
            ("F None", dict(F=lambda: None), "F"),
            ("Y with K=1", dict(Y=lambda: torch.zeros(1, 2, 1, 4, 4)), "Y"),
            ("Y wrong batch", dict(Y=lambda: torch.zeros(2, 3, 1, 4, 4)), "Y"),
            ("x_in batch 3", dict(x_in=lambda: torch.zeros(3, 1, 4, 4)), "x_in"),
            ("x_in float64", dict(x_in=lambda: torch.zeros(2, 1, 4, 4, dtype=torch.float64)), "x_in"),
            ("sigma_in int", dict(sigma_in=lambda: torch.zeros(2, dtype=torch.int32)), "sigma_in"),
            ("sigma_in length 3", dict(sigma_in=lambda: torch.zeros(3)), "sigma_in"),
            ("seeds int32", dict(seeds=lambda: torch.arange(2, dtype=torch.int32)), "seeds"),
            ("seeds length 3", dict(seeds=lambda: torch.arange(3)), "seeds"),
            ("seeds float", dict(seeds=lambda: torch.zeros(2)), "seeds"),
            ("seeds a list", dict(seeds=lambda: [0, 1]), "seeds"),
            ("guidance NaN", dict(guidance=lambda: nan), "guidance"),
            ("guidance Inf", dict(guidance=lambda: inf), "guidance"),
            ("guidance 'x'", dict(guidance=lambda: "x"), "guidance"),
            ("guidance True", dict(guidance=lambda: True), "guidance"),
            ("guidance 2 with F of B samples", dict(guidance=lambda: 2.0), ("F", "guidance"))]

    def run_over(over, impl="cpp"):
        def fn():
            d = kb()
            for k, v in over.items():
                d[k] = v()
            fused_step(**d, impl=impl)
        return fn
    for label, over, exp in bad:
        case(G, label, label, run_over(over), expect=exp)
    case(G, "impl 'nope'", "impl='nope'", run_over({}, "nope"), expect="impl")
    case(G, "impl 'triton' on CPU", "impl='triton' without TRITON_INTERPRET", run_over({}, "triton"),
         expect=("triton",))

    def alias(impl, a, b):
        def fn():
            d = kb()
            d[a] = d[b]
            fused_step(**d, impl=impl)
        return fn
    for impl in ("cpp", "reference"):
        case(G, f"x_eval is x ({impl})", f"x_eval=x, impl={impl!r}", alias(impl, "x_eval", "x"),
             expect=("overlap", "alias", "x_eval"))
        case(G, f"x_in is F ({impl})", f"x_in=F, impl={impl!r}", alias(impl, "x_in", "F"),
             expect=("overlap", "alias", "x_in"))

    def x_in_Y(impl):
        def fn():
            d = kb()
            d["x"] = d["Y"][0]
            d["x_eval"] = d["Y"][1]
            fused_step(**d, impl=impl)
        return fn
    case(G, "x and x_eval views of Y (cpp)", "x=Y[0], x_eval=Y[1]", x_in_Y("cpp"), expect=("overlap", "alias"))
    case(G, "x read-only memmap (cpp)", "x = torch.from_numpy(np.memmap(mode='r')), stage 1 (commits x)",
         lambda: kstep("cpp", x=readonly_tensor((2, 1, 4, 4)), stage=1), expect=("writeable", "writable", "read-only", "readonly"))
    for label, kw in (("heun stage 0", {}), ("heun stage 3", dict(stage=3)), ("guidance 2", dict(_guidance=True))):
        case(G, f"valid {label}", f"C++ vs torch reference, {label}", step_vs_reference(**kw), valid=True)
    case(G, "valid impl 'reference'", "impl='reference' runs", lambda: Verdict(
        bool(torch.isfinite(kstep("reference")["x"]).all()), "finite"), valid=True)

    G = "kernels.init_state"
    bad = [("t0 NaN", dict(t0=nan), "t0"), ("t0 -1", dict(t0=-1.0), "t0"), ("t0 'abc'", dict(t0="abc"), "t0"),
           ("t0 None", dict(t0=None), "t0"), ("t0 Inf", dict(t0=inf), "t0"), ("n_init -1", dict(n_init=-1.0), "n_init"),
           ("x0 wrong shape", dict(x0=lambda a: torch.zeros(2, 1, 4, 5)), "x0"),
           ("x0 float64", dict(x0=lambda a: torch.zeros(2, 1, 4, 4, dtype=torch.float64)), "x0"),
           ("x0 is x_eval", dict(x0=lambda a: a["x_eval"]), ("x0", "overlap")), ("x None", dict(x=None), "x"),
           ("seeds int32", dict(seeds=lambda a: torch.arange(2, dtype=torch.int32)), "seeds"),
           ("table float32", dict(table=lambda a: a["table"].float()), "table")]

    def init_over(over, impl="cpp"):
        def fn():
            d = kb()
            args = dict(table=d["table"], t0=80.0, n_init=0.0, seeds=d["seeds"], x=d["x"], x_eval=d["x_eval"],
                        x_in=d["x_in"], sigma_in=d["sigma_in"], x0=None)
            for k, v in over.items():
                args[k] = v(args) if callable(v) else v
            init_state(**args, impl=impl)
            return args
        return fn
    for label, over, exp in bad:
        case(G, label, label, init_over(over), expect=exp)

    def init_cmp(**over):
        def fn():
            a = init_over(over, "cpp")()
            b = init_over(over, "reference")()
            err = max(float((a[k] - b[k]).abs().max()) for k in ("x", "x_eval", "x_in", "sigma_in"))
            return Verdict(err <= 1e-5, f"max |C++ - reference| {err:.3g}")
        return fn
    case(G, "valid", "C++ vs reference", init_cmp(), valid=True)
    case(G, "valid churn", "n_init=0.5, C++ vs reference", init_cmp(n_init=0.5), valid=True)

    def x0_is_x(impl):
        d = kb()
        x0 = d["x"].clone()
        init_state(d["table"], 80.0, 0.0, d["seeds"], d["x"], d["x_eval"], d["x_in"], d["sigma_in"], impl=impl, x0=d["x"])
        return Verdict(bool(torch.equal(d["x"], x0) and torch.equal(d["x_eval"], x0)), "x kept, x_eval = x")
    case(G, "x0 is x", "x0=x (documented as allowed)", lambda: x0_is_x("cpp"), valid=True)

    G = "kernels.Stepper"
    bad = [("x None", lambda: kstepper(x=None), "x"), ("guidance 'x'", lambda: kstepper(guidance="x"), "guidance"),
           ("f_dtype int", lambda: Stepper(**{k: v for k, v in kb().items() if k not in ("F", "stage")}, f_dtype=torch.int32,
                                           impl="cpp"), ("F", "f_dtype")),
           ("call with stage -1", lambda: kstepper()(-1, kb()["F"]), "stage"),
           ("call with stage 5", lambda: kstepper()(5, kb()["F"]), "stage"),
           ("call with stage True", lambda: kstepper()(True, kb()["F"]), "stage"),
           ("call with stage 1.5", lambda: kstepper()(1.5, kb()["F"]), "stage must"),
           ("call with stage None", lambda: kstepper()(None, kb()["F"]), "stage must"),
           ("call with F float64", lambda: kstepper()(0, kb()["F"].double()), "F"),
           ("call with F non-contiguous", lambda: kstepper()(0, kb()["F"].transpose(2, 3)), "F"),
           ("call with F a numpy array", lambda: kstepper()(0, kb()["F"].numpy()), "F"),
           ("call with F = x_in", lambda: (lambda st: st(0, st.x_in))(kstepper()), ("overlap", "F"))]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)

    def stepper_ok():
        st = kstepper()
        d = kb()
        st(0, d["F"])
        ref = kstep("reference")
        err = float((st.x_eval - ref["x_eval"]).abs().max())
        return Verdict(err <= 1e-5, f"max |Stepper - reference| {err:.3g}")
    case(G, "valid", "Stepper(...)(0, F) vs fused_step reference", stepper_ok, valid=True)


def nb(B=2):
    d = kb(B)
    out = {k: (v.numpy().copy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    out["batch"] = B
    out["guidance"] = nan
    return out


def core_step(**over):
    d = nb()
    for k, v in over.items():
        d[k] = v(d) if callable(v) else v
    _core.fused_step(**d)
    return d


def define_core():
    G = "_core.fused_step"
    ro = lambda a: (a.setflags(write=False), a)[1]  # noqa: E731
    bad = [("table float32", dict(table=lambda d: d["table"].astype(np.float32)), "table"),
           ("table without b columns", dict(table=lambda d: np.ascontiguousarray(d["table"][:, :FIXED])), "table"),
           ("table 3-D", dict(table=lambda d: d["table"][None]), "table"),
           ("table Fortran order", dict(table=lambda d: np.asfortranarray(d["table"])), "table"),
           ("table 17 history columns", dict(table=lambda d: np.zeros((5, FIXED + 17))), "table"),
           ("stage -1", dict(stage=-1), "stage"), ("stage 5", dict(stage=5), "stage"), ("stage 2**40", dict(stage=2 ** 40), "stage"),
           ("batch 0", dict(batch=0), "batch"), ("batch -1", dict(batch=-1), "batch"), ("batch 3", dict(batch=3), ("batch", "x")),
           ("guidance Inf", dict(guidance=inf), "guidance"),
           ("x read-only", dict(x=lambda d: ro(d["x"])), "x must"), ("x_eval read-only", dict(x_eval=lambda d: ro(d["x_eval"])), "x_eval"),
           ("Y read-only", dict(Y=lambda d: ro(d["Y"])), "Y must"),
           ("x non-contiguous", dict(x=lambda d: np.zeros((2, 1, 4, 8), np.float32)[..., ::2]), "x must"),
           ("x misaligned", dict(x=lambda d: np.frombuffer(bytearray(2 * 16 * 4 + 1), np.float32, 32, 1).reshape(2, 1, 4, 4)),
            ("aligned", "x must")),
           ("x 0-d", dict(x=lambda d: np.zeros((), np.float32)), "x must"),
           ("x no elements per sample", dict(x=lambda d: np.zeros((2, 0), np.float32)), "x must"),
           ("x a list", dict(x=lambda d: d["x"].tolist()), "x must"),
           ("x None", dict(x=None), "x must"),
           ("F float64", dict(F=lambda d: d["F"].astype(np.float64)), "F must"),
           ("Y wrong shape", dict(Y=lambda d: np.zeros((1, 2, 1, 4, 4), np.float32)), "Y must"),
           ("x_in is x_eval", dict(x_in=lambda d: d["x_eval"]), "overlap"),
           ("sigma_in inside seeds", dict(sigma_in=lambda d: d["seeds"].view(np.float32)[:2]), "overlap"),
           ("Y overlaps x", dict(x=lambda d: d["Y"][0]), "overlap"),
           ("F is x_in (read while written)", dict(F=lambda d: d["x_in"]), "overlap")]
    for label, over, exp in bad:
        case(G, label, label, lambda over=over: core_step(**over), expect=exp)

    def valid():
        a = core_step()
        b = kstep("reference")
        err = max(float(np.abs(a[k] - b[k].numpy()).max()) for k in ("x", "x_eval", "Y", "x_in", "sigma_in"))
        return Verdict(err <= 1e-5, f"max |core - reference| {err:.3g}")
    case(G, "valid", "direct call vs torch reference", valid, valid=True)

    def tiny():
        d = nb()
        d["table"] = np.zeros((1, FIXED + 1))
        d["table"][0, 9] = 1.0  # commit
        d["Y"] = np.zeros((1, 2, 1, 4, 4), np.float32)
        _core.fused_step(**d)
        ok = np.all(d["x"] == 0) and np.all(np.isfinite(d["x_in"]))
        return Verdict(bool(ok), "all-zero one-stage table: x = 0")
    case(G, "tiny table (1 stage, K=1)", "a (1, FIXED + 1) all-zero table", tiny, valid=True)

    G = "_core.init_state"

    def core_init(**over):
        d = nb()
        args = dict(table=d["table"], t0=80.0, n_init=0.0, seeds=d["seeds"], x=d["x"], x_eval=d["x_eval"], x_in=d["x_in"],
                    sigma_in=d["sigma_in"], batch=2, x0=None)
        for k, v in over.items():
            args[k] = v(args) if callable(v) else v
        _core.init_state(**args)
        return args
    bad = [("t0 NaN", dict(t0=nan), "t0"), ("n_init -1", dict(n_init=-1.0), "n_init"),
           ("x0 wrong shape", dict(x0=np.zeros((2, 1, 4, 5), np.float32)), "x0"),
           ("x0 is x_eval", dict(x0=lambda a: a["x_eval"]), ("x0", "overlap")),
           ("x0 read-only float64", dict(x0=np.zeros((2, 1, 4, 4))), "x0"),
           ("x_in batch 3", dict(x_in=np.zeros((3, 1, 4, 4), np.float32)), "x_in"),
           ("seeds int32", dict(seeds=np.arange(2, dtype=np.int32)), "seeds")]
    for label, over, exp in bad:
        case(G, label, label, lambda over=over: core_init(**over), expect=exp)

    def init_valid():
        a = core_init()
        b = kinit("reference")
        err = max(float(np.abs(a[k] - b[k].numpy()).max()) for k in ("x", "x_eval", "x_in", "sigma_in"))
        return Verdict(err <= 1e-5, f"max |core - reference| {err:.3g}")
    case(G, "valid", "direct call vs torch reference", init_valid, valid=True)
    case(G, "x0 is x", "x0 = x itself", lambda: Verdict(True, "ran") if core_init(x0=lambda a: a["x"]) else None, valid=True)

    G = "_core.randn"

    def rn(seeds=None, stream=3, out=None, batch=2):
        seeds = np.arange(2, dtype=np.int64) if seeds is None else seeds
        out = np.zeros((2, 16), np.float32) if out is None else out
        _core.randn(seeds, stream, out, batch)
        return out
    bad = [("stream -1", lambda: rn(stream=-1), "stream"), ("stream 2**32", lambda: rn(stream=2 ** 32), "stream"),
           ("batch 0", lambda: rn(batch=0), "batch"), ("batch 3", lambda: rn(batch=3), ("batch", "out")),
           ("out float64", lambda: rn(out=np.zeros((2, 16))), "out"),
           ("out read-only", lambda: rn(out=(lambda a: (a.setflags(write=False), a)[1])(np.zeros((2, 16), np.float32))), "out"),
           ("out non-contiguous", lambda: rn(out=np.zeros((2, 32), np.float32)[:, ::2]), "out"),
           ("out no elements per sample", lambda: rn(out=np.zeros((2, 0), np.float32)), "out"),
           ("seeds int32", lambda: rn(seeds=np.arange(2, dtype=np.int32)), "seeds"),
           ("seeds length 3", lambda: rn(seeds=np.arange(3)), "seeds"),
           ("out overlaps seeds", lambda: (lambda s: rn(seeds=s, out=s.view(np.float32).reshape(2, 2)))(np.arange(2)),
            "overlap"),
           ("stream a float", lambda: rn(stream=1.5), "stream must")]
    for label, fn, exp in bad:
        case(G, label, label, fn, expect=exp)

    def randn_valid():
        from edmrt.kernels.philox import philox_normal
        a = rn()
        b = philox_normal(torch.arange(2), 3, (16,)).numpy()
        err = float(np.abs(a - b).max())
        return Verdict(err <= 1e-6, f"max |randn - philox_normal| {err:.3g} (float32 rounding allowed)")
    case(G, "valid", "randn vs philox_normal", randn_valid, valid=True)
    case(G, "seeds a list", "seeds=[0, 1] (not an array)", lambda: rn(seeds=[0, 1]), expect="seeds must")

    G = "_core.philox"
    for label, args, exp in (("c0 -1", (-1, 0, 0, 0, 0, 0), "c0"), ("k1 2**32", (0, 0, 0, 0, 0, 2 ** 32), "k1"),
                             ("c3 1.5", (0, 0, 0, 1.5, 0, 0), "c3 must")):
        case(G, label, f"philox{args}", lambda args=args: _core.philox(*args), expect=exp)
    case(G, "valid", "philox(0, 0, 0, 0, 0, 0): Random123's known answer",
         lambda: Verdict(list(_core.philox(0, 0, 0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                         "known answer"), valid=True)


# ============================================================================ the command line

def cli(*args, shell=None, check=None, prepare=None, env=None):
    def run():
        if prepare is not None:
            prepare()
        cmd = [sys.executable, "-m", "edmrt.cli", *[str(a) for a in args]] if shell is None else ["bash", "-c", shell()]
        e = dict(os.environ, **(env or {}))
        try:
            p = subprocess.run(cmd, cwd=WORK / "cwd", capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                               stdin=subprocess.DEVNULL, env=e)
        except subprocess.TimeoutExpired as exc:
            return CLIResult(None, exc.stdout or "", exc.stderr or "", timed_out=True)
        r = CLIResult(p.returncode, p.stdout, p.stderr)
        if check is not None:
            out = check(r)
            if isinstance(out, str):   # a problem that makes the case wrong whatever the status
                r.bad = out
            elif out is not None:
                r.ok, r.detail = out
        return r
    return run


def evil_checkpoint() -> Path:
    """A train checkpoint folder whose optimizer.pt pickles os.system (runs `touch MARKER` if unpickled)."""
    from safetensors.torch import save_file

    d = WORK / "evil-ckpt"
    d.mkdir(exist_ok=True)
    (d / "state.json").write_text(json.dumps({"format": "edmrt-train-checkpoint-1", "step": 1, "options": {},
                                              "losses": [], "seconds": 0}))
    save_file({"rng": torch.zeros(8, dtype=torch.uint8)}, str(d / "model.safetensors"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {WORK / 'PWNED'}",))
    torch.save({"state": {0: Evil()}, "param_groups": []}, d / "optimizer.pt")
    return d


def define_cli():
    G = "cli"
    W = lambda p: str(WORK / p)  # noqa: E731
    py = sys.executable

    def png(name):
        def check(r):
            p = WORK / name
            ok = p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
            return ok, "PNG written" if ok else "no PNG"
        return check
    valid = [
        ("top --help", ("--help",), None),
        ("sample --help", ("sample", "--help"), None),
        ("solvers", ("solvers",), None),
        ("plan heun --steps 2", ("plan", "heun", "--steps", "2"), lambda r: ("plan heun" in r.stdout, "table printed")),
        ("plan --json", ("plan", "heun", "--steps", "3", "--json", W("p.json")),
         lambda r: (edmrt.Plan.load(W("p.json")) == edmrt.plan("heun", edmrt.make_sigmas("karras", 3)), "JSON equals the plan")),
        ("sample digits-cd torch", ("sample", "--model", "digits-cd", "--backend", "torch", "--seeds", "0-3", "-o",
                                    W("cd.png")), png("cd.png")),
        ("sample gmm", ("sample", "--model", "gmm", "--batch", "8", "--steps", "5"), lambda r: ("RMSE" in r.stdout, "RMSE printed")),
    ]
    for label, args, check in valid:
        case(G, label, "edmrt " + " ".join(args), cli(*args, check=check), valid=True, cli=True)
    case(G, "plan heun | head -1", "edmrt plan heun | head -1 (reader closes the pipe)",
         cli(shell=lambda: f"{py} -m edmrt.cli plan heun --steps 200 | head -1; exit ${{PIPESTATUS[0]}}",
             check=lambda r: (r.stdout.startswith("plan heun") and r.stderr == "", "first line only, quiet stderr")),
         valid=True, cli=True)
    bad = [
        ("no arguments", (), ("command", "required")),
        ("unknown sub-command", ("nope",), ("nope", "invalid choice")),
        ("unknown flag", ("sample", "--nope"), ("--nope", "unrecognized")),
        ("-o in a missing folder", ("sample", "-o", "/missing/dir/x.png"), ("/missing/dir", "-o")),
        ("-o a folder", ("sample", "-o", "/tmp"), ("folder", "-o")),
        ("--guidance -5", ("sample", "--guidance", "-5"), ("guidance",)),
        ("--guidance nan", ("sample", "--guidance", "nan"), ("guidance",)),
        ("--guidance abc", ("sample", "--guidance", "abc"), ("guidance",)),
        ("--seeds 1.5", ("sample", "--seeds", "1.5"), ("--seeds",)),
        ("--seeds -3", ("sample", "--seeds", "-3"), ("--seeds",)),
        ("--seeds 5-1", ("sample", "--seeds", "5-1"), ("--seeds",)),
        ("--seeds ''", ("sample", "--seeds", ""), ("--seeds",)),
        ("--seeds 0-10**12", ("sample", "--seeds", "0-1000000000000"), ("--seeds",)),
        ("--seeds 2**63", ("sample", "--model", "digits-cd", "--backend", "torch", "--seeds", str(2 ** 63)), ("seeds",)),
        ("--class 99", ("sample", "--class", "99"), ("--class",)),
        ("--class -1", ("sample", "--class", "-1"), ("--class",)),
        ("--class 3.5", ("sample", "--class", "3.5"), ("--class",)),
        ("--onnx /dev/null", ("sample", "--onnx", "/dev/null", "-o", W("x.png")), ("onnx", "/dev/null")),
        ("--onnx missing file", ("sample", "--onnx", W("missing.onnx"), "-o", W("x.png")), ("onnx", "missing.onnx")),
        ("--onnx x --backend torch", ("sample", "--onnx", "x", "--backend", "torch"), ("--onnx",)),
        ("--backend nope", ("sample", "--backend", "nope", "-o", W("x.png")), ("backend",)),
        ("--steps 0", ("sample", "--steps", "0", "--backend", "torch", "-o", W("x.png")), ("steps",)),
        ("--steps 10**7", ("sample", "--steps", "10000000", "--backend", "torch", "-o", W("x.png")), ("steps",)),
        ("--solver nope", ("sample", "--solver", "nope", "--backend", "torch", "-o", W("x.png")), ("solver",)),
        ("--model nope", ("sample", "--model", "nope"), ("model",)),
        ("--model gmm --onnx", ("sample", "--model", "gmm", "--onnx", "x.onnx"), ("onnx",)),
        ("-O S_churn=abc", ("sample", "--solver", "edm", "-O", "S_churn=abc", "--backend", "torch", "-o", W("x.png")),
         ("S_churn", "--option")),
        ("-O without =", ("plan", "edm", "-O", "S_churn"), ("--option", "NAME=VALUE")),
        ("--max-batch 0", ("sample", "--max-batch", "0"), ("--max-batch",)),
        ("quality --nfe 0", ("quality", "--nfe", "0"), ("--nfe",)),
        ("quality --samples 1", ("quality", "--samples", "1", "-o", W("q")), ("--samples",)),
        ("quality --solvers nope", ("quality", "--solvers", "nope", "-o", W("q")), ("nope", "solver")),
        ("quality --model nope", ("quality", "--model", "nope", "-o", W("q")), ("--model", "model")),
        ("plan nope", ("plan", "nope"), ("solver", "nope")),
        ("plan heun --steps 0", ("plan", "heun", "--steps", "0"), ("steps",)),
        ("plan heun --steps 10**7", ("plan", "heun", "--steps", "10000000"), ("steps",)),
        ("plan heun -O foo=1", ("plan", "heun", "-O", "foo=1"), ("foo",)),
        ("plan --precond nope", ("plan", "heun", "--precond", "nope"), ("--precond", "invalid choice")),
        ("plan --json in a missing folder", ("plan", "heun", "--json", "/missing/dir/p.json"), ("/missing/dir", "--json")),
        ("plan --sigma-max 1e300", ("plan", "heun", "--sigma-max", "1e300"), ("sigma_max", "sigma-max")),
        ("train --resume missing", ("train", "--resume", W("no-ckpt"), "--iters", "1", "--quiet"), ("resume", "no-ckpt")),
        ("export onnx --weights not safetensors", ("export", "onnx", "--model-config", "tiny", "--weights",
                                                   W("weights.txt"), "-o", W("x.onnx")), ("safetensors", "weights")),
        ("export onnx --model with --weights", ("export", "onnx", "--model", "digits", "--weights", W("weights.txt")),
         ("--weights",)),
        ("export onnx --batch 1", ("export", "onnx", "--model-config", "tiny", "--batch", "1", "-o", W("y.onnx")),
         ("--batch", "batch")),
        ("export tensorrt /dev/null", ("export", "tensorrt", "/dev/null"), ("onnx", "/dev/null")),
        ("export tensorrt garbage file", ("export", "tensorrt", W("weights.txt")), ("onnx",)),
        ("export nope", ("export", "nope"), ("nope", "invalid choice")),
        ("metrics --evaluate nope", ("metrics", "--evaluate", "nope"), ("nope", "model")),
        ("distill --iters 0", ("distill", "--iters", "0"), ("--iters",)),
        ("-v with a bad argument", ("-v", "sample", "--guidance", "-5"), ("guidance",)),
    ]
    prep = lambda: (WORK / "weights.txt").write_text("not safetensors\n")  # noqa: E731
    for label, args, exp in bad:
        case(G, label, "edmrt " + " ".join(args), cli(*args, prepare=prep), expect=exp, cli=True)
    case(G, "train --resume pickled class", "edmrt train --resume <folder whose optimizer.pt pickles os.system>",
         cli("train", "--resume", W("evil-ckpt"), "--iters", "1", "--quiet", prepare=evil_checkpoint,
             check=lambda r: "optimizer.pt was unpickled: os.system ran" if (WORK / "PWNED").exists() else None),
         expect=("resume",), cli=True)


# ============================================================================ running and classifying one case

def first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:300]


def matches(case_: Case, text: str) -> bool:
    """Whether ``text`` contains one of the case's expected substrings.  An identifier (``x``, ``F``, ``eta``,
    ``step``) must stand as a whole word (``x`` does not match ``x_eval``, ``eta`` not ``beta``); identifiers of one or
    two characters are case-sensitive (``F`` does not match "of"); anything else is a case-insensitive substring."""
    for want in case_.expect:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", want):
            flags = 0 if len(want) <= 2 else re.IGNORECASE
            if re.search(rf"(?<![A-Za-z0-9_]){re.escape(want)}(?![A-Za-z0-9_])", text, flags):
                return True
        elif want.lower() in text.lower():
            return True
    return False


def classify_cli(c: Case, r: CLIResult) -> tuple[str, str]:
    err_lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    msg = first_line(r.stderr) or first_line(r.stdout)
    status = f"exit {r.rc}, {len(err_lines)} stderr line(s)"
    if r.bad:
        return SILENT, f"{r.bad} ({status})"
    if r.timed_out:
        return HANG, f"no answer in {CLI_TIMEOUT_S:.0f} s"
    if r.rc is not None and r.rc < 0:
        return CRASH, f"killed by {signal.Signals(-r.rc).name} ({msg})"
    tb = "Traceback" in r.stderr
    if c.valid:
        if r.rc == 0 and not tb:
            return (ACCEPTED, r.detail or status) if r.ok else (SILENT, f"{r.detail} ({status})")
        return UNCLEAR, f"refused a valid input ({status}): {msg}"
    if r.rc == 2 and len(err_lines) == 1 and not tb and matches(c, r.stderr):
        return CLEAN, msg
    if r.rc == 0:
        return SILENT, f"exit 0 for an invalid input: {first_line(r.stdout)}"
    why = "traceback" if tb else f"{len(err_lines)} stderr lines" if len(err_lines) != 1 else \
        f"exit {r.rc}" if r.rc != 2 else "no expected substring"
    return UNCLEAR, f"[{why}; exit {r.rc}] " + (" | ".join(err_lines[-2:]) if len(err_lines) > 1 else msg)[:300]


def run_case(c: Case) -> tuple[str, str]:
    try:
        out = c.fn()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036 - a probe records every kind of failure (SystemExit too)
        text = f"{type(exc).__name__}: {exc}"
        msg = f"{type(exc).__name__}: {first_line(str(exc)) or '(no message)'}"
        if c.valid:
            return UNCLEAR, f"refused a valid input: {msg}"
        if c.propagate is not None and isinstance(exc, c.propagate) and matches(c, text):
            return CLEAN, f"propagated unchanged: {msg}"
        if isinstance(exc, CLEAN_TYPES) and matches(c, str(exc)):
            return CLEAN, msg
        return UNCLEAR, msg
    if c.cli:
        return classify_cli(c, out)
    if not c.valid:
        return SILENT, f"returned {describe(out)} for an invalid input"
    if isinstance(out, Verdict):
        ok, detail = out.ok, out.detail
    elif c.check is not None:
        ok, detail = c.check(out)
    elif isinstance(out, torch.Tensor):
        ok = bool(torch.isfinite(out).all())
        detail = "finite" if ok else "holds NaN or Inf"
    else:
        ok, detail = True, f"returned {describe(out)}"
    return (ACCEPTED if ok else SILENT), detail


def build_cases() -> list[Case]:
    if not CASES:
        for define in (define_solve, define_plan, define_json, define_sampler, define_model, define_load, define_kernels,
                       define_core, define_cli):
            define()
        ids = [c.id for c in CASES]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise AssertionError(f"duplicate case ids: {sorted(dup)}")
    return CASES


def worker(workdir: str) -> None:
    """Run the case indices given on stdin, one after another; report START and RESULT lines on the original stdout."""
    global WORK
    WORK = Path(workdir)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(WORK / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    import warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cases = build_cases()
    for i in json.loads(sys.stdin.readline()):
        proto.write(f"START {i}\n")
        t0 = time.perf_counter()
        got, msg = run_case(cases[i])
        proto.write("RESULT " + json.dumps({"i": i, "got": got, "message": msg,
                                            "seconds": round(time.perf_counter() - t0, 3)}) + "\n")


# ============================================================================ the parent: workers, results, report

def limit_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.setsid()


def run_all(indices: list[int], workdir: Path, progress: bool = True) -> dict[int, dict]:
    results: dict[int, dict] = {}
    pending = list(indices)
    env = dict(os.environ, OMP_NUM_THREADS="1", EDMRT_CACHE=str(workdir / "cache"), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cases = build_cases()

    def report(i):
        if progress:
            r = results[i]
            mark = "" if r["got"] in (CLEAN, ACCEPTED) else f"  <-- {r['message'][:100]}"
            print(f"[{len(results):3d}/{len(indices)}] {r['got']:13s} {r['seconds']:6.2f}s {cases[i].id}{mark}", flush=True)

    while pending:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=workdir / "cwd",
                             preexec_fn=limit_memory)
        p.stdin.write((json.dumps(pending) + "\n").encode())
        p.stdin.close()
        current, started = None, time.monotonic()
        while pending:
            wait = CASE_TIMEOUT_S - (time.monotonic() - started) + (60.0 if current is None else 0.0)
            ready, _, _ = select.select([p.stdout], [], [], max(wait, 0.0))
            if not ready:   # a hang: kill the worker's whole session (it and what it started)
                i = current if current is not None else pending[0]
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                results[i] = {"got": HANG, "message": f"no answer in {CASE_TIMEOUT_S:.0f} s (worker killed)",
                              "seconds": round(time.monotonic() - started, 1)}
                pending.remove(i)
                report(i)
                break
            line = p.stdout.readline().decode()
            if not line:    # the worker died
                rc = p.wait()
                i = current if current is not None else pending[0]
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                results[i] = {"got": CRASH, "message": f"worker died: {how}",
                              "seconds": round(time.monotonic() - started, 1)}
                pending.remove(i)
                report(i)
                break
            kind, _, rest = line.strip().partition(" ")
            if kind == "START":
                current, started = int(rest), time.monotonic()
            elif kind == "RESULT":
                r = json.loads(rest)
                i = r.pop("i")
                results[i] = r
                pending.remove(i)
                current, started = None, time.monotonic()
                report(i)
        else:
            p.wait()
            break
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return results


def source_info() -> dict:
    """Which edmrt was probed: where it was imported from, the repository's commit, and whether the imported tree is
    that commit's (an editable install of this checkout with engine/, kernels/, export/ and cpp/ unmodified)."""
    root = HERE.parent
    where = Path(edmrt.__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "HEAD")
    if where == root / "engine" / "src":
        dirty = git("status", "--porcelain", "--", "engine", "kernels", "export", "cpp")
        state = "this checkout, unmodified" if not dirty else "this checkout, with uncommitted changes"
    else:
        state = f"imported from {where} (not this checkout)"
    return {"edmrt_from": str(where), "commit": commit, "source": f"{commit[:10]}: {state}"}


def write_report(rows: list[dict], meta: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(exist_ok=True)
    jpath, mpath = RESULTS / "probe_inputs.json", RESULTS / "probe_inputs.md"
    counts = {k: sum(r["got"] == k for r in rows) for k in CLASSES}
    jpath.write_text(json.dumps({**meta, "counts": counts, "cases": rows}, indent=1) + "\n")
    groups = list(dict.fromkeys(r["group"] for r in rows))
    md = ["# Input probe: how edmrt answers bad and edge-case inputs", "",
          f"`python benchmarks/probe_inputs.py` on {meta['machine']}, {meta['date']}, torch {meta['torch']}, "
          f"Python {meta['python']}; {len(rows)} cases in {meta['total_seconds']:.0f} s "
          f"(each in a worker process, {CASE_TIMEOUT_S:.0f} s per case, 4 GiB address-space limit). "
          f"edmrt probed: {meta['source']}.", "",
          f"Inputs tried: **{len(rows)}** ({sum(r['valid'] for r in rows)} valid, "
          f"{sum(not r['valid'] for r in rows)} invalid). " + ", ".join(f"{k}: **{v}**" for k, v in counts.items()) + ".", "",
          "Classes: *clean error* = ValueError / TypeError / FloatingPointError naming the argument or problem (CLI: exit 2, "
          "one stderr line, no traceback); *accepted* = a valid input returned a finite result equal to a cheap reference; "
          "*unclear error* = another exception type, a message without the argument's name, a CLI traceback or other exit "
          "status, or a valid input refused; *silent wrong* = an invalid input returned, or a valid one returned a wrong "
          "result; *crash* / *hang*.", "",
          "| group | cases | " + " | ".join(CLASSES) + " |", "|---|---|" + "---|" * len(CLASSES)]
    for g in groups:
        rs = [r for r in rows if r["group"] == g]
        md.append(f"| {g} | {len(rs)} | " + " | ".join(str(sum(r['got'] == k for r in rs) or "") for k in CLASSES) + " |")
    md.append("| **all** | " + f"{len(rows)} | " + " | ".join(f"**{counts[k]}**" for k in CLASSES) + " |")
    bad = [r for r in rows if r["got"] not in (CLEAN, ACCEPTED)]
    md += ["", f"## The {len(bad)} cases that are neither a clean error nor an accepted valid input", "",
           "| group | case | input | expected | got | message |", "|---|---|---|---|---|---|"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for r in bad:
        md.append(f"| {esc(r['group'])} | {esc(r['description'])} | {esc(r['input'])} | {r['expected']} | **{r['got']}** | "
                  f"{esc(r['message'])} |")
    mpath.write_text("\n".join(md) + "\n")
    return jpath, mpath


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--only", metavar="PREFIX", help="run the cases whose group starts with PREFIX; writes no files")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    global WORK
    workdir = WORK = Path(tempfile.mkdtemp(prefix="edmrt-probe-"))
    (workdir / "cwd").mkdir()
    cases = build_cases()
    if args.list:
        shutil.rmtree(workdir, ignore_errors=True)
        for c in cases:
            print(f"{'valid  ' if c.valid else 'invalid'} {c.id}: {c.summary}")
        print(f"{len(cases)} cases")
        return 0
    indices = [i for i, c in enumerate(cases) if args.only is None or c.group.startswith(args.only)]
    from edmrt.lab.common import machine_name

    t0 = time.perf_counter()
    try:
        results = run_all(indices, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - t0
    rows = []
    for i in indices:
        c, r = cases[i], results[i]
        rows.append({"group": c.group, "description": c.name, "input": c.summary.replace(str(workdir), "<work>"),
                     "valid": c.valid,
                     "expected": ACCEPTED if c.valid else CLEAN, "expect_substrings": list(c.expect), "got": r["got"],
                     "message": r["message"], "seconds": r["seconds"]})
    counts = {k: sum(r["got"] == k for r in rows) for k in CLASSES}
    print(f"\n{len(rows)} inputs in {total:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.only is None:
        meta = {**source_info(), "machine": machine_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__, "python": platform.python_version(), "edmrt": edmrt.__version__,
                "total_seconds": round(total, 1), "case_timeout_s": CASE_TIMEOUT_S, "memory_limit_bytes": MEMORY_LIMIT}
        for p in write_report(rows, meta):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
