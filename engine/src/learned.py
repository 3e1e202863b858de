"""Learned solvers: a plan's time steps and multistep coefficients fitted to one model by teacher matching.

S4S (Frankel et al. 2025, arXiv 2502.17423) learns a solver's coefficients and time steps together, data free:
initial noises are solved once by a strong teacher (the same model at many steps), and the few-step solver's
parameters are optimised so that its endpoints match the teacher's.  LD3 (Tong et al. 2024, arXiv 2405.15506)
fits the time steps the same way, and decoupled time shifts (the level the network is told differs from the
state's) follow Li et al. 2024 (arXiv 2404.00849, exposure bias).  The solver fitted here is a data-form
multistep method in EDM's sigma (Karras et al. 2022, Eq. 4, integrated exactly in its linear part as
DPM-Solver++ does, Lu et al. 2022, arXiv 2211.01095, Eq. 9):

    x_0 = sigma_0 z,   D_i = D(x_i; sigma_i e^{delta_i}),
    x_{i+1} = r_i x_i + (1 - r_i) sum_{k < K} w_{i,k} D_{i-k},   r_i = sigma_{i+1} / sigma_i,  sigma_N = 0.

Learned: the N levels sigma_0 > ... > sigma_{N-1} in [sigma_min, sigma_max] (a softmax over the N + 1 log gaps,
so the first step may be analytic: sigma_0 < sigma_max starts from sigma_0 z, the iPNDM-AFS idea of Zhou et al.
2024, arXiv 2311.18608), the weights w (first-order consistency sum_k w_{i,k} = 1 kept, as S4S's constrained
variant, or relaxed) and the shifts delta.  They start from DPM-Solver++(3M) on Karras' schedule (w from its
plan), and are fitted by L-BFGS on the endpoint MSE with gradients through the denoiser (torch autograd): first
on ``warm_samples`` noises, then on all ``samples``, where every iterate is scored on ``heldout`` other noises
and the best one is kept (early stopping).  The result is an ordinary ``Plan``: the fused step, every backend and the C
ABI run it at no extra cost per step.

Cost: one sample through the denoiser is one evaluation and one sample through its backward pass is one more;
the references are ``reference_nfe`` evaluations per training and held-out noise; ``budget`` bounds the sum.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .backends.cachefile import atomic_write
from .executor import execute
from .model import Model
from .optimize import check_int, check_shape
from .plan import Plan
from .precond import Identity, Precond
from .request import check_guidance
from .schedules import check_range, karras
from .solvers import build_plan
from .solvers.base import Builder

__all__ = ["LearnedSolver", "optimize_solver", "load_learned"]

FORMAT = "edmrt.learned-solver"


@dataclass(frozen=True)
class LearnedSolver:
    """A solver fitted to one model: ``edmrt.solve(den, noise, **opt.solve_kwargs)`` or
    ``Sampler(model, **opt.sampler_args)`` runs ``plan``.

    ``sigmas``: the N + 1 state levels (sigma_0 first, 0 last); ``eval_sigmas`` the N levels the network is told.
    ``cost`` = ``evaluations`` + ``backward`` (samples through the denoiser and through its backward pass),
    ``reference_cost`` the teacher's part of ``evaluations``.  ``loss`` / ``heldout_loss``: RMSE to the teacher on
    the training / held-out noises; ``initial_loss``: the starting solver's (DPM-Solver++(3M), Karras) on the
    held-out noises.  ``curve``: (cost, training RMSE, held-out RMSE) per optimiser evaluation.
    """

    plan: Plan
    nfe: int
    sigmas: list
    eval_sigmas: list
    weights: list
    cost: int
    evaluations: int
    backward: int
    reference_cost: int
    loss: float
    heldout_loss: float
    initial_loss: float
    curve: list
    options: dict = field(default_factory=dict)
    key: str = ""
    seconds: float = 0.0

    @property
    def solve_kwargs(self) -> dict:
        return {"plan": self.plan}

    @property
    def sampler_args(self) -> dict:
        return {"plan": self.plan}

    def card(self) -> dict:
        d = {k: getattr(self, k) for k in _CARD_FIELDS}
        return {"format": FORMAT, "version": 1, **d, "plan": self.plan.to_dict()}

    def save(self, path) -> Path:
        """The plan JSON at ``path`` (what ``--solver learned:FILE`` and the C ABI read) and this card beside it
        (``NAME.card.json``); both written atomically."""
        path = Path(path)
        atomic_write(path, self.plan.to_json().encode(), private=False)
        atomic_write(card_path(path), json.dumps(self.card(), indent=1).encode(), private=False)
        return path

    @classmethod
    def from_card(cls, d: dict) -> "LearnedSolver":
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != 1:
            raise ValueError(f"not a learned-solver card (format {FORMAT!r}, version 1)")
        plan = Plan.from_dict(d["plan"])
        kw = {k: d[k] for k in _CARD_FIELDS}
        if kw["nfe"] != plan.nfe:
            raise ValueError(f"card's nfe {kw['nfe']} contradicts its plan's {plan.nfe}")
        return cls(plan=plan, **kw)


_CARD_FIELDS = tuple(f for f in LearnedSolver.__dataclass_fields__ if f != "plan")   # the card: all but the plan


def card_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".card.json")


def load_learned(path) -> LearnedSolver:
    """A saved learned solver: its card (``NAME.card.json`` beside the plan), checked against the plan file."""
    path = Path(path)
    card = json.loads(card_path(path).read_text())
    opt = LearnedSolver.from_card(card)
    if Plan.load(path) != opt.plan:
        raise ValueError(f"{path}: the plan differs from its card {card_path(path)}")
    return opt


# ----------------------------------------------------------------------------------------------- the denoiser


class _Coefficients(torch.autograd.Function):
    """EDM Eq. 7's (c_skip, c_out, c_in, c_noise) at a scalar sigma tensor, differentiable in sigma: the values from
    the preconditioning's float64 formula, the derivative by a central difference of that formula."""

    @staticmethod
    def forward(ctx, sigma, precond):
        s = float(sigma)
        h = 1e-6 * s
        at = lambda v: np.array(precond.coefficients(np.array([v])), dtype=np.float64)[:, 0]  # noqa: E731
        c = at(s)
        d = None
        for a, b in ((s - h, s + h), (s - h, s), (s, s + h)):   # one-sided at the edge of a model's range
            try:
                d = (at(b) - at(a)) / (b - a)
                break
            except ValueError:
                continue
        ctx.save_for_backward(torch.as_tensor(np.zeros_like(c) if d is None else d, dtype=sigma.dtype))
        return torch.as_tensor(c, dtype=sigma.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return (grad * d).sum(), None


class _ModelDenoiser:
    """D(x; sigma) of a Model under its conditioning and guidance, differentiable in x and in the scalar sigma:
    c_skip x + c_out F with F = F_u + w (F_c - F_u) (classifier-free guidance, as the engine computes it)."""

    def __init__(self, model: Model, cond: dict, uncond: dict | None, guidance: float | None):
        self.model, self.cond, self.uncond, self.guidance = model, cond, uncond, guidance

    def rows(self, rows: slice) -> "_ModelDenoiser":
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}  # noqa: E731
        return _ModelDenoiser(self.model, pick(self.cond), pick(self.uncond), self.guidance)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = _Coefficients.apply(sigma.reshape(-1)[0].to(torch.float64), self.model.precond)
        dt = x.dtype
        x_in = c_in.to(dt) * x
        noise_in = c_noise.to(dt).expand(x.shape[0])
        f = self.model.network(x_in, noise_in, **self.cond)
        if self.guidance is not None:
            f_u = self.model.network(x_in, noise_in, **self.uncond)
            f = f_u + self.guidance * (f - f_u)
        return c_skip.to(dt) * x + c_out.to(dt) * f.to(dt)


def _rows_of(model: Model, given, n: int, device, what: str) -> dict:
    """Each conditioning input as n rows: given rows cycled (row j is given row j mod len), or its null."""
    if given is not None and not model.cond:
        raise ValueError(f"{what} is given, but the model takes no conditioning")
    given = {} if given is None else ({model.cond[0].name: given} if not isinstance(given, dict) else dict(given))
    unknown = sorted(set(given) - set(model.cond_names))
    if unknown:
        raise ValueError(f"{what} names {unknown}; the model's conditioning inputs are {list(model.cond_names)}")
    out = {}
    for c in model.cond:
        v = given.get(c.name)
        if v is None:
            if c.null is None or c.null == "cond":
                raise ValueError(f"{what}[{c.name!r}] is required (its unconditional row is not a number)")
            v = torch.full((1,) + c.shape, c.null, dtype=c.dtype)
        v = torch.as_tensor(v, dtype=c.dtype)
        if v.shape == c.shape:
            v = v[None]
        if v.ndim != len(c.shape) + 1 or tuple(v.shape[1:]) != c.shape or v.shape[0] < 1:
            raise ValueError(f"{what}[{c.name!r}] must have shape (L, *{c.shape}) or {c.shape}, got {tuple(v.shape)}")
        if c.num_classes and (int(v.min()) < 0 or int(v.max()) > c.num_classes):
            raise ValueError(f"{what}[{c.name!r}] must lie in [0, {c.num_classes}], got {v.unique().tolist()}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what}[{c.name!r}] must be finite (it contains NaN or Inf)")
        out[c.name] = v[torch.arange(n) % v.shape[0]].to(device)
    return out


def _model_denoiser(model: Model, cond, uncond, guidance, n: int, device) -> _ModelDenoiser:
    guidance = check_guidance(guidance)   # what Sampler.sample accepts, so the plan can be sampled as fitted
    if cond is None and model.num_classes:  # balanced labels: row j is class j mod num_classes
        cond = {"class_labels": torch.arange(model.num_classes)}
    rows = _rows_of(model, cond, n, device, "cond")
    un = None
    if guidance is not None:
        given = {} if uncond is None else ({model.cond[0].name: uncond} if not isinstance(uncond, dict) else uncond)
        given = {**{c.name: rows[c.name] for c in model.cond if c.null == "cond" and c.name not in given}, **given}
        un = _rows_of(model, given, n, device, "uncond")
    return _ModelDenoiser(model, rows, un, guidance)


# ------------------------------------------------------------------------------------------- the parameters


class _Params:
    """theta (N logits: softmax([theta, 0]) splits [ln sigma_min, ln sigma_max] into the gap above sigma_0, the N - 1
    gaps between levels and the slack below sigma_{N-1}), W (N, K) and delta (N,)."""

    def __init__(self, nfe: int, K: int, sigma_min: float, sigma_max: float, relaxed: bool, dtype,
                 free_start: bool = True, time_shift: bool = True):
        self.N, self.K, self.relaxed, self.free_start, self.time_shift = nfe, K, relaxed, free_start, time_shift
        self.u_max, self.u_min = math.log(sigma_max), math.log(sigma_min)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        # N levels + 0; with a free start the first step is analytic (Karras' N + 1 levels without the first)
        s = karras(nfe + 1, sigma_min, sigma_max)[1:] if free_start else karras(nfe, sigma_min, sigma_max)
        u = np.log(np.concatenate([[sigma_max], s[:-1]]))
        gaps = np.concatenate([-np.diff(u), [u[-1] - self.u_min]]) / (self.u_max - self.u_min)
        z = np.log(np.maximum(gaps, 1e-3))
        if not free_start:   # the gap above sigma_0 = sigma_max is 0: drop it
            z = z[1:]
        base = build_plan("dpmpp_3m", s, None)
        r = np.append(s[1:nfe] / s[:nfe - 1], 0.0)
        W = np.zeros((nfe, K))
        k = min(K, base.b.shape[1])
        W[:, :k] = base.b[:, :k] / (1.0 - r)[:, None]
        self.theta = torch.tensor(z[:-1] - z[-1], dtype=dtype, requires_grad=True)
        self.W = torch.tensor(W, dtype=dtype, requires_grad=True)
        self.delta = torch.zeros(nfe, dtype=dtype, requires_grad=True)
        self.mask = torch.tensor([[float(k < i + 1) for k in range(K)] for i in range(nfe)], dtype=dtype)

    @property
    def tensors(self) -> list:
        return [self.theta, self.W] + ([self.delta] if self.time_shift else [])

    def snapshot(self) -> list:
        return [t.detach().clone() for t in self.tensors]

    def restore(self, snap: list) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors, snap):
                t.copy_(v)

    def levels(self) -> torch.Tensor:
        w = torch.softmax(torch.cat([self.theta, self.theta.new_zeros(1)]), 0)
        u = self.u_max - (self.u_max - self.u_min) * torch.cumsum(w[:-1], 0)
        if not self.free_start:
            u = torch.cat([u.new_full((1,), self.u_max), u])
        return torch.clamp(torch.exp(u), self.sigma_min, self.sigma_max)   # e^{ln s} may miss s by an ulp

    def eval_levels(self) -> torch.Tensor:
        """The levels the network is told: sigma_i e^{delta_i}, kept inside [sigma_min, sigma_max]."""
        return torch.clamp(self.levels() * torch.exp(self.delta), self.sigma_min, self.sigma_max)

    def weights(self) -> torch.Tensor:
        W = self.W * self.mask
        if self.relaxed:
            return W
        return torch.cat([1.0 - W[:, 1:].sum(1, keepdim=True), W[:, 1:]], 1)

    def run(self, den: Callable, z: torch.Tensor) -> torch.Tensor:
        """The few-step solve from noise z (the module docstring's update), differentiable in the parameters."""
        sig, W, ev = self.levels(), self.weights(), self.eval_levels()
        x, hist = sig[0].to(z.dtype) * z, []
        view = (z.shape[0],) + (1,) * (z.ndim - 1)
        for i in range(self.N):
            hist = [den(x, ev[i].to(z.dtype).expand(view))] + hist[:self.K - 1]
            r = sig[i + 1] / sig[i] if i + 1 < self.N else sig.new_zeros(())
            x = r.to(z.dtype) * x + (1 - r).to(z.dtype) * sum(W[i, k].to(z.dtype) * hist[k] for k in range(len(hist)))
        return x

    def plan(self, precond: Precond, options: dict) -> Plan:
        """These parameters as a Plan for ``precond``: one data-form stage per evaluation."""
        with torch.no_grad():
            sig = self.levels().double().numpy()
            W, ev = self.weights().double().numpy(), self.eval_levels().double().numpy()
        sigmas = np.append(sig, 0.0)
        p = Builder("learned", sigmas, precond, K=self.K, options=options)
        for i in range(self.N):
            r = sigmas[i + 1] / sigmas[i]
            p.D_stage(step=i, sigma=float(ev[i]), e=float(r), b=tuple(float((1 - r) * W[i, k]) for k in range(self.K)))
        return p.build()


# ------------------------------------------------------------------------------------------------- the fit


class _Fit:
    """Teacher references for the training and held-out noises, and the counted L-BFGS fit against them."""

    def __init__(self, den, z: torch.Tensor, ref: torch.Tensor, n_train: int, params: _Params, budget: int,
                 reference_cost: int, bar, batch: int):
        self.den, self.z, self.ref, self.n_train, self.p, self.batch = den, z, ref, n_train, params, batch
        self.budget, self.bar = budget, bar
        self.evaluations, self.backward, self.reference_cost = reference_cost, 0, reference_cost
        self.best, self.curve, self.initial = (math.inf, params.snapshot(), math.inf), [], math.nan

    @property
    def cost(self) -> int:
        return self.evaluations + self.backward

    def _den(self, rows: slice):
        return self.den.rows(rows) if isinstance(self.den, _ModelDenoiser) else self.den

    def mse(self, rows: slice, grad: bool) -> float:
        """The endpoint MSE over ``rows``, in chunks of ``batch`` rows; with ``grad`` each chunk's share of the
        gradient is accumulated into the parameters' .grad (one chunk's graph alive at a time)."""
        total, n = 0.0, rows.stop - rows.start
        for i in range(rows.start, rows.stop, self.batch):
            part = slice(i, min(i + self.batch, rows.stop))
            m = part.stop - part.start
            self.evaluations += m * self.p.N
            with torch.set_grad_enabled(grad):
                x = self.p.run(self._den(part), self.z[part])
                loss = (x.double() - self.ref[part]).pow(2).mean() * (m / n)
            if not bool(torch.isfinite(loss)):
                return math.inf
            if grad:
                self.backward += m * self.p.N
                loss.backward()
            total += float(loss)
        return total

    def heldout(self) -> float:
        return self.mse(slice(self.n_train, self.z.shape[0]), False)

    def closure_cost(self, n: int, scored: bool) -> int:
        return 2 * n * self.p.N + (self.z.shape[0] - self.n_train) * self.p.N * scored

    def stage(self, n: int, share: float, scored: bool) -> None:
        """L-BFGS on the first n training noises until ``share`` of the budget is spent.  ``scored``: every
        iterate is scored on the held-out noises and the best kept (the parameters end at it); otherwise (the warm
        start) the last iterate is scored once."""
        stop = self.reference_cost + share * (self.budget - self.reference_cost)
        if self.cost + self.closure_cost(n, scored) > stop:
            return
        opt = torch.optim.LBFGS(self.p.tensors, lr=1.0, max_iter=10 ** 6, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

        class _Spent(Exception):
            pass

        last = [math.inf, self.p.snapshot()]

        def closure():
            if self.cost + self.closure_cost(n, scored) > stop:
                raise _Spent
            opt.zero_grad()
            loss = self.mse(slice(0, n), True)
            if not math.isfinite(loss):   # a step too far: L-BFGS's line search backs off
                opt.zero_grad()
                return torch.tensor(1e30, dtype=torch.float64)
            if loss < last[0]:
                last[:] = [loss, self.p.snapshot()]
            self.record(loss, scored)
            return torch.tensor(loss, dtype=torch.float64)

        try:
            opt.step(closure)
        except _Spent:
            pass
        if not scored and math.isfinite(last[0]):
            self.p.restore(last[1])
            self.record(last[0], True)
        self.p.restore(self.best[1])

    def record(self, train: float, scored: bool) -> None:
        snap, held = self.p.snapshot(), self.heldout() if scored else math.nan
        self.curve.append((self.cost, math.sqrt(train), math.sqrt(held)))
        if held < self.best[0]:
            self.best = (held, snap, train)
        if self.bar is not None:
            self.bar.n = min(self.cost, self.budget)
            self.bar.set_postfix(train=f"{math.sqrt(train):.3g}", heldout=f"{math.sqrt(held):.3g}" if scored else "-",
                                 refresh=False)
            self.bar.refresh()


def optimize_solver(denoiser, nfe: int = 5, shape: Sequence[int] | None = None, cond=None, seed: int = 0,
                    budget: int = 1_000_000, *, guidance: float | None = None, uncond=None, history: int = 3,
                    consistency: str = "kept", samples: int | None = None, heldout: int = 128,
                    warm_samples: int = 128, warm_share: float = 0.6, reference_solver: str = "dpmpp_3m",
                    reference_nfe: int = 100, sigma_min: float | None = None, sigma_max: float | None = None,
                    batch: int = 2048,
                    free_start: bool = True, time_shift: bool = True, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", cache=None, progress: bool = False) -> LearnedSolver:
    """Learn the time steps and multistep weights of an ``nfe``-evaluation solver for ``denoiser`` (module docstring).

    ===============  ==============================================================================
    denoiser         ``denoiser(x, sigma) -> D`` as for ``edmrt.solve`` (differentiable in torch), or an
                     ``edmrt.Model`` (its preconditioning, conditioning and ``guidance``; the plan is built for
                     its preconditioning, for ``Sampler(model, plan=...)``)
    nfe              network evaluations of the learned solver (its stages)
    shape            one sample's shape (a Model's ``sample_shape`` by default)
    cond, uncond     a Model's conditioning rows, cycled over the noises (default: class labels 0, 1, ...);
                     ``uncond``: the unconditional rows where an input's null is not a number
    seed             the fit's own noise: standard normal from ``seed`` (training, then held-out rows)
    budget           evaluations in all, the teacher's included; a backward pass through the denoiser counts as
                     one more evaluation
    history          K, the D values each step combines (1-4)
    consistency      ``"kept"``: sum_k w_{i,k} = 1 (first-order consistent); ``"relaxed"``: free, as S4S allows
    samples          training noises (default: what leaves about 25 full-batch iterations of the budget,
                     clipped to [256, 2048]); ``warm_samples`` of them for the first ``warm_share`` of the budget
    heldout          held-out noises: the iterate with the lowest held-out error is returned
    reference_*      the teacher: the same denoiser, this solver at this many steps on Karras' schedule
    batch            at most this many samples per solve (the teacher's and the fit's; the fit accumulates the
                     gradient over chunks, so memory holds one chunk's graph through all N stages)
    cache            a folder: fits are kept by the model's weights hash, nfe and every option, verified by
                     content, and a corrupt entry is fitted again
    ===============  ==============================================================================
    """
    t_start = time.perf_counter()
    cfg = _config(denoiser, nfe, shape, seed, budget, history, consistency, samples, heldout, warm_samples,
                  warm_share, reference_solver, reference_nfe, sigma_min, sigma_max, batch, dtype, device, guidance,
                  free_start, time_shift)
    key = _cache_key(denoiser, cfg, cond, uncond, cache is not None)
    cached = _cache_read(cache, key)
    if cached is not None:
        return cached
    N, n_all = cfg["nfe"], cfg["samples"] + cfg["heldout"]
    den = denoiser
    if isinstance(denoiser, Model):
        den = _model_denoiser(denoiser, cond, uncond, guidance, n_all, device)
    elif cond is not None or uncond is not None or guidance is not None:
        raise ValueError("cond, uncond and guidance are for an edmrt.Model; fold them into a plain denoiser")
    if n_all * cfg["reference_nfe"] + 2 * cfg["samples"] * N >= cfg["budget"]:
        raise ValueError(f"budget={cfg['budget']} leaves nothing for the fit after the teacher's "
                         f"{n_all * cfg['reference_nfe']} evaluations: raise it or lower reference_nfe / samples")
    gen = torch.Generator().manual_seed(cfg["seed"])
    z = torch.randn((n_all,) + cfg["shape"], generator=gen, dtype=torch.float64).to(device=device, dtype=cfg["dtype"])
    params = _Params(N, cfg["history"], cfg["sigma_min"], cfg["sigma_max"], cfg["consistency"] == "relaxed",
                     torch.float64, cfg["free_start"], cfg["time_shift"])
    from tqdm import tqdm

    bar = tqdm(total=cfg["budget"], disable=not progress, desc=f"fit-solver nfe={N}", unit="eval", unit_scale=True,
               dynamic_ncols=True)
    try:
        with _frozen(denoiser):
            ref = _references(den, z, cfg, bar)
            fit = _fit(den, z, ref, cfg, params, bar)
    finally:
        bar.close()
    return _result(fit, params, denoiser, cfg, key, time.perf_counter() - t_start, cache)


@contextlib.contextmanager
def _frozen(denoiser):
    """The denoiser's torch parameters without gradients while the fit runs (only the solver's are learned; the
    model's .grad stays as it was), restored afterwards."""
    net = denoiser.network if isinstance(denoiser, Model) else denoiser
    params = [p for p in net.parameters() if p.requires_grad] if isinstance(net, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _fit(den, z, ref, cfg: dict, params: _Params, bar) -> "_Fit":
    """The two stages (warm start, then all training noises with held-out scoring)."""
    fit = _Fit(den, z, ref, cfg["samples"], params, cfg["budget"], z.shape[0] * cfg["reference_nfe"], bar, cfg["batch"])
    fit.initial = math.sqrt(fit.heldout())
    fit.stage(min(cfg["warm_samples"], cfg["samples"]), cfg["warm_share"], False)
    fit.stage(cfg["samples"], 1.0, True)
    if not fit.curve:
        raise ValueError(f"budget={cfg['budget']} leaves nothing for the fit after the teacher's "
                         f"{fit.reference_cost} evaluations: raise it or lower reference_nfe / samples")
    return fit


def _config(denoiser, nfe, shape, seed, budget, history, consistency, samples, heldout, warm_samples, warm_share,
            reference_solver, reference_nfe, sigma_min, sigma_max, batch, dtype, device, guidance, free_start,
            time_shift) -> dict:
    is_model = isinstance(denoiser, Model)
    if not is_model and not callable(denoiser):
        raise ValueError(f"denoiser must be an edmrt.Model or callable as denoiser(x, sigma), got "
                         f"{type(denoiser).__name__}")
    if shape is None:
        if not is_model:
            raise ValueError("shape (one sample's shape) is required for a plain denoiser")
        shape = denoiser.sample_shape
    shape = check_shape(shape)
    if consistency not in ("kept", "relaxed"):
        raise ValueError(f"consistency must be 'kept' or 'relaxed', got {consistency!r}")
    if isinstance(warm_share, bool) or not isinstance(warm_share, (int, float)) or not 0.0 <= warm_share < 1.0:
        raise ValueError(f"warm_share must be a number in [0, 1), got {warm_share!r}")
    build_plan(reference_solver, karras(2, 0.002, 80.0), None)   # an unknown name is refused here
    lo = denoiser.sigma_min if is_model and sigma_min is None else 0.002 if sigma_min is None else sigma_min
    hi = denoiser.sigma_max if is_model and sigma_max is None else 80.0 if sigma_max is None else sigma_max
    lo, hi = check_range(lo, hi)
    if dtype is None:
        dtype = torch.float32 if is_model else torch.float64
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    history = check_int("history", history, 1)
    if history > 4:
        raise ValueError(f"history must be an integer in [1, 4], got {history}")
    nfe, budget = check_int("nfe", nfe, 1), check_int("budget", budget, 1)
    if samples is None:
        samples = int(np.clip(budget * (1.0 - float(warm_share)) / (25 * 2 * nfe), 256, 2048))
    return dict(nfe=nfe, shape=shape, seed=check_int("seed", seed, 0), budget=budget,
                history=history, consistency=consistency, samples=check_int("samples", samples, 1),
                heldout=check_int("heldout", heldout, 1), warm_samples=check_int("warm_samples", warm_samples, 1),
                warm_share=float(warm_share), reference_solver=reference_solver,
                reference_nfe=check_int("reference_nfe", reference_nfe, 2), sigma_min=lo, sigma_max=hi,
                batch=check_int("batch", batch, 1), dtype=dtype, device=str(torch.device(device)),
                guidance=None if guidance is None else float(guidance), free_start=bool(free_start),
                time_shift=bool(time_shift))


def _references(den, z: torch.Tensor, cfg: dict, bar=None) -> torch.Tensor:
    """The teacher's endpoints (float64), in chunks of ``batch`` rows (``bar`` counts their evaluations)."""
    plan = build_plan(cfg["reference_solver"], karras(cfg["reference_nfe"], cfg["sigma_min"], cfg["sigma_max"]), None)
    t0, out = float(plan.sigmas[0]), []
    with torch.no_grad():
        for i in range(0, z.shape[0], cfg["batch"]):
            rows = slice(i, min(i + cfg["batch"], z.shape[0]))
            net = den.rows(rows) if isinstance(den, _ModelDenoiser) else den
            out.append(execute(plan, net, t0 * z[rows]).double())
            if bar is not None:
                bar.update((rows.stop - rows.start) * plan.nfe)
    ref = torch.cat(out)
    if not bool(torch.isfinite(ref).all()):
        raise FloatingPointError("the teacher's solve produced NaN or Inf: check the denoiser")
    return ref


def _result(fit: _Fit, params: _Params, denoiser, cfg: dict, key: str, seconds: float, cache) -> LearnedSolver:
    precond = denoiser.precond if isinstance(denoiser, Model) else Identity()
    options = {k: cfg[k] for k in ("history", "consistency", "free_start", "time_shift", "samples", "heldout", "seed",
                                   "budget", "reference_solver", "reference_nfe")}
    plan = params.plan(precond, options)
    with torch.no_grad():
        eval_sigmas = params.eval_levels().double().tolist()
        weights = params.weights().double().tolist()
    held, _, train = fit.best
    opt = LearnedSolver(plan=plan, nfe=plan.nfe, sigmas=[float(v) for v in plan.sigmas], eval_sigmas=eval_sigmas,
                        weights=weights, cost=fit.cost, evaluations=fit.evaluations, backward=fit.backward,
                        reference_cost=fit.reference_cost, loss=math.sqrt(train), heldout_loss=math.sqrt(held),
                        initial_loss=fit.initial, curve=[list(c) for c in fit.curve], options=options, key=key,
                        seconds=round(seconds, 2))
    _cache_write(cache, key, opt)
    return opt


# ------------------------------------------------------------------------------------------------- the cache


def _weights_hash(denoiser) -> str:
    """sha256 over the model's tensors (a Model's network or an nn.Module's state_dict; a Gaussian mixture's
    parameters); ValueError for a callable whose weights cannot be read."""
    net = denoiser.network if isinstance(denoiser, Model) else denoiser
    if isinstance(net, torch.nn.Module):
        tensors = sorted(net.state_dict().items())
    elif all(isinstance(getattr(net, k, None), torch.Tensor) for k in ("means", "stds", "weights")):
        tensors = [(k, getattr(net, k)) for k in ("means", "stds", "weights")]
    else:
        raise ValueError(f"cache needs a model whose weights can be hashed (an nn.Module, an edmrt.Model, a "
                         f"GaussianMixture), got {type(net).__name__}")
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cache_key(denoiser, cfg: dict, cond, uncond, cached: bool) -> str:
    """sha256 of the weights, the preconditioning, the conditioning rows and every option ("" without a cache)."""
    if not cached:
        return ""
    parts = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items() if k not in ("batch", "device")}
    parts["weights"] = _weights_hash(denoiser)
    if isinstance(denoiser, Model):
        parts["precond"] = denoiser.precond.to_dict()
    for name, c in (("cond", cond), ("uncond", uncond)):
        items = sorted(c.items()) if isinstance(c, dict) else [("", c)] if c is not None else []
        parts[name] = [(k, hashlib.sha256(torch.as_tensor(v).cpu().contiguous().numpy().tobytes()).hexdigest())
                       for k, v in items]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cache_file(cache, key: str) -> Path:
    return Path(cache) / f"learned-{key[:32]}.json"


def _cache_read(cache, key: str) -> LearnedSolver | None:
    """The cached fit for ``key``, or None (absent, corrupt, or not this key's: it is fitted again)."""
    if cache is None:
        return None
    path = _cache_file(cache, key)
    try:
        doc = json.loads(path.read_text())
        body = json.dumps(doc["card"], sort_keys=True)
        if doc["sha256"] != hashlib.sha256(body.encode()).hexdigest() or doc["card"]["key"] != key:
            return None
        return LearnedSolver.from_card(doc["card"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_write(cache, key: str, opt: LearnedSolver) -> None:
    if cache is None:
        return
    body = json.dumps(opt.card(), sort_keys=True)
    doc = {"sha256": hashlib.sha256(body.encode()).hexdigest(), "card": json.loads(body)}
    atomic_write(_cache_file(cache, key), json.dumps(doc).encode())
