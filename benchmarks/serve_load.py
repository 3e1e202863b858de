"""Load test of `edmrt serve` on the loopback address (issue 15's benchmark): a bounded client at concurrency 1, 4, 16
and 64 against the student (digits-cd, 2 steps) and the teacher (digits, Heun 18 = 35 NFE), each request one seed
in JSON (base64 PNG).  Compared: in-process ``Sampler.sample`` of one seed per call from the same number of threads
(the floor), Ray Serve without batching, Ray Serve with dynamic batching.  p50 / p95 / p99 latency, images/s and
errors per cell; every mode runs on one replica / one session with one intra-op thread.

    python benchmarks/serve_load.py                   # writes benchmarks/results/serve_load.{json,md,png}
    python benchmarks/serve_load.py --requests 32 --out /tmp/s
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import socket
import threading
import time
import types
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 4, 16, 64)


def _client(call, n_requests: int, concurrency: int) -> dict:
    """``n_requests`` calls from ``concurrency`` threads; latencies, wall time and errors."""
    lat, errors, lock = [], [], threading.Lock()
    counter = iter(range(n_requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            ok = call(i)
            dt = time.perf_counter() - t0
            with lock:
                (lat if ok is True else errors).append(dt if ok is True else ok)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"requests": n_requests, "ok": len(lat), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "images_per_s": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def _http(host: str, port: int, path: str, key: str = "images"):
    """A call that POSTs one seed on its thread's own keep-alive connection (as an HTTP client library's pool
    would), True for a 200 carrying ``key``, else the status or the error's name."""
    local = threading.local()

    def call(i: int):
        data = json.dumps({"seeds": [i], "class": i % 10})
        try:
            if getattr(local, "conn", None) is None:
                local.conn = http.client.HTTPConnection(host, port, timeout=300)
            local.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            r = local.conn.getresponse()
            body = r.read()
            return True if r.status == 200 and json.loads(body)[key] else r.status
        except (OSError, http.client.HTTPException) as e:
            local.conn = None
            return type(e).__name__
    return call


def _empty_app():
    """Ray Serve's own floor: one deployment that reads the JSON body and answers a small JSON, no sampling."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
    class Empty:
        async def __call__(self, request):
            return JSONResponse({"seeds": (await request.json())["seeds"]})
    return Empty.bind()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=128, help="requests per cell (at least the concurrency)")
    p.add_argument("--teacher-requests", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import ray
    import torch
    from ray import serve

    from edmrt.lab.common import machine_name
    from edmrt.render import RenderJob, build_sampler
    from edmrt.serve import SampleRequest, ServeOptions, encode, make_app

    machine = machine_name()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cells = []
    t_all = time.perf_counter()
    serve.run(_empty_app(), name="empty", route_prefix="/")
    call = _http("127.0.0.1", port, "/", key="seeds")
    _client(call, 8, 2)
    for c in CONCURRENCY:
        res = _client(call, max(args.requests, c), c)
        cells.append({"model": "-", "mode": "Ray Serve, empty handler", "concurrency": c, **res})
        print("empty", c, {k: res[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")}, flush=True)
    serve.delete("empty")
    for model, n in (("digits-cd", args.requests), ("digits", args.teacher_requests)):
        _, sampler = build_sampler(RenderJob(model=model), threads=1)
        lock = threading.Lock()

        def local(i, sampler=sampler, lock=lock):
            req = SampleRequest([i], [i % 10], None, sampler.solver, sampler.steps)
            with lock:  # one session, one thread: what one replica has
                x = sampler.sample(req.seeds, cond=req.classes)
            json.dumps(encode(req, x, replica)[0])  # the same response body the server builds
            return True

        for mode, batching in (("serve, no batching", False), ("serve, dynamic batching", True)):
            serve.run(make_app(ServeOptions(model=model, dynamic_batching=batching, max_batch_size=64,
                                            batch_wait_timeout_s=0.005)), name="load", route_prefix="/")
            call = _http("127.0.0.1", port, "/v1/samples")
            _client(call, 8, 2)  # warm the proxy and the replica
            for c in CONCURRENCY:
                res = _client(call, max(n, c), c)
                cells.append({"model": model, "mode": mode, "concurrency": c, **res})
                print(model, mode, c, {k: res[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")}, flush=True)
            serve.delete("load")
        replica = types.SimpleNamespace(opts=ServeOptions(model=model))
        for c in CONCURRENCY:
            res = _client(local, max(n, c), c)
            cells.append({"model": model, "mode": "in-process Sampler.sample", "concurrency": c, **res})
            print(model, "in-process", c, {k: res[k] for k in ("images_per_s", "p50_ms", "p99_ms")}, flush=True)
    serve.shutdown()
    ray.shutdown()
    result = {"benchmark": "serve_load", "machine": machine, "ray": ray.__version__, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - t_all, 1),
              "cells": cells}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# `edmrt serve` under load ({result['machine']}, Ray {result['ray']}, torch {result['torch']}, "
          f"{result['date']})", "",
          "One seed per request (JSON, base64 PNG) from a bounded client on the loopback address (one keep-alive "
          "connection per client thread); one sampler replica with one ONNX Runtime thread, behind the ingress. "
          "The in-process floor calls Sampler.sample of one seed and builds the same JSON body, from as many "
          "threads (one session, taking turns). 'Ray Serve, empty handler' is one deployment that reads the body "
          "and answers a small JSON: Ray Serve's own floor here. Ray and the client share the machine's 2 vCPUs.",
          "",
          "| model | mode | concurrency | requests | images/s | p50 ms | p95 ms | p99 ms | errors |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if not c["ok"]:
            md.append(f"| {c['model']} | {c['mode']} | {c['concurrency']} | {c['requests']} | 0 | - | - | - | "
                      f"{c['errors']} |")
            continue
        md.append(f"| {c['model']} | {c['mode']} | {c['concurrency']} | {c['requests']} | {c['images_per_s']:.1f} | "
                  f"{c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['p99_ms']:.1f} | {c['errors']} |")
    (out / "serve_load.md").write_text("\n".join(md) + "\n")
    _plot(cells, out / "serve_load.png", result["machine"])
    print("\n".join(md))
    return 0


def _plot(cells, path: Path, machine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, ls in (("digits-cd", "-"), ("digits", "--")):
        for mode, colour in (("in-process Sampler.sample", "k"), ("serve, no batching", "tab:orange"),
                             ("serve, dynamic batching", "tab:blue")):
            pts = sorted((c["concurrency"], c["images_per_s"], c["p50_ms"]) for c in cells
                         if c["model"] == model and c["mode"] == mode)
            xs = [q[0] for q in pts]
            axes[0].plot(xs, [q[1] for q in pts], ls=ls, marker="o", color=colour, label=f"{model}: {mode}")
            axes[1].plot(xs, [q[2] for q in pts], ls=ls, marker="o", color=colour, label=f"{model}: {mode}")
    for ax, label in zip(axes, ("images/s", "p50 latency (ms)")):
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    pts = sorted((c["concurrency"], c["images_per_s"], c["p50_ms"]) for c in cells if c["mode"].startswith("Ray"))
    for ax, k in zip(axes, (1, 2)):
        ax.plot([q[0] for q in pts], [q[k] for q in pts], ls=":", marker=".", color="grey",
                label="Ray Serve, empty handler")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"edmrt serve under load ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
