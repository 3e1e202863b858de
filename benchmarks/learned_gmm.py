"""Learned solvers on the exact Gaussian mixture: ``edmrt.optimize_solver`` against the best peer at 5 and 10 NFE.

Two sets of mixtures, reported apart:

- development: the five mixtures the fitter's defaults (budget split, sample counts, time shifts, free start)
  were chosen on: ``GaussianMixture.random(K=8, D, seed, spread=3.0)`` for (D, seed) in (64, 100), (32, 101),
  (128, 102), (16, 103), (8, 105);
- fresh: mixtures of other dimensions, component counts and seeds that no default was chosen on, drawn here.

For each mixture and NFE: every installed peer (k-diffusion, diffusers) on its Karras rho = 7 schedule, the best
one the baseline, and ``opt = edmrt.optimize_solver(den, nfe, (D,), seed=1)`` with its default budget (1M
evaluations, the teacher's and the backward passes included), then ``edmrt.solve(den, noise, **opt.solve_kwargs)``.
The fit sees only its own noise (generator seed 1) and its own teacher (DPM-Solver++(3M), 100 steps); the
evaluation noise is 1000 samples from generator seed 10_000 + mixture seed, and the RMSE is to the exact
probability-flow ODE endpoint (scipy DOP853, rtol 1e-10).

    python benchmarks/learned_gmm.py      # writes benchmarks/results/learned_gmm.{json,md}
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
from edmrt.lab.common import machine_name, write_json_md
from edmrt.lab.peers import available_peers
from edmrt.models.gmm import GaussianMixture

log = logging.getLogger("learned_gmm")

DEVELOPMENT = [("dev", 64, 8, 100), ("dev", 32, 8, 101), ("dev", 128, 8, 102), ("dev", 16, 8, 103), ("dev", 8, 8, 105)]
FRESH = [("fresh", 12, 5, 301), ("fresh", 24, 10, 302), ("fresh", 40, 8, 303), ("fresh", 96, 6, 304),
         ("fresh", 160, 12, 305)]
CHUNK = 250


def _mixture(kind: str, dim: int, k: int, seed: int) -> GaussianMixture:
    return GaussianMixture.random(K=k, D=dim, seed=seed, spread=3.0)


def _rmse(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x - exact).pow(2).mean().sqrt())


def run(cases, nfes) -> dict:
    peers = available_peers()
    if not peers:
        raise RuntimeError("no peer installed (k-diffusion, diffusers): nothing to compare against")
    rows, t_start = [], time.perf_counter()
    for kind, dim, k, seed in cases:
        g = _mixture(kind, dim, k, seed)
        noise = torch.randn(1000, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(10_000 + seed))
        exact = g.ode(80.0 * noise, 80.0, 0.0)
        for nfe in nfes:
            peer_rmse = {}
            for name, peer in peers.items():
                x = torch.cat([peer.run(g, 80.0 * noise[i:i + CHUNK], nfe)[0] for i in range(0, 1000, CHUNK)])
                peer_rmse[name] = _rmse(x, exact)
            best = min(peer_rmse, key=peer_rmse.get)
            opt = edmrt.optimize_solver(g, nfe, (dim,), seed=1)
            x = edmrt.solve(g, noise, **opt.solve_kwargs)
            e = _rmse(x, exact)
            rows.append(dict(set=kind, dim=dim, components=k, seed=seed, nfe=nfe, rmse=e, best_peer=best,
                             best_peer_rmse=peer_rmse[best], ratio=e / peer_rmse[best], peers=peer_rmse,
                             cost=opt.cost, evaluations=opt.evaluations, backward=opt.backward,
                             reference_cost=opt.reference_cost, loss=opt.loss, heldout_loss=opt.heldout_loss,
                             initial_loss=opt.initial_loss, seconds=opt.seconds, sigmas=opt.sigmas,
                             eval_sigmas=opt.eval_sigmas))
            log.info("%s D%d K%d seed %d NFE %d: learned %.4g, best peer %s %.4g, ratio %.3f, cost %d, %.0f s", kind,
                     dim, k, seed, nfe, e, best, peer_rmse[best], e / peer_rmse[best], opt.cost, opt.seconds)
    return dict(format="edmrt.learned_gmm", version=1, machine=machine_name(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                seconds=round(time.perf_counter() - t_start, 1), nfes=list(nfes), rows=rows,
                held_out_noise="torch.Generator().manual_seed(10_000 + seed), randn(1000, D)",
                fit="edmrt.optimize_solver(den, nfe, (D,), seed=1), default budget 1M")


def markdown(res: dict) -> str:
    med = lambda v: float(np.median(v))  # noqa: E731
    out = ["# Learned solvers on the exact Gaussian mixture: edmrt.optimize_solver vs the best peer", "",
           f"Machine: {res['machine']}; torch {res['torch']}; {res['date']}; {res['seconds']} s in all.",
           f"Fit: `{res['fit']}`; evaluation: {res['held_out_noise']}, RMSE to the exact ODE endpoint.", ""]
    for kind, title in (("dev", "Development mixtures (the defaults were chosen on these)"),
                        ("fresh", "Fresh mixtures (other D, K and seeds; never used to choose a default)")):
        rows = [r for r in res["rows"] if r["set"] == kind]
        if not rows:
            continue
        cases = list(dict.fromkeys((r["dim"], r["components"], r["seed"]) for r in rows))
        out += [f"## {title}: learned RMSE / best peer's (goal <= 0.25)", "",
                "| NFE | " + " | ".join(f"D{d} K{k} s{s}" for d, k, s in cases) + " | median | max |",
                "|---|" + "---|" * (len(cases) + 2)]
        by = {(r["dim"], r["components"], r["seed"], r["nfe"]): r for r in rows}
        for n in res["nfes"]:
            v = [by[c + (n,)]["ratio"] for c in cases]
            out.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in v) + f" | **{med(v):.3f}** | {max(v):.3f} |")
        out += ["", "| NFE | case | learned RMSE | best peer | its RMSE | fit cost (teacher / backward) | fit s |",
                "|---|---|---|---|---|---|---|"]
        for n in res["nfes"]:
            for d, k, s in cases:
                r = by[(d, k, s, n)]
                out.append(f"| {n} | D{d} K{k} s{s} | {r['rmse']:.4f} | {r['best_peer']} | {r['best_peer_rmse']:.4f} | "
                           f"{r['cost'] / 1e6:.2f}M ({r['reference_cost'] / 1e3:.0f}k / {r['backward'] / 1e3:.0f}k) | "
                           f"{r['seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfes", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--sets", nargs="+", default=["dev", "fresh"], choices=["dev", "fresh"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learned_gmm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cases = (DEVELOPMENT if "dev" in args.sets else []) + (FRESH if "fresh" in args.sets else [])
    res = run(cases, args.nfes)
    write_json_md(args.out, res, markdown(res))
    log.info("wrote %s.json and .md", args.out)


if __name__ == "__main__":
    main()
