"""CPU backends head to head (issue 16), a thin caller of ``edmrt bench`` (``edmrt.lab.bench.run_bench``).

The CIFAR-shaped UNet (``unet-cifar10``, 54 M parameters) and the SD-1.5-shaped UNet (``unet-sd15``, diffusers'
UNet2DConditionModel with the real config, 860 M parameters, 32x32 latents, text embeddings), random weights,
batch 1 and 16, Euler with 10 NFE, the same initial noise: edmrt on torch eager fp32, torch bf16 autocast, ONNX
Runtime fp32, OpenVINO fp32 and OpenVINO bf16, beside the peers' loops (k-diffusion ``sample_euler`` and diffusers'
``EDMEulerScheduler``, torch eager fp32: what they run).  Interleaved rounds after a warm-up, medians; the CPU model
and its flags are recorded.

SD 1.5 at batch 16 takes ~20 s per network evaluation in fp32 on 2 vCPUs, so its cells run ``--sd-steps`` steps
(default 2 NFE) and say so; the loop's share is measured (the engine's overhead over its network calls), so images/s
scales to 10 NFE by NFE.

    python benchmarks/cpu_backends.py                  # writes benchmarks/results/cpu_backends.{json,md,png}
    python benchmarks/cpu_backends.py --quick --out /tmp/cb
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BACKENDS = ("torch", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sd-rounds", type=int, default=1)
    p.add_argument("--sd-steps", type=int, default=2, help="Euler steps (= NFE) of the SD 1.5 cells at batch 16")
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 1 round")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.bench import run_bench

    runs = [("unet-cifar10", 10, (1,) if args.quick else (1, 16), 1 if args.quick else args.rounds)]
    if not args.skip_sd:
        runs.append(("unet-sd15", 10, (1,), 1 if args.quick else args.sd_rounds))
        if not args.quick:
            runs.append(("unet-sd15", args.sd_steps, (16,), args.sd_rounds))
    t0 = time.perf_counter()
    parts = []
    for model, steps, batches, rounds in runs:
        print(f"== {model}: euler {steps} steps, batch {list(batches)}, {rounds} round(s)", flush=True)
        r = run_bench(model, ["euler"], [steps], list(BACKENDS), list(batches), rounds=rounds, peers=True)
        for c in r["cells"]:
            c["model"] = model
        parts.append(r)
    result = {k: parts[0][k] for k in ("machine", "cpu_flags", "versions", "date")}
    result.update(benchmark="cpu_backends", seconds=round(time.perf_counter() - t0, 1),
                  runs=[{"model": m, "nfe": s, "batches": list(b), "rounds": r} for m, s, b, r in runs],
                  cells=[c for r in parts for c in r["cells"]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_backends.json").write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    (out / "cpu_backends.md").write_text(md)
    _plot(result, out / "cpu_backends.png")
    print(md)
    return 0


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
    rounds = {(r["model"], r["nfe"]): r["rounds"] for r in result["runs"]}
    for c in result["cells"]:
        loop = "edmrt" if c["kind"] == "edmrt" else c["solver"]
        sp = f"**{c['speedup_vs_best_peer']:.2f}x**" if c.get("speedup_vs_best_peer") else ""
        ov = f"{c['overhead_vs_bare_network']:.3f}" if c.get("overhead_vs_bare_network") else ""
        lines.append(f"| {c['model']} | {c['batch']} | {c['nfe']} | {loop} | {c['backend']} | "
                     f"{c['images_per_s']:.3g} | {c['p50_ms'] / 1000:.2f} | {sp} | {ov} | "
                     f"{rounds.get((c['model'], c['nfe']), '')} |")
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
