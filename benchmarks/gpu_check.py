"""The GPU check: correctness of the Triton kernel on CUDA and the fused step's bandwidth.

Run by benchmarks/gpu_check.sh; writes gpu_check_<device>.json to $OUT (when set) or
benchmarks/results/.  Needs only torch, triton and numpy.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def engine_latency(dev, rounds: int = 5) -> dict:
    """Batch-1 latency of a 35-NFE Heun run on the CIFAR-sized UNet: whole-loop CUDA graph vs the eager engine vs a
    diffusers-style eager loop, and the graph's overhead over 35 graph-replayed bare forwards."""
    try:
        import diffusers
    except ImportError:  # the lent image may not carry diffusers: an eager torch Euler loop does the same work
        diffusers = None

    import edmrt
    from edmrt import Engine, Model
    from edmrt.backends import TorchBackend
    from edmrt.models.unet import build_unet

    torch.manual_seed(0)
    net = build_unet("cifar10").to(dev).eval()
    model = Model(net, edmrt.EDMPrecond(), sample_shape=net.sample_shape)
    plan = edmrt.plan("heun", edmrt.make_sigmas("karras", 18), model.precond)
    be = TorchBackend(net)
    graph = Engine(be, plan, 1, net.sample_shape, dev, graph=True)
    eager = Engine(be, plan, 1, net.sample_shape, dev, graph=False)
    seeds = torch.tensor([7], device=dev)
    x_in = torch.randn(1, *net.sample_shape, device=dev)
    c = torch.zeros(1, device=dev)
    out = torch.empty_like(x_in)
    g = torch.cuda.CUDAGraph()
    for _ in range(3):
        be(x_in, c, None, out)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        be(x_in, c, None, out)

    sig = torch.tensor(edmrt.make_sigmas("karras", 35), device=dev, dtype=torch.float32)

    def eager_loop():
        """An eager per-step loop as peers run it: preconditioning, network and update as separate torch ops."""
        x = torch.randn(1, *net.sample_shape, device=dev) * sig[0]
        with torch.inference_mode():
            for i in range(35):
                s = sig[i]
                c_in, c_skip = 1 / torch.sqrt(s ** 2 + 0.25), 0.25 / (s ** 2 + 0.25)
                c_out = s * 0.5 / torch.sqrt(s ** 2 + 0.25)
                D = c_skip * x + c_out * net(c_in * x, (0.25 * torch.log(s)).reshape(1), None)
                x = x + (sig[i + 1] - s) * (x - D) / s
        return x

    def diffusers_loop():
        if diffusers is None:
            return eager_loop()
        sched = diffusers.EDMEulerScheduler()
        sched.set_timesteps(35)  # 35 Euler steps = 35 NFE, the same network work as Heun's 35
        x = torch.randn(1, *net.sample_shape, device=dev) * float(sched.sigmas[0])
        with torch.inference_mode():
            for t in sched.timesteps:
                F = net(sched.scale_model_input(x, t), t.reshape(1).to(dev).float(), None)
                x = sched.step(F, t, x).prev_sample
        return x

    def bare():
        for _ in range(plan.nfe):
            g.replay()

    fns = {"edmrt whole-loop CUDA graph": lambda: graph.run(seeds), "edmrt eager engine": lambda: eager.run(seeds),
           "diffusers-style eager loop (35 NFE)": diffusers_loop, "35 graph-replayed bare forwards": bare}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    ours = med["edmrt whole-loop CUDA graph"]
    res = dict(ms=med, diffusers_installed=diffusers is not None, speedup_vs_diffusers=med["diffusers-style eager loop (35 NFE)"] / ours,
               overhead_vs_bare=ours / med["35 graph-replayed bare forwards"], nfe=plan.nfe)
    print(f"engine latency (batch 1, 35 NFE, cifar10 UNet): {med}; speed-up vs diffusers-style "
          f"{res['speedup_vs_diffusers']:.2f}x; overhead vs bare {res['overhead_vs_bare']:.3f}", flush=True)
    return res


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    from edmrt.lab.selfcheck import compare_impls, measure_bandwidth, philox_bits_match

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    rows = compare_impls("triton", dev, f_dtypes=(torch.float32, torch.float16, torch.bfloat16))
    result["triton_vs_reference"] = dict(cases=len(rows), failed=[r for r in rows if not r["ok"]],
                                         max_rel_err=max(r["rel_err"] for r in rows))
    result["philox"] = philox_bits_match(dev)
    print(f"correctness: {len(rows)} cases, {len(result['triton_vs_reference']['failed'])} failed, max rel err "
          f"{result['triton_vs_reference']['max_rel_err']:.2e}; philox {result['philox']}", flush=True)
    bw = []
    for shape in [(64, 3, 32, 32), (4, 4, 128, 128), (64, 4, 128, 128), (8, 16, 128, 128)]:
        for solver in ("euler", "dpmpp_2m", "unipc"):
            r = measure_bandwidth("triton", dev, shape, solver)
            bw.append(r)
            print(f"fused step {solver:9s} {str(shape):20s} {r['step_us']:8.1f} us {r['step_gbps']:7.1f} GB/s; "
                  f"copy {r['copy_gbps']:7.1f} GB/s; step/copy {r['step_over_copy']:.2f}", flush=True)
    result["bandwidth"] = bw
    try:
        result["engine"] = engine_latency(dev)
    except Exception as exc:  # report, do not hide: the correctness part above still stands
        result["engine"] = dict(error=f"{type(exc).__name__}: {exc}")
        print(f"engine latency failed: {exc}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    path = out_dir / f"gpu_check_{slug}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    ok = not result["triton_vs_reference"]["failed"] and result["philox"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
