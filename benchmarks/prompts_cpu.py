"""Prompts at scale on this machine's CPUs (issue 26): ``edmrt render`` of a diffusers folder's prompts, and
``edmrt serve`` answering prompt requests, each against the same work in one process.

The folder is the tests' tiny Stable Diffusion (tests/sd_folder.py: UNet 16/32 channels, 8x8x4 latents, a CLIP
text encoder of one layer, a VAE to 16x16 pixels; random weights), Euler at 20 steps, ONNX Runtime (the CPU
default).  Render: ``--requests`` of N prompts drawn from P distinct ones (guidance 5 with a negative prompt on
every other request), batch 16, 1 and 2 actors (one thread each), prompts encoded in the sampling actors
(``encode="actor"``) or in a stage of its own (``"stage"``), rounds interleaved; reported: images/s for the
pipeline, in total (with starting Ray and the actors) and steady (after the first chunk), prompts encoded, and the
text encoder's share of all actors' time (its loading included; for "stage" the encoder actor's own), against a
loop in this process that encodes each distinct prompt once and samples the same chunks.
Serve: one replica (one thread), sequential requests of one image with a prompt from the same set (most from the
replica's cache after the first of each), p50 / p90 latency against ``Sampler.sample`` plus the encoder's cache in
this process, both PNG-encoded.

    python benchmarks/prompts_cpu.py       # writes benchmarks/results/prompts_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

WORDS = ["a", "cat", "dog", "photo", "of"]


def prompts(n_distinct: int) -> list[str]:
    """n distinct prompts over the tiny tokenizer's words (deterministic)."""
    import itertools

    out = []
    for k in range(1, 5):
        for combo in itertools.product(WORDS, repeat=k):
            out.append(" ".join(combo))
            if len(out) == n_distinct:
                return out
    return out


def request_rows(n: int, distinct: int) -> list[dict]:
    ps = prompts(distinct)
    return [{"seed": i, "prompt": ps[i % distinct], **({"guidance": 5.0, "negative_prompt": "dog"} if i % 2 else {})}
            for i in range(n)]


def in_process(folder: Path, rows: list[dict], batch: int) -> float:
    """Seconds to encode each distinct prompt once and sample the same chunks (grouped by guidance) to PNGs."""
    import torch

    from edmrt.pipelines.prompts import PromptEncoder
    from edmrt.render import RenderJob, build_sampler, to_png

    torch.set_num_threads(1)
    model, sampler = build_sampler(RenderJob(model=str(folder), steps=20), threads=1)
    model.decoder.batch = 1
    enc = PromptEncoder(folder, [c.name for c in model.cond])
    sampler.sample([0], cond=enc.encode("a", None, False)[0])   # warm
    t0 = time.perf_counter()
    for lo in range(0, len(rows), batch):
        chunk = rows[lo:lo + batch]
        for guided in (False, True):
            part = [r for r in chunk if ("guidance" in r) == guided]
            if not part:
                continue
            enc_rows = [enc.encode(r["prompt"], r.get("negative_prompt"), guided) for r in part]
            cond = {k: torch.cat([c[k] for c, _ in enc_rows]) for k in enc_rows[0][0]}
            uncond = {k: torch.cat([u[k] for _, u in enc_rows]) for k in enc_rows[0][1]} if guided else None
            x = sampler.sample([r["seed"] for r in part], cond=cond, uncond=uncond, guidance=5.0 if guided else None)
            [to_png(im) for im in x]
    return time.perf_counter() - t0


def run_render(folder: Path, req: Path, actors: int, batch: int, encode: str) -> dict:
    from edmrt.render import RenderJob, read_requests, render

    out = Path(tempfile.mkdtemp(prefix="edmrt-prompts-"))
    t0 = time.perf_counter()
    s = render(RenderJob(model=str(folder), steps=20, batch=batch, encode=encode), read_requests(req, 0, text=True),
               out / "r", actors=actors, progress=False)
    total = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"actors": actors, "encode": encode, "images": s["images"], "pipeline_s": s["pipeline_s"], "total_s": total,
            "images_per_s": s["images_per_s"], "images_per_s_total": s["images"] / total,
            "steady_images_per_s": s["steady_images_per_s"], "prompts_encoded": s["prompts_encoded"],
            "text_share": s["time_split_share"]["text_s"], "network_share": s["time_split_share"]["network_s"]}


def run_serve(folder: Path, rows: list[dict], n: int) -> dict:
    import base64

    import ray
    import torch
    from ray import serve

    from edmrt.pipelines.prompts import PromptEncoder
    from edmrt.render import RenderJob, build_sampler, to_png
    from edmrt.serve import ServeOptions, make_app

    torch.set_num_threads(1)
    model, sampler = build_sampler(RenderJob(model=str(folder), steps=20), threads=1)
    enc = PromptEncoder(folder, [c.name for c in model.cond])
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(make_app(ServeOptions(model=str(folder), max_steps=32)), name="p", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/samples"
        http, local = [], []
        for i in range(n):   # interleaved: one HTTP request, then the same in this process
            r = rows[i % len(rows)]
            body = {"prompt": r["prompt"], "seed": r["seed"], "steps": 20,
                    **({"guidance": 5.0, "negative_prompt": "dog"} if "guidance" in r else {})}
            t0 = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                                               headers={"Content-Type": "application/json"})) as resp:
                got = json.loads(resp.read())
            http.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            w = body.get("guidance")
            cond, uncond = enc.encode(body["prompt"], body.get("negative_prompt"), w is not None)
            png = to_png(sampler.sample([body["seed"]], cond=cond, uncond=uncond or None, guidance=w)[0])
            local.append(time.perf_counter() - t0)
            assert base64.b64decode(got["images"][0]) == png, "served image differs from the in-process one"
    finally:
        serve.shutdown()
        ray.shutdown()
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000   # noqa: E731
    return {"requests": n, "http_p50_ms": q(http, 0.5), "http_p90_ms": q(http, 0.9), "local_p50_ms": q(local, 0.5),
            "local_p90_ms": q(local, 0.9), "overhead_p50_ms": q(http, 0.5) - q(local, 0.5)}


def main(argv=None) -> int:
    from sd_folder import sd_folder

    from edmrt.lab.common import machine_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--distinct", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve-requests", type=int, default=60)
    ap.add_argument("-o", "--out", default=str(HERE / "results" / "prompts_cpu"))
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="edmrt-sd-"))
    folder, _ = sd_folder(root)
    rows = request_rows(args.requests, args.distinct)
    req = root / "requests.jsonl"
    req.write_text("\n".join(json.dumps(r) for r in rows))
    results = {"render": [], "loop_s": []}
    for _ in range(args.rounds):
        results["loop_s"].append(in_process(folder, rows, 16))
        for actors in (1, 2):
            for encode in ("actor", "stage"):
                results["render"].append(run_render(folder, req, actors, 16, encode))
        print(f"round done: {results['render'][-4:]}", flush=True)
    results["serve"] = run_serve(folder, rows, args.serve_requests)
    shutil.rmtree(root)
    loop_ips = args.requests / statistics.median(results["loop_s"])
    table = ["| run | images/s (pipeline) | images/s (with Ray start) | steady images/s | prompts encoded | "
             "text encoder share |", "|---|---|---|---|---|---|",
             f"| one process, loop | {loop_ips:.1f} | - | - | {args.distinct} | - |"]
    for actors in (1, 2):
        for encode in ("actor", "stage"):
            rs = [r for r in results["render"] if r["actors"] == actors and r["encode"] == encode]
            med = lambda k: statistics.median(r[k] for r in rs)   # noqa: E731
            table.append(f"| render, {actors} actor(s), encode={encode} | {med('images_per_s'):.1f} | "
                         f"{med('images_per_s_total'):.1f} | {med('steady_images_per_s'):.1f} | "
                         f"{int(med('prompts_encoded'))} | {100 * med('text_share'):.1f}% |")
    sv = results["serve"]
    result = dict(results, machine=machine_name(), date=datetime.date.today().isoformat(), requests=args.requests,
                  distinct_prompts=args.distinct, loop_images_per_s=loop_ips)
    md = "\n".join([f"# Prompts at scale ({result['machine']}, {result['date']})", "",
                    __doc__.split("\n\n")[1].replace("\n", " "), "",
                    f"Render, {args.requests} requests over {args.distinct} distinct prompts (every other request "
                    f"guided), median of {args.rounds} rounds:", "", *table, "",
                    f"Serve, {sv['requests']} sequential one-image prompt requests: HTTP p50 {sv['http_p50_ms']:.1f} "
                    f"ms (p90 {sv['http_p90_ms']:.1f}) against in-process p50 {sv['local_p50_ms']:.1f} ms (p90 "
                    f"{sv['local_p90_ms']:.1f}): {sv['overhead_p50_ms']:.1f} ms of serving per request; every "
                    "served image equal to the in-process one.", ""])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
