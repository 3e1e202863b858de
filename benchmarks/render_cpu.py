"""`edmrt render` on Ray against a plain in-process loop, on this machine's CPUs (issue 14's benchmark).

For the digits teacher (Heun, 18 steps = 35 NFE) and the student digits-cd (2 steps), at batch 64: images/s of
``edmrt.render.render`` with 1 actor (1 thread) and 2 actors (1 thread each), against two loops in this process
with the same total threads: ``Sampler.sample`` alone over the same chunks (the floor), and the same loop that
also encodes each PNG and writes it (the same work as render's).  Everything runs on ONNX Runtime (the render
default on the CPU).  Render times include starting the local Ray and the actors (``total``) and, separately, the
pipeline alone (``pipeline``: from the first chunk submitted to the last record written).  Rounds are
interleaved; medians are reported.

    python benchmarks/render_cpu.py                 # writes benchmarks/results/render_cpu.{json,md}
    python benchmarks/render_cpu.py --rounds 1 --teacher-images 256 --student-images 1024 --out /tmp/r
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def loop(model: str, n: int, batch: int, threads: int, write: bool) -> float:
    """Seconds for Sampler.sample over seeds 0..n-1 in chunks of ``batch`` (ONNX Runtime, ``threads`` intra-op
    threads), optionally encoding and writing each PNG (temp + rename, as render does)."""
    import torch

    from edmrt.render import RenderJob, build_sampler, to_png

    torch.set_num_threads(threads)
    m, s = build_sampler(RenderJob(model=model), threads=threads)
    s.sample([0], cond=[0])  # warm
    out = Path(tempfile.mkdtemp(prefix="edmrt-loop-"))
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        seeds = list(range(lo, min(n, lo + batch)))
        x = s.sample(seeds, cond=[i % 10 for i in seeds])
        if write:
            for i, im in zip(seeds, x):
                tmp, dst = out / f".tmp-{i}", out / f"{i:09d}.png"
                tmp.write_bytes(to_png(im))
                os.replace(tmp, dst)
    dt = time.perf_counter() - t0
    shutil.rmtree(out)
    return dt


def ray_render(model: str, n: int, batch: int, actors: int, fmt: str = "png") -> dict:
    from edmrt.render import RenderJob, Requests, render

    out = Path(tempfile.mkdtemp(prefix="edmrt-render-")) / "r"
    t0 = time.perf_counter()
    s = render(RenderJob(model=model, batch=batch, format=fmt), Requests.from_seeds(range(n), 10), out,
               actors=actors, progress=False)
    total = time.perf_counter() - t0
    shutil.rmtree(out.parent)
    return {"total_s": total, "pipeline_s": s["pipeline_s"], "steady_s": n / s["steady_images_per_s"],
            "time_split_share": s["time_split_share"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-images", type=int, default=2048)
    p.add_argument("--student-images", type=int, default=10240)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import onnxruntime
    import ray
    import torch

    from edmrt.lab.common import machine_name

    cases = {"digits": args.teacher_images, "digits-cd": args.student_images}
    runs: dict = {}
    t_all = time.perf_counter()
    for r in range(args.rounds):
        for model, n in cases.items():
            for name, fn in (("loop_sample_1t", lambda: {"total_s": loop(model, n, args.batch, 1, False)}),
                             ("loop_sample_write_1t", lambda: {"total_s": loop(model, n, args.batch, 1, True)}),
                             ("render_1_actor", lambda: ray_render(model, n, args.batch, 1)),
                             ("loop_sample_2t", lambda: {"total_s": loop(model, n, args.batch, 2, False)}),
                             ("loop_sample_write_2t", lambda: {"total_s": loop(model, n, args.batch, 2, True)}),
                             ("render_2_actors", lambda: ray_render(model, n, args.batch, 2)),
                             ("render_2_actors_webdataset", lambda: ray_render(model, n, args.batch, 2,
                                                                               "webdataset"))):
                res = fn()
                runs.setdefault(model, {}).setdefault(name, []).append(res)
                print(f"round {r} {model} {name}: {res['total_s']:.2f} s"
                      + (f" (pipeline {res['pipeline_s']:.2f} s)" if "pipeline_s" in res else ""), flush=True)
    rows = []
    for model, n in cases.items():
        med = {name: {k: statistics.median(x[k] for x in rs) for k in ("total_s", "pipeline_s", "steady_s") if k in rs[0]}
               for name, rs in runs[model].items()}
        for threads, (plain, same, ray_name) in {1: ("loop_sample_1t", "loop_sample_write_1t", "render_1_actor"),
                                                 2: ("loop_sample_2t", "loop_sample_write_2t",
                                                     "render_2_actors"),
                                                 "2, webdataset": ("loop_sample_2t", "loop_sample_write_2t",
                                                                   "render_2_actors_webdataset")}.items():
            rm = med[ray_name]
            rows.append({"model": model, "images": n, "threads": threads,
                         "loop_sample_images_per_s": n / med[plain]["total_s"],
                         "loop_sample_write_images_per_s": n / med[same]["total_s"],
                         "render_images_per_s_total": n / rm["total_s"],
                         "render_images_per_s_pipeline": n / rm["pipeline_s"],
                         "render_images_per_s_steady": n / rm["steady_s"],
                         "overhead_vs_same_work_loop_steady": rm["steady_s"] / med[same]["total_s"] - 1,
                         "overhead_vs_sample_loop_steady": rm["steady_s"] / med[plain]["total_s"] - 1,
                         "startup_s": rm["pipeline_s"] - rm["steady_s"],
                         "overhead_vs_sample_loop_pipeline": rm["pipeline_s"] / med[plain]["total_s"] - 1,
                         "overhead_vs_same_work_loop_pipeline": rm["pipeline_s"] / med[same]["total_s"] - 1,
                         "overhead_vs_same_work_loop_total": rm["total_s"] / med[same]["total_s"] - 1,
                         "render_time_split": runs[model][ray_name][-1]["time_split_share"]})
    result = {"benchmark": "render_cpu", "machine": machine_name(), "torch": torch.__version__, "ray": ray.__version__,
              "onnxruntime": onnxruntime.__version__, "date": datetime.date.today().isoformat(),
              "batch": args.batch, "rounds": args.rounds, "seconds": round(time.perf_counter() - t_all, 1),
              "rows": rows, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "render_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# `edmrt render` on Ray vs an in-process loop ({result['machine']}, torch {result['torch']}, Ray "
          f"{result['ray']}, onnxruntime {result['onnxruntime']}, {result['date']})", "",
          f"Batch {args.batch}, ONNX Runtime on the CPU, medians of {args.rounds} interleaved rounds "
          f"({result['seconds']:.0f} s in all). Render rates: `steady`, the images recorded after the first chunk "
          "over the time from its record to the last (the rate a long run tends to); `pipeline`, the Ray Data "
          "pipeline with starting the actors and their ONNX sessions; `total`, with starting the local Ray too. "
          "Overheads are of the steady rate against the loop that does the same work (sample, encode the PNG, "
          "write it by temp + rename) and against the loop that only samples, with the same total threads; "
          "`startup` is the pipeline's time beyond the steady rate.", "",
          "| model | images | threads (actors) | loop: sample | loop: sample+PNG+write | render: steady | "
          "render: pipeline | render: total | overhead vs same work | overhead vs sample only | startup s | "
          "render time: network / step / encode / write |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["render_time_split"]
        md.append(f"| {r['model']} | {r['images']} | {r['threads']} | {r['loop_sample_images_per_s']:.1f} | "
                  f"{r['loop_sample_write_images_per_s']:.1f} | {r['render_images_per_s_steady']:.1f} | "
                  f"{r['render_images_per_s_pipeline']:.1f} | {r['render_images_per_s_total']:.1f} | "
                  f"{100 * r['overhead_vs_same_work_loop_steady']:+.1f}% | "
                  f"{100 * r['overhead_vs_sample_loop_steady']:+.1f}% | {r['startup_s']:.1f} | "
                  f"{100 * sp['network_s']:.0f}% / {100 * sp['sample_s']:.0f}% / {100 * sp['encode_s']:.0f}% / "
                  f"{100 * sp['write_s']:.0f}% |")
    md.append("")
    md.append("Images/s columns. The time split is of the actors' and writers' busy time in the last round.")
    (out / "render_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
