"""Quality per network evaluation on the exact Gaussian-mixture oracle (``edmrt quality``).

For each mixture (64-D and 2-D by default) and each solver at each NFE budget (the largest step
count whose NFE is at or below the budget), report:
- RMSE to the exact probability-flow ODE endpoint of the same initial noise (deterministic solvers),
- the median per-sample error (per-sample RMS over dimensions),
- the sliced Wasserstein-2 distance to true data samples (every solver, stochastic ones included),
with the floor of that distance (two independent sets of true samples) beside it.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..executor import SeededNoise, execute
from ..models.gmm import GaussianMixture
from ..schedules import make_sigmas
from ..solvers import SOLVERS, build_plan
from .common import machine_name

log = logging.getLogger("edmrt.lab.quality_gmm")

__all__ = ["NFES", "DEFAULT_SOLVERS", "Recipe", "RECIPES", "steps_for", "sliced_wasserstein", "mixture", "run_quality",
           "table", "write_results"]

NFES = (3, 5, 6, 8, 10, 16, 20, 35)


@dataclass(frozen=True)
class Recipe:
    """A solver with its options, on Karras et al.'s schedule (rho = 7): what the harness runs under one name."""

    name: str
    solver: str
    options: dict = field(default_factory=dict)

    def sigmas(self, steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
        return make_sigmas("karras", steps, sigma_min, sigma_max, 7.0)

    def plan(self, steps: int, sigma_min: float, sigma_max: float):
        return build_plan(self.solver, self.sigmas(steps, sigma_min, sigma_max), None, **self.options)


DEFAULT_SOLVERS: tuple[Recipe, ...] = tuple(Recipe(n, n) for n in SOLVERS)
RECIPES: dict[str, Recipe] = {r.name: r for r in DEFAULT_SOLVERS}


def steps_for(recipe: Recipe, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> int | None:
    """The largest N whose plan makes at most ``nfe`` network evaluations (None if even N = 1 exceeds it)."""
    best = None
    for n in range(1, nfe + 2):  # nfe + 1 steps: a solver with an analytic first step makes N - 1 evaluations
        try:
            if recipe.plan(n, sigma_min, sigma_max).nfe <= nfe:
                best = n
        except ValueError:  # e.g. an order or schedule the step count cannot carry
            continue
    return best


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size sample sets (n, D): sqrt of the mean, over random
    unit directions, of the squared 1-D W2 between the sorted projections (Rabin et al. 2011)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"sample sets must both have shape (n, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double().cpu() @ theta, dim=0).values
    pb = torch.sort(b.double().cpu() @ theta, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mixture(dim: int, seed: int) -> GaussianMixture:
    # Well separated modes: means ~ 3 apart against per-dimension stds of 0.2 - 0.6.
    return GaussianMixture.random(K=8, D=dim, seed=seed, spread=3.0 if dim > 2 else 4.0)


def run_quality(dims: Sequence[int] = (64, 2), samples: int = 1000, seed: int = 0,
                nfes: Sequence[int] = NFES, recipes: Sequence[Recipe] = DEFAULT_SOLVERS, peers: bool = False,
                sigma_min: float = 0.002, sigma_max: float = 80.0, progress: bool = True, learned: bool = False) -> dict:
    """Run every recipe (and, with ``peers``, every installed peer) at every NFE on each mixture; with ``learned``,
    also a solver learned for each mixture and NFE (``edmrt.optimize_solver``, its own noise, default budget)."""
    from tqdm.auto import tqdm

    from .peers import available_peers

    peer_list = list(available_peers().values()) if peers else []
    jobs = [(d, r) for d in dims for r in list(recipes) + peer_list]
    rows: list[dict] = []
    mixtures: dict[str, dict] = {}
    bar = tqdm(total=len(jobs) * len(nfes), desc="quality", disable=not progress, unit="run")
    t_start = time.perf_counter()
    for dim in dims:
        g = mixture(dim, seed)
        gen = torch.Generator().manual_seed(10_000 + seed)
        noise = torch.randn(samples, dim, dtype=torch.float64, generator=gen)
        x_init = sigma_max * noise
        t0 = time.perf_counter()
        exact = g.ode(x_init, sigma_max, 0.0)
        real = g.sample(samples, seed=20_000 + seed)
        real2 = g.sample(samples, seed=30_000 + seed)
        mixtures[str(dim)] = dict(dim=dim, components=g.K, seed=seed, samples=samples,
                                  ode_seconds=round(time.perf_counter() - t0, 2),
                                  sw_floor=sliced_wasserstein(real, real2), sw_exact_ode=sliced_wasserstein(exact, real))
        for d, r in jobs:
            if d != dim:
                continue
            for nfe in nfes:
                bar.update(1)
                row = dict(dim=dim, nfe_budget=nfe)
                if hasattr(r, "runner"):  # a peer
                    row.update(solver=r.name, library=r.library, stochastic=False)
                    n = r.steps_for(nfe)
                    if n is None:
                        continue
                    with torch.no_grad():
                        x, used = r.run(g, x_init, nfe, sigma_min, sigma_max)
                    row.update(steps=n, nfe=used)
                else:
                    n = steps_for(r, nfe, sigma_min, sigma_max)
                    if n is None:
                        continue
                    p = r.plan(n, sigma_min, sigma_max)
                    source = SeededNoise(list(range(samples)), (dim,), torch.float64) if p.stochastic else None
                    x = execute(p, g, x_init, source)
                    row.update(solver=r.name, library="edmrt", stochastic=p.stochastic, steps=n, nfe=p.nfe)
                err = (x - exact).pow(2).mean(dim=1).sqrt()
                row.update(rmse=float(err.pow(2).mean().sqrt()), median=float(err.median()),
                           sw=sliced_wasserstein(x, real))
                if not math.isfinite(row["rmse"]):
                    log.warning("%s at NFE %d on %d-D gave non-finite samples", row["solver"], nfe, dim)
                rows.append(row)
        rows += _learned_rows(g, noise, exact, real, nfes, sigma_min, sigma_max) if learned else []
    bar.close()
    return dict(format="edmrt.quality", version=1, machine=machine_name(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, seconds=round(time.perf_counter() - t_start, 1),
                sigma_min=sigma_min, sigma_max=sigma_max, schedule="karras rho=7 unless the solver name says otherwise",
                mixtures=mixtures, rows=rows)


def _learned_rows(g: GaussianMixture, noise: torch.Tensor, exact: torch.Tensor, real: torch.Tensor, nfes,
                  sigma_min: float, sigma_max: float) -> list[dict]:
    """One row per NFE: ``optimize_solver(g, nfe, seed=1)`` (1M evaluations at most), run on the harness's noise."""
    from ..learned import optimize_solver
    from ..solve import solve

    rows = []
    for nfe in nfes:
        opt = optimize_solver(g, nfe, (g.D,), seed=1, sigma_min=sigma_min, sigma_max=sigma_max)
        x = solve(g, noise, **opt.solve_kwargs)
        err = (x - exact).pow(2).mean(dim=1).sqrt()
        rows.append(dict(dim=g.D, nfe_budget=nfe, solver="learned", library="edmrt", stochastic=False,
                         steps=opt.plan.steps, nfe=opt.nfe, rmse=float(err.pow(2).mean().sqrt()),
                         median=float(err.median()), sw=sliced_wasserstein(x, real), fit_cost=opt.cost))
    return rows


def table(result: dict, dim: int, metric: str = "rmse") -> str:
    """Markdown table: one row per solver, one column per NFE budget."""
    rows = [r for r in result["rows"] if r["dim"] == dim]
    nfes = sorted({r["nfe_budget"] for r in rows})
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    by = {(r["solver"], r["nfe_budget"]): r for r in rows}
    head = f"| {metric} ({dim}-D) | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    out = [head, "|" + "---|" * (len(nfes) + 1)]
    for s in solvers:
        cells = []
        for n in nfes:
            r = by.get((s, n))
            if r is None:
                cells.append("—")
            else:
                v = f"{r[metric]:.2e}" if math.isfinite(r[metric]) else "nan"
                cells.append(v if r["nfe"] == n else f"{v} ({r['nfe']})")
        stoch = " (stochastic)" if any(by[(s, n)]["stochastic"] for n in nfes if (s, n) in by) else ""
        out.append(f"| {s}{stoch} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(len(dims), 2, figsize=(13, 5 * len(dims)), squeeze=False)
    for row_axes, dim in zip(axes, dims):
        rows = [r for r in result["rows"] if r["dim"] == dim]
        solvers = list(dict.fromkeys(r["solver"] for r in rows))
        cmap = plt.get_cmap("tab20")
        for k, s in enumerate(solvers):
            pts = sorted((r["nfe"], r["rmse"], r["sw"], r["stochastic"], r["library"]) for r in rows if r["solver"] == s)
            style = "-" if pts[0][4] == "edmrt" else "--"
            marker = "o" if pts[0][4] == "edmrt" else "x"
            if not pts[0][3]:
                row_axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, ms=4,
                                   color=cmap(k % 20), label=s)
            row_axes[1].loglog([p[0] for p in pts], [p[2] for p in pts], style, marker=marker, ms=4,
                               color=cmap(k % 20), label=s)
        floor = result["mixtures"][str(dim)]["sw_floor"]
        row_axes[1].axhline(floor, color="k", lw=0.8, ls=":", label="floor (two real sets)")
        row_axes[0].set(title=f"{dim}-D mixture: RMSE to the exact ODE endpoint", xlabel="NFE", ylabel="RMSE")
        row_axes[1].set(title=f"{dim}-D mixture: sliced W2 to data", xlabel="NFE", ylabel="sliced W2")
        for ax in row_axes:
            ax.grid(True, which="both", alpha=0.3)
        row_axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"edmrt quality on the exact Gaussian mixture ({result['machine']}); solid: edmrt, dashed: peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, stem: Path, make_plot: bool = True) -> list[Path]:
    """Write ``stem.json``, ``stem.md`` (tables) and ``stem.png``; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1))
    dims = sorted({r["dim"] for r in result["rows"]}, reverse=True)
    md = ["# Quality per NFE on the exact Gaussian mixture", "",
          f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}; {result['seconds']} s.", ""]
    for dim in dims:
        m = result["mixtures"][str(dim)]
        md += [f"## {dim}-D, {m['components']} components, {m['samples']} samples (seed {m['seed']})", "",
               f"Sliced W2 floor (two real sets): {m['sw_floor']:.3e}; exact ODE endpoints: {m['sw_exact_ode']:.3e}.",
               "", table(result, dim, "rmse"), "", table(result, dim, "sw"), ""]
    paths[1].write_text("\n".join(md))
    if make_plot:
        paths.append(stem.with_suffix(".png"))
        plot(result, paths[2])
    return paths
