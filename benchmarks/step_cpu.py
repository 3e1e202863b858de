"""CPU fused step against the reference torch step, diffusers' step(), k-diffusion's loop body and a
memory copy of the same bytes; interleaved rounds, medians, ratios.  Writes benchmarks/results/step_cpu.{json,md}.

    python benchmarks/step_cpu.py [--rounds 15] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import edmrt
from edmrt import kernels as Kn
from edmrt.lab.common import machine_name

RESULTS = Path(__file__).resolve().parent / "results"


def _buffers(plan, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    return dict(table=Kn.plan_table(plan), x=torch.randn(shape, generator=g), x_eval=torch.randn(shape, generator=g),
                F=torch.randn(shape, generator=g), Y=torch.randn((plan.history,) + shape, generator=g),
                x_in=torch.empty(shape), sigma_in=torch.empty(B), seeds=torch.arange(B, dtype=torch.int64))


def bytes_moved(plan, shape, stage) -> int:
    """Bytes the fused step must move (``edmrt.kernels.reference.bytes_moved``: x only where a != 0, Y[s] only
    when K > 1)."""
    from edmrt.kernels.reference import bytes_moved as count

    return count(plan, stage, math.prod(shape))


def cases(shape):
    """name -> (callable, bytes moved); each callable runs one stage (one network evaluation's worth of update)."""
    import diffusers
    from edmrt.lab.peers import load_k_diffusion_sampling

    out = {}
    s = edmrt.make_sigmas("karras", 18)
    pre = edmrt.EDMPrecond()
    euler = edmrt.plan("euler", s, pre)
    dpm = edmrt.plan("dpmpp_2m", s, pre)
    stage = 5
    for name, plan in (("euler", euler), ("dpmpp_2m", dpm)):
        b = _buffers(plan, shape)
        step = Kn.Stepper(b["table"], b["x"], b["x_eval"], b["Y"], b["x_in"], b["sigma_in"], b["seeds"], impl="cpp")
        out[f"edmrt C++ fused ({name})"] = (lambda step=step, F=b["F"]: step(stage, F), bytes_moved(plan, shape, stage))
        out[f"edmrt torch reference ({name})"] = (
            lambda b=b: Kn.fused_step(stage=stage, impl="reference", check=False, **b), bytes_moved(plan, shape, stage))
    nbytes = bytes_moved(euler, shape, stage)
    src = torch.randn(nbytes // 8)
    dst = torch.empty_like(src)
    out["memory copy (same bytes)"] = (lambda: dst.copy_(src), nbytes)

    # diffusers: the pipeline's per-step work around the network: step() (D from F, the update) and
    # scale_model_input() for the next input, with the step index reset each call.
    g = torch.Generator().manual_seed(1)
    x, F = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    warnings.filterwarnings("ignore")
    for name, sched in (("euler", diffusers.EDMEulerScheduler()),
                        ("dpmpp_2m", diffusers.EDMDPMSolverMultistepScheduler(solver_order=2))):
        sched.set_timesteps(18)
        t = sched.timesteps[stage]
        sched.scale_model_input(x, t)
        if name == "dpmpp_2m":
            sched._step_index = stage - 1
            sched.step(F, sched.timesteps[stage - 1], x)  # fill its history
        def run(sched=sched, t=t):
            sched._step_index = stage
            if hasattr(sched, "lower_order_nums"):
                sched.lower_order_nums = 1
            y = sched.step(F, t, x).prev_sample
            sched.scale_model_input(y, sched.timesteps[stage + 1])
        out[f"diffusers step() ({name})"] = (run, nbytes)

    K = load_k_diffusion_sampling()
    if K is not None:
        c_skip, c_out, c_in, _ = (float(c[0]) for c in pre.coefficients(torch.tensor([s[stage]]).numpy()))
        sigma, sigma_next = torch.tensor(s[stage], dtype=torch.float32), float(s[stage + 1])
        xk = torch.randn(shape, generator=g)

        def kbody():
            # k-diffusion's Denoiser wrapper (x c_skip + F c_out) and sample_euler's loop body
            # (it draws randn_like every step even with s_churn = 0), then the next model input.
            denoised = F * c_out + xk * c_skip
            eps = torch.randn_like(xk) * 1.0  # noqa: F841
            d = K.to_d(xk, sigma, denoised)
            y = xk + d * (sigma_next - float(sigma))
            return y * c_in
        out["k-diffusion loop body (euler)"] = (kbody, nbytes)
    return out


def measure(shape, rounds: int, inner: int) -> list[dict]:
    fns = cases(shape)
    times = {k: [] for k in fns}
    for fn, _ in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(rounds):  # interleaved: every case once per round
        for k, (fn, _) in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    rows = []
    for k, (_, nb) in fns.items():
        med = statistics.median(times[k])
        rows.append(dict(case=k, shape=list(shape), median_us=med * 1e6, gbps=nb / med / 1e9, bytes=nb))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    from edmrt import _core

    result = dict(machine=machine_name(), torch=torch.__version__, threads=torch.get_num_threads(), isa=_core.step_isa(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rounds=rounds, rows=[])
    md = [f"# CPU fused step ({result['machine']}, torch {result['torch']}, {rounds} interleaved rounds, medians)", "",
          f"The update's instruction set: {result['isa']}. The edmrt rows time the `Stepper` call from Python (what an "
          "engine loop pays); the copy is torch's `copy_` of the same number of bytes.", ""]
    # Few-step sampling's small states (batch 1: one CIFAR image, one SD latent) and the batched ones.
    for shape in [(1, 3, 32, 32), (1, 4, 64, 64), (64, 3, 32, 32), (4, 4, 128, 128)]:
        rows = measure(shape, rounds, args.inner)
        by = {r["case"]: r for r in rows}
        ours = {m: by[f"edmrt C++ fused ({m})"]["median_us"] for m in ("euler", "dpmpp_2m")}
        for r in rows:
            m = "dpmpp_2m" if "dpmpp_2m" in r["case"] else "euler"
            r["ratio_to_edmrt_cpp"] = r["median_us"] / ours[m]
        copy = by["memory copy (same bytes)"]["median_us"]
        result["rows"] += rows
        md += [f"## shape {shape}", "", "| case | median µs | GB/s | time / edmrt C++ (same method) |", "|---|---|---|---|"]
        md += [f"| {r['case']} | {r['median_us']:.1f} | {r['gbps']:.2f} | {r['ratio_to_edmrt_cpp']:.2f} |" for r in rows]
        md += ["", f"edmrt C++ fused euler / memory copy of the same bytes: {ours['euler'] / copy:.2f}", ""]
        print("\n".join(md[-len(rows) - 5:]), file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    if not args.quick:
        (RESULTS / "step_cpu.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "step_cpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
