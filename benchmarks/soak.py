"""Soak: many requests of mixed batch sizes, guidance on and off, through one shared Sampler; resident memory
(RSS) recorded as it goes.  The Sampler keeps at most ``max_engines`` engines and each engine at most
``MAX_GUIDANCE_VALUES`` bindings, so RSS must level off once every cache is full: the result is the growth
after the warm-up.  A benchmark, not a timed test.  Writes benchmarks/results/soak_<backend>.{json,md}.

    python benchmarks/soak.py [--requests 10000] [--backend onnxruntime|torch] [--model digits-cd]
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import torch

import edmrt
from edmrt.lab.common import machine_name
from edmrt.sampler import MAX_ENGINES

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def load_growth(model: str, calls: int = 300) -> float:
    """KB of RSS per ``edmrt.load`` call, after a warm-up (safetensors' memory-mapped load_file kept ~17 KB a call)."""
    import gc

    for _ in range(20):
        edmrt.load(model)
    gc.collect()
    before = rss_mb()
    for _ in range(calls):
        edmrt.load(model)
    gc.collect()
    return round((rss_mb() - before) * 1024 / calls, 2)


def soak(model: str, backend: str, requests: int, max_batch: int, every: int, seed: int) -> dict:
    rng = random.Random(seed)
    sampler = edmrt.Sampler(edmrt.load(model), backend=backend)
    samples, points, t0 = 0, [], time.perf_counter()
    checks = {}  # a fixed request, repeated: its images must never change
    for i in range(1, requests + 1):
        n = rng.randint(1, max_batch)  # more batch sizes than engines: the LRU evicts and rebuilds
        guidance = rng.choice([None, None, 1.5, 2.0, 3.0])
        seeds = [rng.randrange(2 ** 40) for _ in range(n)]
        x = sampler.sample(seeds, cond=[s % 10 for s in seeds], guidance=guidance)
        samples += n
        if i % 997 == 1:
            ref = sampler.sample([1, 2, 3], cond=[4, 5, 6], guidance=2.0)
            checks.setdefault("first", ref)
            if not torch.equal(ref, checks["first"]):
                raise AssertionError(f"request {i}: the fixed request's images changed")
        del x
        if i % every == 0 or i == 1:
            points.append({"request": i, "samples": samples, "rss_mb": round(rss_mb(), 1),
                           "seconds": round(time.perf_counter() - t0, 1), "engines": len(sampler._engines)})
    warm = next(p for p in points if p["request"] >= requests // 5)  # after the caches filled
    return {"benchmark": "soak", "machine": machine_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "model": model, "backend": sampler.backend_name,
            "requests": requests, "batch_sizes": f"1-{max_batch} uniform", "guidance": "None (2/5), 1.5, 2, 3",
            "max_engines": MAX_ENGINES, "samples": samples, "seconds": points[-1]["seconds"],
            "rss_mb_start": points[0]["rss_mb"], "rss_mb_after_warmup": warm["rss_mb"],
            "rss_mb_end": points[-1]["rss_mb"], "growth_after_warmup_mb": round(points[-1]["rss_mb"] - warm["rss_mb"], 1),
            "fixed_request_unchanged": True, "load_growth_kb_per_call": load_growth(model), "points": points}


def write(result: dict) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"soak_{result['backend'].split()[0]}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [f"| {p['request']} | {p['samples']} | {p['engines']} | {p['rss_mb']} | {p['seconds']} |"
            for p in result["points"]]
    md = [f"# Soak: {result['requests']} requests through one Sampler ({result['model']}, {result['backend']})", "",
          f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}. Batch sizes {result['batch_sizes']}, "
          f"guidance {result['guidance']}, at most {result['max_engines']} engines kept.", "",
          f"RSS {result['rss_mb_start']} MB after the first request, {result['rss_mb_after_warmup']} MB after 20% of "
          f"the requests, {result['rss_mb_end']} MB at the end: **{result['growth_after_warmup_mb']:+} MB after the "
          f"warm-up** over {result['samples']} samples in {result['seconds']} s; a fixed request gave the same images "
          f"every time. `edmrt.load` x 300: {result['load_growth_kb_per_call']:+} KB per call.", "", "| request | samples | engines | RSS MB | s |", "|---|---|---|---|---|", *rows, ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return [stem.with_suffix(".json"), stem.with_suffix(".md")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--model", default="digits-cd")
    ap.add_argument("--max-batch", type=int, default=24)
    ap.add_argument("--every", type=int, default=500, help="record RSS every N requests")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = soak(args.model, args.backend, args.requests, args.max_batch, args.every, args.seed)
    for p in write(result):
        print(f"wrote {p}")
    print(f"RSS growth after the warm-up: {result['growth_after_warmup_mb']:+} MB ({result['rss_mb_after_warmup']} -> "
          f"{result['rss_mb_end']} MB) over {result['requests']} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
