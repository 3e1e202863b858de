"""``edmrt bench``: samplers, step counts, backends and batch sizes of one model, measured side by side.

Each cell (solver, steps, backend, batch) builds its Sampler, samples once to warm up (exports, sessions, first-call
costs), then is timed in ``rounds`` interleaved rounds (every cell once per round, so a drifting VM shifts all of
them alike): per-call latency p50 / p90 / p99, images/s and NFE/s from the median, and the engine's overhead over
its bare network: per call, the whole call's time over the time spent inside the backend's NFE network calls
(timed in place by a wrapper around the backend; on CUDA, asynchronous launches make that split approximate);
the median over the rounds.
Memory: the process's peak RSS after the cell on the CPU (it only grows), torch's peak allocation per cell on CUDA.
With ``peers``, the k-diffusion and diffusers loops of the same solver run on the same network (torch, eager) at the
same NFE, from the same initial noise (``edmrt.lab.peers``), and each edmrt cell gets its speed-up over the best of
them at its batch.

A diffusers folder (``--model DIR``, ``edmrt.load``) is benchmarked the same way, and its peer is the folder's own
pipeline (``DiffusionPipeline`` class of its model_index.json, sharing edmrt's network; no text encoder: the same
seeded embeddings as ``prompt_embeds`` and the pooled ones, ``latents=``, ``output_type="latent"``, guidance off as
in the edmrt cells) at the scheduler's own method and steps: the edmrt cell of the card's solver (the scheduler's
method) gets its speed-up over it.  Both sides stop at the latents (no VAE decode).

Models: a bundled name, a diffusers folder, or a benchmark network with random weights (``BENCH_NETS``,
``torch.manual_seed(0)``):
``unet-cifar10`` (EDMUNet at CIFAR-10's layout, 54 M parameters, 3x32x32, unconditional) and ``unet-sd15`` (diffusers'
UNet2DConditionModel with Stable Diffusion 1.5's config, 860 M parameters, 4x32x32 latents, text embeddings
(77, 768) drawn per seed).
"""
from __future__ import annotations

import datetime
import resource
from pathlib import Path
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from ..render import TimedBackend

__all__ = ["PEER_OF", "BENCH_NETS", "SD15_UNET", "bench_model", "run_bench", "table", "plot_bench", "time_summary",
           "QUICK"]

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0)


# ``edmrt bench --quick``: batches 1 and 8, one timed round (about half the run of the defaults on 2 cores, most of it
# the export and sessions; the defaults' batch-64 cells of torch and the peers are the slowest part of a full run).
QUICK = {"batches": (1, 8), "rounds": 1}


def _cifar10_unet():
    from ..model import Model
    from ..models.unet import build_unet

    torch.manual_seed(0)
    return Model(build_unet("cifar10").eval().requires_grad_(False), sample_shape=(3, 32, 32),
                 metadata={"name": "unet-cifar10"})


def _sd15_unet():
    import diffusers

    from ..adapters.diffusers import from_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    return from_diffusers(unet, None, sample_shape=(4, 32, 32), metadata={"name": "unet-sd15"})


BENCH_NETS = {"unet-cifar10": _cifar10_unet, "unet-sd15": _sd15_unet}


def bench_model(name: str, device: str = "cpu"):
    """A bundled model by name, a diffusers folder, or a benchmark network of ``BENCH_NETS``."""
    from pathlib import Path

    from ..loading import load
    from ..models.bundled import BUNDLED

    if name not in BUNDLED and name not in BENCH_NETS and Path(name).is_dir():
        return load(name, device=device)

    if name in BENCH_NETS:
        model = BENCH_NETS[name]()
        model.network.to(device)
        return model
    if name not in BUNDLED:
        raise ValueError(f"model must be a bundled model {sorted(BUNDLED)}, a diffusers folder or a benchmark "
                         f"network {sorted(BENCH_NETS)}, got {name!r}")
    return load(name, device=device)

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
    """Seeds 0 .. batch-1 and their condition: class labels cycling through the classes, or for other conditioning
    inputs (text embeddings) a standard normal draw per sample (seeded)."""
    seeds = list(range(batch))
    if model.num_classes:
        return seeds, [i % model.num_classes for i in seeds]
    if not model.cond:
        return seeds, None
    g = torch.Generator().manual_seed(1234)
    return seeds, {c.name: (torch.randn((batch, *c.shape), generator=g) if c.dtype.is_floating_point
                            else torch.zeros((batch, *c.shape), dtype=c.dtype)).to(c.dtype) for c in model.cond}


def _peer_call(model, peer, nfe: int, batch: int):
    from ..kernels.philox import INITIAL_STREAM, philox_normal
    from .common import denoise

    seeds, cond = _inputs(model, batch)
    x0 = philox_normal(seeds, INITIAL_STREAM, model.sample_shape).float() * float(model.sigma_max)
    net = model.network
    if isinstance(cond, dict):   # embeddings: the network takes them by name
        kw = cond
        call = lambda x_in, c_noise, _: net(x_in, c_noise, **kw)  # noqa: E731
    else:
        call = net
    labels = torch.tensor(cond) if isinstance(cond, list) else None

    def den(x, sigma):
        with torch.no_grad():
            return denoise(call, model.precond, x, sigma.reshape(-1).expand(x.shape[0]).double(), labels)

    return lambda: peer.run(den, x0, nfe, model.sigma_min, model.sigma_max)[0]


# edmrt's conditioning inputs under the names diffusers' pipelines take them.
_PIPELINE_KW = {"encoder_hidden_states": "prompt_embeds", "text_embeds": "pooled_prompt_embeds",
                "pooled_projections": "pooled_prompt_embeds"}


class PipelinePeer:
    """A diffusers folder's own pipeline as a peer loop (module docstring): its scheduler's method at ``steps``."""

    def __init__(self, model):
        import json

        import diffusers

        folder = model.metadata["path"]
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))   # edmrt.load read it
        cls = getattr(diffusers, str(index.get("_class_name")), None)
        if cls is None:
            raise ValueError(f"{folder}: model_index.json names pipeline {index.get('_class_name')!r}, which this "
                             "diffusers does not have")
        net = getattr(model.network, "unet", None) or getattr(model.network, "transformer")
        key = "unet" if "unet" in index else "transformer"
        skip = {k: None for k in index if not k.startswith("_") and k.startswith(
            ("text_encoder", "tokenizer", "safety_checker", "feature_extractor", "image_encoder"))}
        self.pipe = cls.from_pretrained(folder, **{key: net}, **skip, use_safetensors=True, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = f"diffusers:{cls.__name__}"
        self.model = model
        self.solver = (model.metadata.get("sampling") or {}).get("solver")

    def call(self, steps: int, batch: int):
        seeds, cond = _inputs(self.model, batch)
        kw = {_PIPELINE_KW[k]: v for k, v in (cond or {}).items() if k in _PIPELINE_KW}
        C, h, w = self.model.sample_shape
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        latents = torch.randn((batch, C, h, w), generator=torch.Generator().manual_seed(0))
        return lambda: self.pipe(**kw, latents=latents, num_inference_steps=steps, guidance_scale=1.0,
                                 output_type="latent", height=h * scale, width=w * scale).images


def run_bench(model_name: str, solvers: Sequence[str] | None = None, steps: Sequence[int] = (),
              backends: Sequence[str] = ("onnxruntime", "torch"), batches: Sequence[int] = (1, 8, 64),
              rounds: int = 3, peers: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    from tqdm import tqdm

    from .common import cpu_flags, machine_name
    from .peers import available_peers

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be ints >= 1, got {list(batches)}")
    t_start = time.perf_counter()
    model = bench_model(model_name, device=device)
    folder = model.metadata.get("source") == "diffusers" and "path" in model.metadata
    card_solver = (model.metadata.get("sampling") or {}).get("solver")
    if solvers is None:   # a folder: its scheduler's method; otherwise EDM's Heun and DPM-Solver++(2M)
        solvers = (card_solver,) if folder and card_solver else ("heun", "dpmpp_2m")
    cells = _cells(model, solvers, list(steps), backends, batches, torch.device(device))
    have = available_peers() if peers and not folder else {}
    pipeline = PipelinePeer(model) if peers and folder and card_solver else None
    for cell in list(cells):
        if pipeline is not None and cell["backend"] == cells[0]["backend"] and cell["solver"] == card_solver:
            cells.append({"kind": "peer", "solver": pipeline.name, "steps": cell["steps"], "nfe": cell["nfe"],
                          "backend": "torch eager", "batch": cell["batch"], "pipeline": pipeline})
        if cell["backend"] == backends[0] and peers:
            for name in PEER_OF.get(cell["solver"], ()):
                if name in have and have[name].steps_for(cell["nfe"]) is not None:
                    cells.append({"kind": "peer", "solver": name, "steps": have[name].steps_for(cell["nfe"]),
                                  "nfe": cell["nfe"], "backend": "torch eager", "batch": cell["batch"],
                                  "peer": have[name]})
    t_warm = time.perf_counter()
    bar = tqdm(total=len(cells) * (rounds + 1), disable=not progress, desc="bench", unit="run", dynamic_ncols=True)
    calls, timed = {}, {}
    for i, cell in enumerate(cells):  # warm-up, and the callables
        if cell["kind"] == "edmrt":
            seeds, cond = _inputs(model, cell["batch"])
            s = cell.pop("sampler")
            calls[i] = lambda s=s, seeds=seeds, cond=cond: s.sample(seeds, cond=cond, output="latent")
            timed[i] = s.backend
        elif "pipeline" in cell:
            calls[i] = cell.pop("pipeline").call(cell["steps"], cell["batch"])
        else:
            calls[i] = _peer_call(model, cell.pop("peer"), cell["nfe"], cell["batch"])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls[i]()
        choices = getattr(timed[i], "choices", None) if i in timed else None
        if choices:   # backend "auto": say what it picked for this batch, and keep its measurement
            picked = choices.get(cell["batch"]) or next(iter(choices.values()))
            cell.update(backend=f"{cell['backend']} ({picked['picked']})", auto_choice=picked)
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
    t_end = time.perf_counter()
    _summarise(cells, times, net_times, timed)
    # Where the run's time went: the model, Samplers, exports and sessions; the warm-up calls; the timed rounds.
    phases = {"setup": t_warm - t_start, "warm_up": t_all - t_warm, "rounds": t_end - t_all}
    return {"benchmark": "edmrt bench", "model": model_name, "machine": machine_name(), "cpu_flags": cpu_flags(),
            "versions": _versions(), "torch": torch.__version__,
            "device": device, "date": datetime.date.today().isoformat(), "rounds": rounds,
            "seconds": round(t_end - t_all, 1), "phases_s": {k: round(v, 1) for k, v in phases.items()},
            "cells": cells}


def time_summary(result: dict) -> str:
    """One line: where the run's time went (setup, warm-up, timed rounds) and its slowest cells."""
    ph = result["phases_s"]
    per_cell = sorted(((c["batch"] * result["rounds"] / c["images_per_s"], c) for c in result["cells"]),
                      key=lambda e: -e[0])[:3]
    slow = ", ".join(f"{c['solver']} {c['backend']} batch {c['batch']} {s:.1f} s" for s, c in per_cell)
    return (f"took {sum(ph.values()):.0f} s: setup {ph['setup']:.1f} s (model, exports, sessions), warm-up "
            f"{ph['warm_up']:.1f} s, {result['rounds']} timed round(s) {ph['rounds']:.1f} s (slowest: {slow})")


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "onnxruntime", "openvino", "diffusers", "k-diffusion"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _summarise(cells, times, net_times, timed) -> None:
    for i, cell in enumerate(cells):
        t = np.asarray(times[i]) * 1000
        med = statistics.median(times[i])
        ratio = statistics.median(a / b for a, b in zip(times[i], net_times[i])) if i in timed else None
        cell.update(p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                    p99_ms=float(np.percentile(t, 99)), images_per_s=cell["batch"] / med,
                    nfe_per_s=cell["batch"] * cell["nfe"] / med, overhead_vs_bare_network=ratio)
    for cell in cells:   # against the best peer loop at the same batch and NFE
        peers = [c["images_per_s"] for c in cells if c["kind"] == "peer" and c["batch"] == cell["batch"]
                 and c["nfe"] == cell["nfe"]]
        cell["speedup_vs_best_peer"] = cell["images_per_s"] / max(peers) if peers and cell["kind"] == "edmrt" else None


def table(result: dict) -> str:
    out = ["| solver | steps | NFE | backend | batch | images/s | NFE/s | p50 ms | p90 ms | p99 ms | "
           "vs bare network | vs best peer | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        ov = f"{c['overhead_vs_bare_network']:.3f}x" if c["overhead_vs_bare_network"] else ""
        sp = f"{c['speedup_vs_best_peer']:.2f}x" if c.get("speedup_vs_best_peer") else ""
        ips = f"{c['images_per_s']:.1f}" if c["images_per_s"] >= 1 else f"{c['images_per_s']:.3f}"
        out.append(f"| {c['solver']} | {c['steps']} | {c['nfe']} | {c['backend']} | {c['batch']} | "
                   f"{ips} | {c['nfe_per_s']:.1f} | {c['p50_ms']:.1f} | {c['p90_ms']:.1f} | "
                   f"{c['p99_ms']:.1f} | {ov} | {sp} | {c['peak_mb']:.0f} |")
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
