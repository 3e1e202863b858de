"""``edmrt bench``: samplers, step counts, backends and batch sizes of one model, measured side by side.

Each cell (solver, steps, backend, batch) builds its Sampler, samples once to warm up (exports, sessions, first-call
costs), then is timed in ``rounds`` interleaved rounds (every cell once per round, so a drifting VM shifts all of
them alike): per-call latency p50 / p90 / p99, images/s and NFE/s from the median, and the engine's overhead over
its bare network: per call, the whole call's time over the time spent inside the backend's NFE network calls
(timed in place by a wrapper around the backend; on CUDA, asynchronous launches make that split approximate);
the median over the rounds.
Memory: the process's peak RSS after the cell on the CPU (it only grows), torch's peak allocation per cell on CUDA.
With ``peers``, the k-diffusion and diffusers loops of the same solver run on the same network (torch, eager) at the
same NFE, from the same initial noise (``edmrt.lab.peers``).
"""
from __future__ import annotations

import datetime
import resource
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from ..render import TimedBackend

__all__ = ["PEER_OF", "run_bench", "table", "plot_bench"]

PEER_OF = {"euler": ("k-diffusion:euler", "diffusers:EDMEuler"), "heun": ("k-diffusion:heun",),
           "dpmpp_2m": ("k-diffusion:dpmpp_2m", "diffusers:EDMDPMSolver(2)"), "lms": ("k-diffusion:lms",),
           "dpm2": ("k-diffusion:dpm_2",)}


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def _cells(model, solvers, steps_list, backends, batches, device):
    from ..sampler import Sampler

    cells = []
    for solver in solvers:
        for steps in steps_list or [None]:
            for backend in backends:
                s = Sampler(model, solver=solver, steps=steps, backend=backend, device=device)
                s.backend = TimedBackend(s.backend)  # engines are built on first use: each times its network calls
                for b in batches:
                    cells.append({"kind": "edmrt", "solver": s.solver, "steps": s.steps, "nfe": s.plan.nfe,
                                  "backend": s.backend_name, "batch": b, "sampler": s})
    return cells


def _inputs(model, batch: int):
    seeds = list(range(batch))
    cond = [i % model.num_classes for i in seeds] if model.num_classes else None
    return seeds, cond


def _peer_call(model, peer, nfe: int, batch: int):
    from ..kernels.philox import INITIAL_STREAM, philox_normal
    from .common import denoise

    seeds, cond = _inputs(model, batch)
    labels = torch.tensor(cond) if cond is not None else None
    x0 = philox_normal(seeds, INITIAL_STREAM, model.sample_shape).float() * float(model.sigma_max)
    net = model.network

    def den(x, sigma):
        with torch.no_grad():
            return denoise(net, model.precond, x, sigma.reshape(-1).expand(x.shape[0]).double(), labels)

    return lambda: peer.run(den, x0, nfe, model.sigma_min, model.sigma_max)[0]


def run_bench(model_name: str, solvers: Sequence[str] = ("heun", "dpmpp_2m"), steps: Sequence[int] = (),
              backends: Sequence[str] = ("onnxruntime", "torch"), batches: Sequence[int] = (1, 8, 64),
              rounds: int = 3, peers: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..models.bundled import load
    from .common import machine_name
    from .peers import available_peers

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be ints >= 1, got {list(batches)}")
    model = load(model_name, device=device)
    cells = _cells(model, solvers, list(steps), backends, batches, torch.device(device))
    have = available_peers() if peers else {}
    for cell in list(cells):
        if cell["backend"] == backends[0] and peers:
            for name in PEER_OF.get(cell["solver"], ()):
                if name in have and have[name].steps_for(cell["nfe"]) is not None:
                    cells.append({"kind": "peer", "solver": name, "steps": have[name].steps_for(cell["nfe"]),
                                  "nfe": cell["nfe"], "backend": "torch eager", "batch": cell["batch"],
                                  "peer": have[name]})
    bar = tqdm(total=len(cells) * (rounds + 1), disable=not progress, desc="bench", unit="run", dynamic_ncols=True)
    calls, timed = {}, {}
    for i, cell in enumerate(cells):  # warm-up, and the callables
        if cell["kind"] == "edmrt":
            seeds, cond = _inputs(model, cell["batch"])
            s = cell.pop("sampler")
            calls[i] = lambda s=s, seeds=seeds, cond=cond: s.sample(seeds, cond=cond)
            timed[i] = s.backend
        else:
            calls[i] = _peer_call(model, cell.pop("peer"), cell["nfe"], cell["batch"])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls[i]()
        cell["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
        bar.update(1)
    times = {i: [] for i in calls}
    net_times = {i: [] for i in timed}  # the network's share of each call (the backend's own time)
    t_all = time.perf_counter()
    for _ in range(rounds):
        for i, fn in calls.items():
            net0 = timed[i].seconds if i in timed else 0.0
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
            if i in timed:
                net_times[i].append(timed[i].seconds - net0)
            bar.update(1)
    bar.close()
    for i, cell in enumerate(cells):
        t = np.asarray(times[i]) * 1000
        med = statistics.median(times[i])
        ratio = statistics.median(a / b for a, b in zip(times[i], net_times[i])) if i in timed else None
        cell.update(p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                    p99_ms=float(np.percentile(t, 99)), images_per_s=cell["batch"] / med,
                    nfe_per_s=cell["batch"] * cell["nfe"] / med, overhead_vs_bare_network=ratio)
    return {"benchmark": "edmrt bench", "model": model_name, "machine": machine_name(), "torch": torch.__version__,
            "device": device, "date": datetime.date.today().isoformat(), "rounds": rounds,
            "seconds": round(time.perf_counter() - t_all, 1), "cells": cells}


def table(result: dict) -> str:
    out = ["| solver | steps | NFE | backend | batch | images/s | NFE/s | p50 ms | p90 ms | p99 ms | "
           "vs bare network | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        ov = f"{c['overhead_vs_bare_network']:.3f}x" if c["overhead_vs_bare_network"] else ""
        out.append(f"| {c['solver']} | {c['steps']} | {c['nfe']} | {c['backend']} | {c['batch']} | "
                   f"{c['images_per_s']:.1f} | {c['nfe_per_s']:.0f} | {c['p50_ms']:.1f} | {c['p90_ms']:.1f} | "
                   f"{c['p99_ms']:.1f} | {ov} | {c['peak_mb']:.0f} |")
    return "\n".join(out)


def plot_bench(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = dict.fromkeys((c["solver"], c["backend"]) for c in result["cells"])
    for solver, backend in groups:
        pts = sorted((c["batch"], c["images_per_s"]) for c in result["cells"]
                     if c["solver"] == solver and c["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                ls="--" if backend == "torch eager" else "-", label=f"{solver} ({backend})")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s",
           title=f"edmrt bench {result['model']} ({result['machine']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
