"""Low-NFE comparison on the exact 64-D Gaussian mixture: edmrt's best recipe against the best peer.

For each mixture seed (``edmrt.lab.quality_gmm.mixture(64, seed)``: 8 well separated components) and each NFE
budget (5, 10, 20), on held-out noise (the ``edmrt quality`` convention: 1000 samples from generator
seed 10_000 + seed, never seen by the fit):

- every installed peer (k-diffusion, diffusers) on its default Karras rho = 7 schedule; the best one is
  the baseline;
- edmrt's recipe: ``edmrt.optimize_schedule(den, nfe=n, candidates=FEW_STEP_CANDIDATES)`` (iPNDM with or
  without the analytic first step, order 3 or 4, three starts each, successive halving; 128 training
  noises from generator seed 1 and their 400-step reference solves), then
  ``edmrt.solve(den, noise, solver=opt.solver, steps=opt.steps, schedule=opt.sigmas, **opt.options)``;
- ablations (``--ablations``): named schedules without a fit, and single-solver fits.

RMSE is to the exact probability-flow ODE endpoint (scipy DOP853, rtol 1e-10).  The recipe's
hyperparameters were fixed on mixture seed 0 with separate validation noise (generator seed 50_000).

    python benchmarks/low_nfe.py                       # seeds 0-4, writes benchmarks/results/low_nfe_gmm.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import logging
import time
from pathlib import Path

import numpy as np
import torch

import edmrt
from edmrt.optimize import FEW_STEP_CANDIDATES
from edmrt.lab.peers import available_peers
from edmrt.lab.common import machine_name, write_json_md
from edmrt.lab.quality_gmm import mixture

log = logging.getLogger("low_nfe")

CHUNK = 250  # samples per call: keep batches modest on shared machines

# Fits: name -> optimize_schedule keywords (the recipe first).
FITS = {
    "recipe": dict(candidates=FEW_STEP_CANDIDATES),
    "fit ipndm(4), Karras start only": dict(solver="ipndm", order=4, starts=(0.0,)),
    "fit ipndm(4)": dict(solver="ipndm", order=4),
    "fit ipndm(3)": dict(solver="ipndm", order=3),
    "fit ipndm_afs(3)": dict(solver="ipndm_afs", order=3),
}
# Named schedules, no fit: name -> (solver, options, schedule, rho).
NAMED = {
    "ipndm(4) karras": ("ipndm", dict(order=4), "karras", 7.0),
    "ipndm(3) karras": ("ipndm", dict(order=3), "karras", 7.0),
    "ipndm(4) karras rho=12": ("ipndm", dict(order=4), "karras", 12.0),
    "ipndm(4) loglinear": ("ipndm", dict(order=4), "loglinear", 7.0),
    "ipndm_afs(3) karras": ("ipndm_afs", dict(order=3), "karras", 7.0),
    "ipndm_afs(4) karras": ("ipndm_afs", dict(order=4), "karras", 7.0),
}


def chunked(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)])


def errors(x: torch.Tensor, exact: torch.Tensor) -> dict:
    e = (x - exact).pow(2).mean(dim=1).sqrt()
    return dict(rmse=float(e.pow(2).mean().sqrt()), median=float(e.median()), max=float(e.max()))


def run(seeds, nfes, samples: int, train_samples: int, ablations: bool) -> dict:
    peers = available_peers()
    if not peers:
        raise RuntimeError("no peer installed (k-diffusion, diffusers): nothing to compare against")
    rows, fits = [], []
    t_start = time.perf_counter()
    for seed in seeds:
        g = mixture(64, seed)
        noise = torch.randn(samples, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(10_000 + seed))
        exact = g.ode(80.0 * noise, 80.0, 0.0)
        for nfe in nfes:
            for name, peer in peers.items():
                x = chunked(lambda z: peer.run(g, 80.0 * z, nfe)[0], noise)
                rows.append(dict(seed=seed, nfe=nfe, method=name, library=peer.library, kind="peer",
                                 **errors(x, exact)))
            for name, (solver, opts, schedule, rho) in (NAMED.items() if ablations else []):
                x = chunked(lambda z: edmrt.solve(g, z, solver, steps=nfe + (solver == "ipndm_afs"),
                                                  schedule=schedule, rho=rho, **opts), noise)
                rows.append(dict(seed=seed, nfe=nfe, method=name, library="edmrt", kind="named", **errors(x, exact)))
            for name, kw in (FITS.items() if ablations else list(FITS.items())[:1]):
                t0 = time.perf_counter()
                opt = edmrt.optimize_schedule(g, nfe=nfe, shape=(64,), samples=train_samples, seed=1, **kw)
                seconds = time.perf_counter() - t0
                x = chunked(lambda z: edmrt.solve(g, z, solver=opt.solver, steps=opt.steps, schedule=opt.sigmas,
                                                  **opt.options), noise)
                rows.append(dict(seed=seed, nfe=nfe, method=name, library="edmrt", kind="fit", cost=opt.cost,
                                 **errors(x, exact)))
                fits.append(dict(seed=seed, budget=nfe, method=name, seconds=round(seconds, 1), **opt.to_dict()))
                log.info("seed %d NFE %d %s: %s(%s) RMSE %.4g, cost %d evaluations, %.0f s", seed, nfe, name,
                         opt.solver, opt.options, rows[-1]["rmse"], opt.cost, seconds)
            best = min((r for r in rows if r["seed"] == seed and r["nfe"] == nfe and r["kind"] == "peer"),
                       key=lambda r: r["rmse"])
            for r in rows:
                if r["seed"] == seed and r["nfe"] == nfe:
                    r["ratio"] = r["rmse"] / best["rmse"]
            log.info("seed %d NFE %d: best peer %s %.4g", seed, nfe, best["method"], best["rmse"])
    return dict(format="edmrt.low_nfe", version=1, machine=machine_name(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                seconds=round(time.perf_counter() - t_start, 1), seeds=list(seeds), nfes=list(nfes),
                samples=samples, train_samples=train_samples, sigma_min=0.002, sigma_max=80.0,
                mixture="edmrt.lab.quality_gmm.mixture(64, seed): GaussianMixture.random(K=8, D=64, seed, spread=3.0)",
                held_out_noise="torch.Generator().manual_seed(10_000 + seed), randn(samples, 64)",
                training_noise="optimize_schedule(seed=1): randn(train_samples, 64)", rows=rows, fits=fits)


def markdown(res: dict) -> str:
    seeds, nfes = res["seeds"], res["nfes"]
    rows = res["rows"]
    by = {(r["seed"], r["nfe"], r["method"]): r for r in rows}
    fit_by = {(f["seed"], f["budget"], f["method"]): f for f in res["fits"]}
    best_peer = {(s, n): min((r for r in rows if r["seed"] == s and r["nfe"] == n and r["kind"] == "peer"),
                             key=lambda r: r["rmse"]) for s in seeds for n in nfes}
    med = lambda v: float(np.median(v))  # noqa: E731
    out = ["# Low-NFE endpoint error on the exact 64-D Gaussian mixture: edmrt vs the best peer", "",
           f"Machine: {res['machine']}; torch {res['torch']}; {res['date']}; {res['seconds']} s in all.",
           f"{res['samples']} held-out samples per mixture ({res['held_out_noise']}); mixture "
           f"{res['mixture']}.  RMSE to the exact ODE endpoint at sigma = 0, sigma_max = 80.", "",
           "edmrt: `opt = edmrt.optimize_schedule(den, nfe=n, candidates=FEW_STEP_CANDIDATES, samples="
           f"{res['train_samples']}, seed=1)`, then `edmrt.solve(den, noise, solver=opt.solver, steps=opt.steps, "
           "schedule=opt.sigmas, **opt.options)`.  Peers: their default Karras rho = 7 schedule.", "",
           "## Ratio edmrt / best peer (goal: <= 0.5)", "",
           "| NFE | " + " | ".join(f"seed {s}" for s in seeds) + " | median | max |",
           "|---|" + "---|" * (len(seeds) + 2)]
    for n in nfes:
        ratios = [by[(s, n, "recipe")]["ratio"] for s in seeds]
        out.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in ratios) + f" | **{med(ratios):.3f}** | {max(ratios):.3f} |")
    out += ["", "## RMSE: edmrt recipe (solver kept) / best peer", "",
            "| NFE | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for n in nfes:
        cells = []
        for s in seeds:
            f = fit_by[(s, n, "recipe")]
            opts = ",".join(str(v) for v in f["options"].values())
            cells.append(f"{by[(s, n, 'recipe')]['rmse']:.4f} {f['solver']}({opts}) / "
                         f"{best_peer[(s, n)]['rmse']:.4f} {best_peer[(s, n)]['method']}")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "## Cost of the fit (network evaluations: one sample at one sigma is one)", "",
            "| NFE | " + " | ".join(f"seed {s}" for s in seeds) + " | median | of which references |",
            "|---|" + "---|" * (len(seeds) + 2)]
    for n in nfes:
        costs = [fit_by[(s, n, "recipe")]["cost"] for s in seeds]
        out.append(f"| {n} | " + " | ".join(f"{c / 1e6:.2f}M" for c in costs) + f" | {med(costs) / 1e6:.2f}M | "
                   f"{fit_by[(seeds[0], n, 'recipe')]['reference_cost']} |")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "peer"))
    if len(methods) > 1:
        out += ["", "## Ablations: median (max) over seeds of the ratio to the best peer; fit cost median", "",
                "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for m in methods:
            cells = []
            for n in nfes:
                v = [by[(s, n, m)]["ratio"] for s in seeds if (s, n, m) in by]
                c = [by[(s, n, m)].get("cost") for s in seeds if (s, n, m) in by]
                cell = f"{med(v):.3f} ({max(v):.3f})"
                if c and c[0] is not None:
                    cell += f", {med(c) / 1e6:.2f}M"
                cells.append(cell)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "## Best peer per NFE (median RMSE over seeds)", "", "| NFE | peer | median RMSE |", "|---|---|---|"]
    for n in nfes:
        names = [best_peer[(s, n)]["method"] for s in seeds]
        out.append(f"| {n} | {', '.join(sorted(set(names)))} | {med([best_peer[(s, n)]['rmse'] for s in seeds]):.4f} |")
    out += ["", "## Fitted schedules (recipe)", ""]
    for n in nfes:
        for s in seeds:
            f = fit_by[(s, n, "recipe")]
            out.append(f"- NFE {n}, seed {s}: {f['solver']}{f['options']}, steps {f['steps']}: "
                       f"[{', '.join(f'{v:.4g}' for v in f['sigmas'])}]")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--train-samples", type=int, default=128)
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small batches: 1 avoids oversubscription)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "low_nfe_gmm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    res = run(args.seeds, args.nfes, args.samples, args.train_samples, args.ablations)
    write_json_md(args.out, res, markdown(res))
    log.info("wrote %s.json and .md", args.out)


if __name__ == "__main__":
    main()
