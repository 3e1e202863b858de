"""Learned solvers on the bundled digits teacher: FD-train and class accuracy at 3, 4, 5 and 8 NFE against the best
hand-designed solver within the same budget and against the teacher's Heun at 35 NFE.

For each NFE: ``opt = edmrt.optimize_solver(edmrt.load("digits"), nfe, seed=1, budget=BUDGET)`` (class labels
0-9 cycled over the fit's noises, no guidance, as the quality protocol samples; the teacher is the same network
solved by DPM-Solver++(3M) at 100 steps), saved as a plan file, then ``edmrt quality --model digits`` 's protocol
(``edmrt.lab.quality_digits``: 5 blocks of 197 class-conditional samples, FD against the training split and the
test split, the digits classifier's accuracy) on the learned plans and on euler, heun, dpmpp_2m, ipndm and unipc.

    python benchmarks/learned_digits.py               # writes benchmarks/results/learned_digits.{json,md}
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import edmrt
from edmrt.lab.common import write_json_md
from edmrt.lab.quality_digits import TEACHER_SOLVERS, run_quality_digits


def run(nfes, budget: int, blocks: int) -> dict:
    model = edmrt.load("digits")
    fits, paths = [], []
    tmp = Path(tempfile.mkdtemp(prefix="edmrt-learned-"))
    for nfe in nfes:
        opt = edmrt.optimize_solver(model, nfe, seed=1, budget=budget, progress=True)
        paths.append(opt.save(tmp / f"digits_nfe{nfe}.json"))
        fits.append(dict(nfe=nfe, cost=opt.cost, evaluations=opt.evaluations, backward=opt.backward,
                         reference_cost=opt.reference_cost, loss=opt.loss, heldout_loss=opt.heldout_loss,
                         initial_loss=opt.initial_loss, seconds=opt.seconds, sigmas=opt.sigmas,
                         eval_sigmas=opt.eval_sigmas, plan=opt.plan.to_dict()))
    t0 = time.perf_counter()
    res = run_quality_digits("digits", None, nfes=tuple(nfes) + (35,), solvers=TEACHER_SOLVERS, blocks=blocks,
                             learned=paths)
    res.update(benchmark="learned_digits", budget=budget, fits=fits, quality_seconds=round(time.perf_counter() - t0, 1))
    return res


def markdown(res: dict) -> str:
    rows = res["rows"]
    heun35 = next(r for r in rows if r["solver"] == "heun" and r["nfe"] == 35)
    out = ["# Learned solvers on the digits teacher: FD-train and class accuracy", "",
           f"Machine: {res['machine']}; torch {res['torch']}; {res['date']}.  Fit budget {res['budget']} evaluations "
           f"per NFE (teacher and backward passes included); {res['blocks']} blocks of {res['samples_per_block']} "
           "samples per row (edmrt.lab.quality_digits).", "",
           f"Teacher Heun at 35 NFE: FD-train {heun35['fd_train']:.2f} ± {heun35['fd_train_std']:.2f}, "
           f"accuracy {heun35['class_accuracy']:.3f}; floor FD-train {res['fd_train_floor']:.2f}.", "",
           "| NFE | learned FD-train | / Heun-35 (goal at 4 NFE: <= 1.3) | accuracy | best hand-designed (NFE) | "
           "its FD-train | its accuracy | fit cost | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for f in res["fits"]:
        n = f["nfe"]
        lr = next(r for r in rows if r["role"] == "learned" and r["nfe"] == n)
        hand = min((r for r in rows if r["role"] == "teacher" and r["nfe"] <= n), key=lambda r: r["fd_train"])
        out.append(f"| {n} | {lr['fd_train']:.2f} ± {lr['fd_train_std']:.2f} | {lr['fd_train'] / heun35['fd_train']:.2f} | "
                   f"{lr['class_accuracy']:.3f} | {hand['solver']} ({hand['nfe']}) | {hand['fd_train']:.2f} ± "
                   f"{hand['fd_train_std']:.2f} | {hand['class_accuracy']:.3f} | {f['cost'] / 1e6:.2f}M | "
                   f"{f['seconds']:.0f} |")
    out += ["", "Fitted levels (sigma_0 .. 0):", ""]
    out += [f"- NFE {f['nfe']}: [{', '.join(f'{v:.4g}' for v in f['sigmas'])}]" for f in res["fits"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfes", type=int, nargs="+", default=[3, 4, 5, 8])
    ap.add_argument("--budget", type=int, default=300_000)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learned_digits")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.nfes, args.budget, args.blocks)
    write_json_md(args.out, res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
