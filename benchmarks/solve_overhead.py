"""``edmrt.solve`` against diffusers' EDM scheduler loops with a zero-cost denoiser (issue 16, item 4): what a step
of the sampler itself costs when the network costs nothing.

The denoiser returns one preallocated constant tensor (no arithmetic, no allocation), the same for every contender.
Contenders, interleaved in every round, medians over the rounds, time per step (one network evaluation):

  edmrt.solve          ``edmrt.solve(den, noise, solver, steps)``: plan (cached), engine, fused C++ step
  diffusers            ``EDMDPMSolverMultistepScheduler`` (solver_order 2) / ``EDMEulerScheduler``: set_timesteps,
                       then per step scale_model_input, precondition_outputs and step (``edmrt.lab.peers``)
  bare fused step      the ``Stepper`` call alone on the same buffers (the floor of the engine's loop)

    python benchmarks/solve_overhead.py       # writes benchmarks/results/solve_overhead.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

PEER = {"dpmpp_2m": "diffusers:EDMDPMSolver(2)", "euler": "diffusers:EDMEuler"}


def _contenders(solver: str, steps: int, shape):
    import edmrt
    from edmrt.kernels import Stepper, plan_table
    from edmrt.lab.peers import available_peers

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    D0 = torch.zeros(shape)
    den = lambda x, sigma: D0  # noqa: E731
    peer = available_peers()[PEER[solver]]
    nfe = edmrt.plan(solver, edmrt.make_sigmas("karras", steps)).nfe
    plan = edmrt.plan(solver, edmrt.make_sigmas("karras", steps))
    B = shape[0]
    bufs = [torch.zeros(shape) for _ in range(3)] + [torch.zeros((plan.history,) + tuple(shape))]
    x, x_eval, x_in, Y = bufs
    sigma_in, seeds = torch.zeros(B), torch.zeros(B, dtype=torch.int64)
    step = Stepper(plan_table(plan, torch.device("cpu")), x, x_eval, Y, x_in, sigma_in, seeds)

    def bare():
        for s in range(plan.stages):
            step(s, D0)

    return nfe, {"edmrt.solve": lambda: edmrt.solve(den, noise, solver=solver, steps=steps),
                 f"diffusers ({PEER[solver].split(':')[1]})": lambda: peer.run(den, noise * 80.0, nfe)[0],
                 "bare fused step": bare}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.common import cpu_flags, machine_name

    shape = (64, 3, 32, 32)
    rows = []
    for solver in ("dpmpp_2m", "euler"):
        for steps in (10, 50):
            nfe, calls = _contenders(solver, steps, shape)
            for fn in calls.values():
                fn()
            times = {k: [] for k in calls}
            for _ in range(args.rounds):
                for k, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            us = {k: 1e6 * statistics.median(v) / nfe for k, v in times.items()}
            peer = next(k for k in us if k.startswith("diffusers"))
            row = {"solver": solver, "steps": steps, "nfe": nfe, "us_per_step": us,
                   "speedup_vs_diffusers": us[peer] / us["edmrt.solve"],
                   "solve_over_bare_step": us["edmrt.solve"] / us["bare fused step"]}
            rows.append(row)
            print(solver, steps, {k: round(v, 1) for k, v in us.items()},
                  f"speed-up {row['speedup_vs_diffusers']:.2f}x", flush=True)
    result = {"benchmark": "solve_overhead", "machine": machine_name(), "cpu_flags": cpu_flags(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "shape": list(shape),
              "rounds": args.rounds, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "solve_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# `edmrt.solve` with a zero-cost denoiser ({result['machine']}, torch {result['torch']}, "
          f"{result['date']})", "",
          f"State {tuple(shape)}, float32; the denoiser returns a preallocated constant tensor. {args.rounds} "
          "interleaved rounds, medians, per step (network evaluation).", "",
          "| solver | steps | edmrt.solve µs/step | diffusers µs/step | bare fused step µs | speed-up vs diffusers "
          "| solve / bare step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r["us_per_step"]
        peer = next(k for k in us if k.startswith("diffusers"))
        md.append(f"| {r['solver']} | {r['steps']} | {us['edmrt.solve']:.0f} | {us[peer]:.0f} | "
                  f"{us['bare fused step']:.0f} | {r['speedup_vs_diffusers']:.2f}x | {r['solve_over_bare_step']:.2f} |")
    (out / "solve_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
