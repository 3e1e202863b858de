"""The coefficient plan: a sampler, decided once on the host in float64.

Stage ``s`` of a plan is one network evaluation (docs/ARCHITECTURE.md; ``edmrt.kernels.reference`` executes it)::

    x_in  = c_in[s] * x_eval
    F     = net(x_in, c_noise[s])
    D     = c_skip[s] * x_eval + c_out[s] * F
    Y[s]  = alpha[s] * x_eval + beta[s] * D
    x_new = a[s] * x + e[s] * x_eval + sum_k b[s, k] * Y[s - k] + n[s] * eps[s + 1]
    x_eval = x_new;  if commit[s]: x = x_new

before stage 0: ``x = x_init + n_init * eps[0]`` (churn on the first step), ``x_eval = x``.
Noise stream ``eps[0]`` belongs to the start, ``eps[s + 1]`` to stage ``s``.

A plan runs down its schedule (sampling: t_0 > ... > t_N >= 0) or up it (an inversion: 0 < t_0 < ... < t_N, from an
image to noise: ``direction``); the stage equations are the same, with steps of the other sign.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .schedules import check_sigmas

__all__ = ["Plan", "PLAN_FORMAT", "PLAN_VERSION", "MAX_HISTORY"]

PLAN_FORMAT = "edmrt.plan"
PLAN_VERSION = 1

_STAGE_FIELDS = ("sigma", "c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e", "n")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


MAX_HISTORY = 16     # history entries a stage may combine (the kernels' table allows K <= 16)
_MAX_DEPTH = 64      # nesting of a plan's JSON (options hold flat values)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_json_types(d: dict) -> None:
    """The JSON types of a plan's fields, before any conversion: numbers where numbers belong (no numeric strings, no
    booleans, no integers beyond float64), arrays where arrays belong, strings without lone surrogates."""
    def fail(name, want):
        raise ValueError(f"plan JSON field {name!r} must be {want}, got {type(d[name]).__name__}")

    if not _number(d["version"]):  # JSON has one number type: 1 and 1.0 are the same version
        fail("version", "a number")
    if not isinstance(d["solver"], str):
        fail("solver", "a string")
    for name in _STAGE_FIELDS + ("sigmas",):
        if not isinstance(d[name], list):
            fail(name, "an array")
        if not all(_number(v) for v in d[name]):
            raise ValueError(f"plan JSON field {name!r} must hold numbers")
    if not isinstance(d["b"], list) or not all(isinstance(r, list) and all(_number(v) for v in r) for r in d["b"]):
        raise ValueError("plan JSON field 'b' must be an array of arrays of numbers")
    if len({len(r) for r in d["b"]}) > 1:
        raise ValueError("plan JSON field 'b' is ragged: every row must have K entries")
    if not isinstance(d["step"], list) or not all(_number(v) and 0 <= v <= 2 ** 53 and float(v).is_integer()
                                                  for v in d["step"]):
        raise ValueError("plan JSON field 'step' must hold integers in [0, 2**53]")
    if not isinstance(d["commit"], list) or not all(isinstance(v, bool) or v in (0, 1) for v in d["commit"]):
        raise ValueError("plan JSON field 'commit' must hold booleans")
    if "n_init" in d and not _number(d["n_init"]):
        fail("n_init", "a number")
    for name in ("precond", "options"):
        if name in d and not isinstance(d[name], dict):
            fail(name, "an object")
    try:
        json.dumps(d, allow_nan=True, ensure_ascii=False).encode("utf-8")   # lone surrogates cannot be encoded
        for name in _STAGE_FIELDS + ("sigmas", "n_init"):
            [float(v) for v in (d[name] if isinstance(d.get(name), list) else [d.get(name, 0.0)])]
    except UnicodeEncodeError:
        raise ValueError("plan JSON holds a string with a lone surrogate (not valid UTF-8)") from None
    except OverflowError:
        raise ValueError("plan JSON holds a number out of range for float64") from None
    except RecursionError:
        raise ValueError(f"plan JSON nests deeper than {_MAX_DEPTH}") from None
    if _depth(d) > _MAX_DEPTH:
        raise ValueError(f"plan JSON nests deeper than {_MAX_DEPTH}")


def _depth(v, level: int = 1) -> int:
    if level > _MAX_DEPTH + 1:
        return level
    if isinstance(v, dict):
        return max([_depth(x, level + 1) for x in v.values()], default=level)
    if isinstance(v, list):
        return max([_depth(x, level + 1) for x in v], default=level)
    return level


@dataclass(frozen=True)
class Plan:
    """A sampler as per-stage float64 coefficients (see the module docstring for the update).

    Arrays are length ``S`` (stages = network evaluations) except ``b`` (``S x K``, K = history
    depth) and ``sigmas`` (the schedule, ``N + 1`` levels ending in 0).  Construction validates
    every array and makes it read-only.
    """

    solver: str
    sigmas: np.ndarray
    step: np.ndarray
    sigma: np.ndarray
    c_in: np.ndarray
    c_noise: np.ndarray
    c_skip: np.ndarray
    c_out: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    a: np.ndarray
    e: np.ndarray
    b: np.ndarray
    n: np.ndarray
    commit: np.ndarray
    n_init: float = 0.0
    precond: dict = field(default_factory=lambda: {"name": "identity"})
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.solver, str) or not self.solver:
            raise ValueError(f"solver must be a non-empty string, got {self.solver!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("sigmas", _readonly(check_sigmas(self.sigmas, "Plan.sigmas")))
        S = None
        for name in _STAGE_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"Plan.{name} must be 1-D (one value per stage), got shape {arr.shape}")
            S = arr.shape[0] if S is None else S
            if arr.shape != (S,):
                raise ValueError(f"Plan.{name} must have shape ({S},) like Plan.sigma, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Plan.{name} must be finite, got {arr.tolist()}")
            set_(name, _readonly(arr))
        if S < 1:
            raise ValueError("a Plan must have at least one stage (network evaluation)")
        b = np.asarray(self.b, dtype=np.float64)
        if b.ndim != 2 or b.shape[0] != S or not 1 <= b.shape[1] <= MAX_HISTORY:
            raise ValueError(f"Plan.b must have shape ({S}, K) with 1 <= K <= {MAX_HISTORY}, got {b.shape}")
        if not np.all(np.isfinite(b)):
            raise ValueError("Plan.b must be finite")
        for s in range(min(S, b.shape[1])):
            if np.any(b[s, s + 1:] != 0.0):
                raise ValueError(f"Plan.b[{s}] refers to history before stage 0: b[{s}, k] must be 0 for k > {s}")
        set_("b", _readonly(b))
        step = np.asarray(self.step)
        if step.shape != (S,) or not np.issubdtype(step.dtype, np.integer) and not np.all(step == np.round(step)):
            raise ValueError(f"Plan.step must be {S} integers, got {step!r}")
        step = step.astype(np.int64)
        if np.any(step < 0) or np.any(np.diff(step) < 0) or step[-1] >= self.sigmas.size - 1:
            raise ValueError(f"Plan.step must be non-decreasing in [0, {self.sigmas.size - 2}], got {step.tolist()}")
        set_("step", _readonly(step))
        commit = np.asarray(self.commit)
        if commit.shape != (S,) or not np.all((commit == 0) | (commit == 1)):
            raise ValueError(f"Plan.commit must be {S} booleans, got {commit!r}")
        commit = commit.astype(bool)
        if not commit[-1]:
            raise ValueError("Plan.commit[-1] must be True: the last stage must commit its result")
        set_("commit", _readonly(commit))
        if np.any(self.sigma <= 0.0):
            raise ValueError(f"Plan.sigma must be > 0 at every network evaluation, got {self.sigma.tolist()}")
        if np.any(self.n < 0.0):
            raise ValueError(f"Plan.n (noise scales) must be >= 0, got {self.n.tolist()}")
        n_init = float(self.n_init)
        if not math.isfinite(n_init) or n_init < 0.0:
            raise ValueError(f"Plan.n_init must be a finite number >= 0, got {self.n_init!r}")
        set_("n_init", n_init)
        set_("precond", dict(self.precond))
        set_("options", dict(self.options))

    # ------------------------------------------------------------------ properties
    @property
    def stages(self) -> int:
        """Number of stages = network evaluations (NFE)."""
        return int(self.sigma.shape[0])

    nfe = stages

    @property
    def steps(self) -> int:
        """N: the number of schedule intervals (``len(sigmas) - 1``)."""
        return int(self.sigmas.shape[0] - 1)

    @property
    def history(self) -> int:
        """K: how many history entries Y[s], Y[s-1], ... a stage may combine."""
        return int(self.b.shape[1])

    @property
    def direction(self) -> str:
        """"down" (sampling: noise at t_0 to data at t_N) or "up" (an inversion: an image at t_0 to noise at t_N)."""
        return "up" if self.sigmas[0] < self.sigmas[-1] else "down"

    @property
    def stochastic(self) -> bool:
        return bool(self.n_init > 0.0 or np.any(self.n > 0.0))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        # JSON has no Inf: option values such as S_tmax = inf travel as the strings "inf" / "-inf".
        d["options"] = {k: (repr(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in self.options.items()}
        return d

    def to_json(self, indent: int | None = 1) -> str:
        # repr() of a Python float round-trips exactly, so the plan survives JSON bit for bit.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not an edmrt plan: format must be {PLAN_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {d.get('version')!r}; expected {PLAN_VERSION}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d) - {"n_init", "precond", "options"})
        if missing:
            raise ValueError(f"plan JSON lacks field(s) {missing}")
        unknown = sorted(set(d) - names - {"format", "version"})
        if unknown:
            raise ValueError(f"plan JSON has unknown field(s) {unknown}")
        _check_json_types(d)
        kw = {k: d[k] for k in names if k in d}
        kw["options"] = {k: (float(v) if v in ("inf", "-inf") else v) for k, v in kw.get("options", {}).items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        """A plan from its JSON (RFC 8259: no NaN / Infinity literals, no duplicate keys), validated as a Plan; the
        C++ reader (cpp/plan_json.cpp) refuses the same documents."""
        def no_constant(name):
            raise ValueError(f"plan JSON is malformed: {name} is not a JSON number")

        def unique(pairs):
            d = {}
            for k, v in pairs:
                if k in d:
                    raise ValueError(f"plan JSON is malformed: field {k!r} twice")
                d[k] = v
            return d

        if isinstance(text, (bytes, bytearray)):
            try:  # UTF-8 only, as RFC 8259 requires between systems: no BOM, no UTF-16/32 guessing
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("plan JSON is not valid UTF-8") from None
        if not isinstance(text, str):
            raise ValueError(f"plan JSON must be text (str or UTF-8 bytes), got {type(text).__name__}")
        try:
            d = json.loads(text, parse_constant=no_constant, object_pairs_hook=unique)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan JSON is malformed: {exc}") from None
        except RecursionError:
            raise ValueError(f"plan JSON nests deeper than {_MAX_DEPTH}") from None
        except UnicodeDecodeError:
            raise ValueError("plan JSON is not valid UTF-8") from None
        return cls.from_dict(d)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        for f in fields(self):
            u, v = getattr(self, f.name), getattr(other, f.name)
            if isinstance(u, np.ndarray):
                if u.shape != v.shape or not np.array_equal(u, v):
                    return False
            elif u != v:
                return False
        return True

    __hash__ = None  # arrays: equality is by value, so no hash

    # ------------------------------------------------------------------ table
    def table(self, digits: int = 6) -> str:
        """A human-readable table: one row per stage (network evaluation)."""
        K = self.history
        head = ["s", "step", "sigma", "c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e"]
        head += [f"b{k}" for k in range(K)] + ["n", "commit"]
        fmt = lambda v: f"{v:.{digits}g}"  # noqa: E731
        rows = []
        for s in range(self.stages):
            rows.append([str(s), str(int(self.step[s]))]
                        + [fmt(getattr(self, k)[s]) for k in ("sigma", "c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e")]
                        + [fmt(self.b[s, k]) for k in range(K)] + [fmt(self.n[s]), "yes" if self.commit[s] else "no"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        title = (f"plan {self.solver}({opts})  steps={self.steps}  NFE={self.nfe}  history={K}  "
                 f"precond={self.precond.get('name')}  stochastic={'yes' if self.stochastic else 'no'}")
        if self.n_init:
            title += f"  n_init={fmt(self.n_init)}"
        return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

    def __str__(self) -> str:
        return self.table()
