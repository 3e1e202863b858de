"""Inversion measured (issue 25, item 1): the reconstruction error of real images per NFE, solver and kind.

Each of the 400 held-out digits of the test split (which neither the teacher nor the classifier saw) is inverted
by ``edmrt.invert`` (the probability-flow ODE run upward from sigma_min = 0.002 to 80, class-conditional on its true
label, no guidance) and sampled back with the plan it inverted; the table is the RMSE of the reconstruction (images
in [-1, 1]) and the seconds of both directions together.  The DDPM rows (``kind="ddpm"``: dpmpp_2m_sde, the schedule
stopping at sigma_min, edit-friendly noise maps) give the largest absolute error over all pixels as well.  On the exact Gaussian mixture (64-D, 8 components, 400
samples), the same inversion's endpoint against the exact upward ODE (scipy DOP853, rtol 1e-10), relative RMSE.

    python benchmarks/inversion.py     # writes benchmarks/results/inversion_digits.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm")
DDPM = "ddpm dpmpp_2m_sde"
STEPS = (5, 10, 20, 50)


def digits_rows(backend: str) -> list[dict]:
    import edmrt
    from edmrt.lab.common import load_digits_split

    x, y = load_digits_split("test")
    images, labels = torch.as_tensor(x).float(), [int(v) for v in y]
    model = edmrt.load("digits")
    rows = []
    for solver in SOLVERS:
        for steps in STEPS:
            t0 = time.perf_counter()
            inv = edmrt.invert(model, images, solver=solver, steps=steps, cond=labels, backend=backend)
            rec = edmrt.Sampler(model, backend=backend, **inv.sampler_args).sample(
                range(len(labels)), cond=labels, inversion=inv)
            seconds = time.perf_counter() - t0
            err = (rec - images).pow(2).flatten(1).mean(1).sqrt()
            rows.append(dict(solver=solver, steps=steps, nfe_inversion=inv.nfe,
                             rmse=float(err.mean()), rmse_max=float(err.max()), seconds=round(seconds, 2)))
    for steps in STEPS:
        t0 = time.perf_counter()
        inv = edmrt.invert(model, images, kind="ddpm", steps=steps, cond=labels, backend=backend)
        rec = edmrt.Sampler(model, backend=backend, **inv.sampler_args).sample(
            range(len(labels)), cond=labels, inversion=inv)
        seconds = time.perf_counter() - t0
        err = (rec - images).pow(2).flatten(1).mean(1).sqrt()
        rows.append(dict(solver=DDPM, steps=steps, nfe_inversion=inv.nfe, rmse=float(err.mean()),
                         rmse_max=float(err.max()), max_abs=float((rec - images).abs().max()),
                         seconds=round(seconds, 2)))
    return rows


def mixture_rows() -> list[dict]:
    import edmrt
    from edmrt import schedules
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=8, D=64, seed=0)
    x0 = g.sample(400, seed=1)
    exact = g.ode(x0, 0.002, 80.0)
    scale = exact.pow(2).mean().sqrt().item()
    rows = []
    for solver in SOLVERS:
        for steps in STEPS:
            plan = edmrt.plan(solver, schedules.upward(edmrt.make_sigmas("karras", steps), 0.002))
            x = edmrt.execute(plan, lambda x, s: g.denoise(x, s), x0.clone())
            rows.append(dict(solver=solver, steps=steps, nfe=plan.nfe,
                             relative_rmse=(x - exact).pow(2).mean().sqrt().item() / scale))
    return rows


def table(digits: list[dict], mixture: list[dict]) -> str:
    by = {(r["solver"], r["steps"]): r for r in digits}
    mx = {(r["solver"], r["steps"]): r for r in mixture}
    head = "| solver | " + " | ".join(f"{s} steps" for s in STEPS) + " |"
    out = ["Digits, reconstruction RMSE (inversion NFE; seconds for 400 images, both ways):", "", head,
           "|---|" + "---|" * len(STEPS)]
    for solver in SOLVERS:
        cells = [f"{by[solver, s]['rmse']:.4f} ({by[solver, s]['nfe_inversion']}; {by[solver, s]['seconds']} s)"
                 for s in STEPS]
        out.append(f"| {solver} | " + " | ".join(cells) + " |")
    cells = [f"{by[DDPM, s]['rmse']:.1e}, max {by[DDPM, s]['max_abs']:.1e} ({by[DDPM, s]['nfe_inversion']}; "
             f"{by[DDPM, s]['seconds']} s)" for s in STEPS]
    out.append(f"| {DDPM} | " + " | ".join(cells) + " |")
    out += ["", "Gaussian mixture, inversion endpoint against the exact upward ODE, relative RMSE:", "", head,
            "|---|" + "---|" * len(STEPS)]
    for solver in SOLVERS:
        out.append(f"| {solver} | " + " | ".join(f"{mx[solver, s]['relative_rmse']:.2e}" for s in STEPS) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.common import cpu_flags, machine_name

    t0 = time.perf_counter()
    digits, mixture = digits_rows(args.backend), mixture_rows()
    result = {"benchmark": "inversion", "machine": machine_name(), "cpu_flags": cpu_flags(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "backend": args.backend,
              "seconds": round(time.perf_counter() - t0, 1), "digits": digits, "mixture": mixture}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inversion_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    md = "\n".join([f"# Inversion ({result['machine']}, {result['date']}, backend {args.backend})", "",
                    __doc__.split("\n\n")[1].replace("\n", " "), "", table(digits, mixture), ""])
    (out / "inversion_digits.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
