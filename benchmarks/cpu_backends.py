"""CPU backends head to head (issue 16), a thin caller of ``edmrt bench`` (``edmrt.lab.bench.run_bench``).

The CIFAR-shaped UNet (``unet-cifar10``, 54 M parameters) and the SD-1.5-shaped UNet (``unet-sd15``, diffusers'
UNet2DConditionModel with the real config, 860 M parameters, 32x32 latents, text embeddings), random weights,
batch 1 and 16, Euler with 10 NFE, the same initial noise: edmrt on torch eager fp32, torch bf16 autocast, ONNX
Runtime fp32, OpenVINO fp32, OpenVINO bf16 and OpenVINO int8 (calibrated on the model's own trajectories; not on the
SD-shaped UNet, whose text embeddings calibration cannot make up), beside the peers' loops (k-diffusion ``sample_euler`` and diffusers'
``EDMEulerScheduler``, torch eager fp32: what they run).  Interleaved rounds after a warm-up, medians; the CPU model
and its flags are recorded.

SD 1.5 at batch 16 takes ~20 s per network evaluation in fp32 on 2 vCPUs, so its cells run ``--sd-steps`` steps
(default 2 NFE) and say so; the loop's share is measured (the engine's overhead over its network calls), so images/s
scales to 10 NFE by NFE.

    python benchmarks/cpu_backends.py                  # writes benchmarks/results/cpu_backends.{json,md,png}
    python benchmarks/cpu_backends.py --part sd16      # one part, merged into the existing results
    python benchmarks/cpu_backends.py --quick --out /tmp/cb

Each part (cifar, sd1, sd16) is written as soon as it is measured, merged with the parts already in the JSON file, so
a part that runs out of memory loses only itself; run the parts in separate processes (``--part``) on a small
machine: SD 1.5 at batch 16 with every backend's session and arena in one process needs more than 24 GB.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BACKENDS = ("torch", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sd-rounds", type=int, default=1)
    p.add_argument("--sd-steps", type=int, default=2, help="Euler steps (= NFE) of the SD 1.5 cells at batch 16")
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--part", choices=["cifar", "sd1", "sd16"], action="append", help="run only these parts")
    p.add_argument("--tables-only", action="store_true", help="rewrite the table and plot from the JSON file")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help="only these edmrt backends (the peers' loops run "
                   "with 'torch'); a part run with a subset is merged beside the part's other subsets")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 1 round")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.bench import run_bench

    parts = {"cifar": ("unet-cifar10", 10, (1,) if args.quick else (1, 16), 1 if args.quick else args.rounds),
             "sd1": ("unet-sd15", 10, (1,), 1 if args.quick else args.sd_rounds),
             "sd16": ("unet-sd15", args.sd_steps, (16,), args.sd_rounds)}
    names = args.part or (["cifar"] + ([] if args.skip_sd else ["sd1"] + ([] if args.quick else ["sd16"])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        names = []
        result = json.loads((out / "cpu_backends.json").read_text())
        (out / "cpu_backends.md").write_text(_table(result))
        _plot(result, out / "cpu_backends.png")
    for name in names:
        model, steps, batches, rounds = parts[name]
        print(f"== {name}: {model}, euler {steps} steps, batch {list(batches)}, {rounds} round(s)", flush=True)
        t0 = time.perf_counter()
        backends = [b for b in (args.backends or BACKENDS) if not (b == "openvino-int8" and "sd15" in model)]
        r = run_bench(model, ["euler"], [steps], backends, list(batches), rounds=rounds, peers="torch" in backends)
        for c in r["cells"]:
            c["model"] = model
        if args.backends:
            name = f"{name}:{','.join(backends)}"
        run = {"part": name, "model": model, "nfe": steps, "batches": list(batches), "rounds": rounds,
               "seconds": round(time.perf_counter() - t0, 1)}
        result = _merge(out / "cpu_backends.json", r, run)
        (out / "cpu_backends.json").write_text(json.dumps(result, indent=1) + "\n")
        md = _table(result)
        (out / "cpu_backends.md").write_text(md)
        _plot(result, out / "cpu_backends.png")
        print(md, flush=True)
    return 0


def _merge(path: Path, r: dict, run: dict) -> dict:
    """The results file with this part's run and cells replacing any earlier ones of the same part."""
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = {x["part"] for x in old.get("runs", []) if "part" in x and x["part"] != run["part"]}
    if ":" not in run["part"]:   # a whole part replaces its subsets too
        keep = {k for k in keep if k.split(":")[0] != run["part"]}
    result = {k: r[k] for k in ("machine", "cpu_flags", "versions", "date")}
    result.update(benchmark="cpu_backends",
                  runs=[x for x in old.get("runs", []) if x.get("part") in keep] + [run],
                  cells=[c for c in old.get("cells", []) if c.get("part") in keep]
                  + [dict(c, part=run["part"]) for c in r["cells"]])
    result["seconds"] = round(sum(x["seconds"] for x in result["runs"]), 1)
    for c in result["cells"]:   # against the best peer loop of any part at the same network, batch and NFE
        peers = [p["images_per_s"] for p in result["cells"] if p["kind"] == "peer"
                 and (p["model"], p["batch"], p["nfe"]) == (c["model"], c["batch"], c["nfe"])]
        c["speedup_vs_best_peer"] = c["images_per_s"] / max(peers) if peers and c["kind"] == "edmrt" else None
    return result


def _table(result: dict) -> str:
    lines = [f"# CPU backends, whole sampling loop ({result['machine']}, {result['date']})", "",
             f"CPU flags: {', '.join(result['cpu_flags']) or 'none of avx2 / avx512 / amx'}; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             "Euler, same network and initial noise, random weights. Interleaved rounds after a warm-up, medians "
             f"({result['seconds'] / 60:.0f} min in all). 'vs best peer': images/s over the faster of k-diffusion's "
             "and diffusers' loops (torch eager fp32) at the same batch and NFE; 'vs bare network': the call's time "
             "over its network calls' time.", "",
             "| network | batch | NFE | loop | backend | images/s | p50 s | vs best peer | vs bare network | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rounds = {r["part"]: r["rounds"] for r in result["runs"]}
    for c in result["cells"]:
        loop = "edmrt" if c["kind"] == "edmrt" else c["solver"]
        sp = f"**{c['speedup_vs_best_peer']:.2f}x**" if c.get("speedup_vs_best_peer") else ""
        ov = f"{c['overhead_vs_bare_network']:.3f}" if c.get("overhead_vs_bare_network") else ""
        lines.append(f"| {c['model']} | {c['batch']} | {c['nfe']} | {loop} | {c['backend']} | "
                     f"{c['images_per_s']:.3g} | {c['p50_ms'] / 1000:.2f} | {sp} | {ov} | "
                     f"{rounds.get(c['part'], '')} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(c["model"], c["batch"], c["nfe"]) for c in result["cells"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    for ax, (model, batch, nfe) in zip(axes[0], keys):
        cells = [c for c in result["cells"] if (c["model"], c["batch"], c["nfe"]) == (model, batch, nfe)]
        names = [c["backend"] if c["kind"] == "edmrt" else c["solver"].split(":")[0] for c in cells]
        colours = ["tab:blue" if c["kind"] == "edmrt" else "grey" for c in cells]
        ax.barh(names, [c["images_per_s"] for c in cells], color=colours)
        ax.set_title(f"{model}, batch {batch}, {nfe} NFE", fontsize=8)
        ax.set_xlabel("images/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"edmrt backends vs the peers' loops (grey) on {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
