"""Flow matching on the exact Gaussian mixture (issue 26, item 5): solver error per NFE under the flow
parameterisation, against the exact probability-flow ODE.

A mixture's exact denoiser D becomes a rectified-flow velocity network: at flow time t the network sees
x_t = x / (1 + sigma) and returns v = (x_t - D(x; sigma)) / t, with sigma = t / (1 - t) (``FlowPrecond``, the form of
SD3's transformers).  Sampling starts at the flow's t = 1 (edmrt's level FLOW_T_MAX, sigma 1.7e7) from seeded
noise.  The reference is the mixture's exact ODE from the same start (scipy DOP853, rtol 1e-10).  The score is the
relative endpoint RMSE, median over 5 mixtures (64-D, 8 components, seeds 100-104, which no test or recipe used),
256 samples each.  Schedules: "flow" with SD3's shift 3 and with shift 1 (diffusers' FlowMatchEulerDiscreteScheduler
levels), and, for contrast, the same mixture as an EDM model (``EDMPrecond``, Karras schedule from sigma 80,
where the initial state's distance from the ODE's start at sigma = infinity is below the reported errors).

    python benchmarks/flow_gmm.py     # writes benchmarks/results/flow_gmm.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

SOLVERS = ("euler", "dpmpp_2m", "dpmpp_3m", "unipc")
STEPS = (5, 10, 20, 40)
SEEDS = (100, 101, 102, 103, 104)


def flow_model(gmm, shift: float):
    import edmrt
    from edmrt.precond import FlowPrecond
    from edmrt.schedules import flow_sigma

    def net(x_in, c_noise):
        t = c_noise.reshape(-1, 1).double() / 1000.0
        xt = x_in.double()
        return ((xt - gmm.denoise(xt / (1 - t), (t / (1 - t)).reshape(-1))) / t).float()

    return edmrt.Model(net, FlowPrecond(), sample_shape=(gmm.D,), sigma_min=float(flow_sigma(1e-3)),
                       sigma_max=float(flow_sigma(1.0)),
                       metadata={"sampling": {"solver": "euler", "steps": 10, "schedule": "flow", "shift": shift}})


def edm_model(gmm):
    import edmrt

    return edmrt.Model(lambda x_in, c_noise: gmm.denoise(x_in, c_noise.reshape(-1)), edmrt.precond.Identity(),
                       sample_shape=(gmm.D,), sigma_min=0.002, sigma_max=80.0)


def run(samples: int) -> dict:
    import edmrt

    rows = []
    for seed in SEEDS:
        gmm = edmrt.models.GaussianMixture.random(K=8, D=64, seed=seed)
        noise = torch.randn(samples, gmm.D, generator=torch.Generator().manual_seed(seed))
        cases = [("flow, shift 3", flow_model(gmm, 3.0)), ("flow, shift 1", flow_model(gmm, 1.0)),
                 ("EDM, Karras from 80", edm_model(gmm))]
        exact = {}
        for name, model in cases:
            s0 = model.sigma_max
            if s0 not in exact:
                exact[s0] = gmm.ode(noise.double() * s0, s0, 0.0)
            ref = exact[s0]
            for solver in SOLVERS:
                for steps in STEPS:
                    x = edmrt.Sampler(model, solver=solver, steps=steps, backend="torch").sample(
                        range(samples), noise=noise)
                    err = ((x.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
                    rows.append(dict(seed=seed, model=name, solver=solver, steps=steps, rel_rmse=err))
        print(f"mixture {seed} done", flush=True)
    return {"rows": rows}


def table(rows: list[dict]) -> str:
    lines = ["| parameterisation, schedule | solver | " + " | ".join(f"{n} steps" for n in STEPS) + " |",
             "|---|---|" + "---|" * len(STEPS)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for solver in SOLVERS:
            med = [statistics.median(r["rel_rmse"] for r in rows if r["model"] == model and r["solver"] == solver
                                     and r["steps"] == n) for n in STEPS]
            lines.append(f"| {model} | {solver} | " + " | ".join(f"{m:.2e}" for m in med) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from edmrt.lab.common import machine_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("-o", "--out", default=str(Path(__file__).resolve().parent / "results" / "flow_gmm"))
    args = ap.parse_args(argv)
    result = run(args.samples)
    result.update(machine=machine_name(), date=datetime.date.today().isoformat(), samples=args.samples,
                  mixtures=list(SEEDS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    md = (f"# Flow matching on the exact Gaussian mixture ({result['machine']}, {result['date']})\n\n"
          + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\nRelative endpoint RMSE against the exact ODE, median "
          f"over {len(SEEDS)} mixtures, {args.samples} samples each:\n\n" + table(result["rows"]) + "\n")
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
