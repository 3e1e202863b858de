"""Whole-loop throughput on the CPU: edmrt's engine (ONNX Runtime or torch backend + C++ fused step)
against a diffusers-style loop (torch eager network + EDMEulerScheduler) and k-diffusion's sample_euler,
same network, same NFE, same initial noise; plus the engine's overhead over NFE bare forwards.
Interleaved rounds, medians.  Writes benchmarks/results/engine_cpu.{json,md}.

    python benchmarks/engine_cpu.py [--rounds 3] [--quick] [--case cifar10:64:3 ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import edmrt
from edmrt import Model, Sampler
from edmrt.kernels.philox import INITIAL_STREAM, philox_normal
from edmrt.models.unet import build_unet
from edmrt.lab.common import machine_name

RESULTS = Path(__file__).resolve().parent / "results"


def loops(net, batch, steps):
    """name -> callable returning samples; all start from the same Philox noise."""
    import diffusers
    from edmrt.lab.peers import load_k_diffusion_sampling

    shape = net.sample_shape
    model = Model(net, edmrt.EDMPrecond(), sample_shape=shape)
    seeds = list(range(batch))
    noise = philox_normal(seeds, INITIAL_STREAM, shape)
    pre = edmrt.EDMPrecond()
    out = {}
    for backend in ("onnxruntime", "torch"):
        smp = Sampler(model, solver="euler", steps=steps, backend=backend)
        out[f"edmrt engine ({backend})"] = lambda smp=smp: smp.sample(seeds)

    def diffusers_loop():
        sched = diffusers.EDMEulerScheduler()
        sched.set_timesteps(steps)
        x = noise * float(sched.sigmas[0])  # the same initial state as edmrt (not init_noise_sigma)
        with torch.inference_mode():
            for t in sched.timesteps:
                x_in = sched.scale_model_input(x, t)
                F = net(x_in, t.reshape(1).expand(batch).float(), None)
                x = sched.step(F, t, x).prev_sample
        return x
    out["diffusers-style loop (EDMEulerScheduler)"] = diffusers_loop

    K = load_k_diffusion_sampling()
    if K is not None:
        sig = torch.from_numpy(edmrt.make_sigmas("karras", steps)).float()

        def kdiff_loop():
            def den(x, sigma):
                s = sigma.double().numpy()
                c_skip, c_out, c_in, c_noise = (torch.from_numpy(c).float().reshape(-1, 1, 1, 1)
                                                for c in pre.coefficients(s))
                return c_skip * x + c_out * net(c_in * x, c_noise.reshape(-1), None)
            with torch.inference_mode():
                return K.sample_euler(den, noise * sig[0], sig, disable=True)
        out["k-diffusion sample_euler"] = kdiff_loop
    return out, model


def bare_forward(net, model, batch, backend):
    """One network evaluation through the same backend the engine used, on static buffers."""
    from edmrt.backends import resolve_backend

    _, be = resolve_backend(backend, model, torch.device("cpu"))
    x = torch.randn(batch, *net.sample_shape)
    c = torch.zeros(batch)
    out = torch.empty_like(x)
    return lambda: be(x, c, None, out)


def measure(config, batch, steps, rounds):
    torch.manual_seed(0)
    net = build_unet(config).eval()
    fns, model = loops(net, batch, steps)
    fns = dict(fns)
    fns["bare forward x NFE (onnxruntime)"] = bare_forward(net, model, batch, "onnxruntime")
    fns["bare forward x NFE (torch)"] = bare_forward(net, model, batch, "torch")
    results = {k: fn() for k, fn in fns.items()}  # warm-up (exports, compiles) and outputs
    ref = results["diffusers-style loop (EDMEulerScheduler)"]
    agree = {k: float((v - ref).abs().max()) for k, v in results.items() if not k.startswith("bare")}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            reps = steps if k.startswith("bare") else 1
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    peers = [k for k in med if "diffusers" in k or "k-diffusion" in k]
    best_peer = min(peers, key=lambda k: med[k])
    rows = []
    for k, t in med.items():
        row = dict(config=config, batch=batch, nfe=steps, case=k, seconds=t, images_per_s=batch / t,
                   max_abs_diff_vs_diffusers=agree.get(k))
        if k.startswith("edmrt"):
            backend = k.split("(")[1].rstrip(")")
            row["speedup_vs_best_peer"] = med[best_peer] / t
            row["best_peer"] = best_peer
            row["overhead_vs_bare_forwards"] = t / med[f"bare forward x NFE ({backend})"]
        rows.append(row)
    return rows


def markdown(result: dict) -> list[str]:
    md = [f"# Whole sampling loop on the CPU ({result['machine']}, torch {result['torch']}, "
          f"{result['rounds']} interleaved rounds, medians; Euler, same network, same NFE, same initial noise)", "",
          "| UNet | batch | NFE | loop | s | images/s | speed-up vs best peer | overhead vs NFE bare forwards | "
          "max abs diff vs diffusers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp = f"{r['speedup_vs_best_peer']:.2f}" if "speedup_vs_best_peer" in r else ""
        ov = f"{r['overhead_vs_bare_forwards']:.3f}" if "overhead_vs_bare_forwards" in r else ""
        ag = "" if r["max_abs_diff_vs_diffusers"] is None else f"{r['max_abs_diff_vs_diffusers']:.1e}"
        md.append(f"| {r['config']} | {r['batch']} | {r['nfe']} | {r['case']} | {r['seconds']:.3f} | "
                  f"{r['images_per_s']:.2f} | {sp} | {ov} | {ag} |")
    return md


def _case(text: str):
    try:
        config, batch, nfe = text.split(":")
        return config, int(batch), int(nfe)
    except ValueError:
        raise SystemExit(f"--case must look like CONFIG:BATCH:NFE (e.g. cifar10:64:3), got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", action="append", type=_case, metavar="CONFIG:BATCH:NFE",
                    help="run only these cases and merge them into the committed results (replacing the same "
                         "config and batch)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    cases = args.case or [("tiny", 1, 10), ("tiny", 64, 10), ("cifar10", 1, 10), ("cifar10", 64, 3)]
    if args.quick:
        cases = [("tiny", 1, 4)]
    result = dict(machine=machine_name(), torch=torch.__version__, threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rounds=args.rounds, rows=[])
    for config, batch, steps in cases:
        rows = measure(config, batch, steps, args.rounds)
        result["rows"] += rows
        print("\n".join(markdown({**result, "rows": rows})[4:]), file=sys.stderr, flush=True)
    path = RESULTS / "engine_cpu.json"
    if args.case and path.exists():  # merge: keep the other cases' rows (and say when each was measured)
        old = json.loads(path.read_text())
        new_keys = {(r["config"], r["batch"]) for r in result["rows"]}
        for r in result["rows"]:
            r["date"] = result["date"]
        kept = [dict(r, date=r.get("date", old["date"])) for r in old["rows"] if (r["config"], r["batch"]) not in new_keys]
        order = {k: i for i, k in enumerate(["tiny", "cifar10"])}
        result["rows"] = sorted(kept + result["rows"], key=lambda r: (order.get(r["config"], 9), r["batch"]))
        result["rounds"] = args.rounds if old.get("rounds") == args.rounds else f"{old.get('rounds')} / {args.rounds}"
    md = markdown(result)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        (RESULTS / "engine_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
