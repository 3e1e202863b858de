"""LoRA against DoRA for the few-step adapter: FD-train against iterations at ranks 4, 8 and 32 (issue 13, item 6).

Each run is ``edmrt distill --lora RANK [--dora]`` on the bundled digits teacher (edmrt.lab.distill, same seed,
learning rate and iterations for every run); every ``--every`` iterations the EMA adapter is scored by FD-train:
the Frechet distance between the digits classifier's features of 1000 class-conditional samples (seeds 50000..,
the first 1000 training labels) and of the whole training split, at 1 step (sigma 80 -> 0) and 2 steps
(80 -> 0.2636 -> 0, the full student digits-cd's chosen levels) of the consistency solver.  The full student
digits-cd and the teacher (Heun, 18 steps) are scored on the same seeds and labels as references.

    python benchmarks/lora_dora.py --jobs 2            # all six runs, two at a time (one thread each)
    python benchmarks/lora_dora.py --ranks 8 --iters 200 --out /tmp/ld   # a quick look

Writes OUT/lora_dora_digits.{json,md,png} (default benchmarks/results) and, with --keep DIR, each run's checkpoint
folder under DIR (a shipped adapter continues from one with ``edmrt distill --resume``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SEEDS_FROM = 50_000
SAMPLES = 1000
LEVELS = {"1": [80.0, 0.0], "2": [80.0, 0.26360580012825274, 0.0]}


def _scorer():
    import torch

    from edmrt.lab.common import load_digits_split
    from edmrt.lab.metrics import digits_features, frechet_distance, load_classifier
    from edmrt.sampler import Sampler

    clf = load_classifier()
    x_train, y_train = load_digits_split("train")
    ref = digits_features(x_train, clf)
    labels = y_train[:SAMPLES].tolist()
    seeds = range(SEEDS_FROM, SEEDS_FROM + len(labels))

    def score(model, solver="consistency", levels=None, steps=None) -> float:
        s = Sampler(model, solver=solver, steps=steps or len(levels) - 1, schedule=levels or "karras",
                    backend="torch", device="cpu")
        with torch.no_grad():
            return frechet_distance(digits_features(s.sample(seeds, cond=labels), clf), ref)

    return score


def run_one(rank: int, dora: bool, iters: int, every: int, lr: float, seed: int, keep: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    import edmrt
    from edmrt.lab.distill import DistillOptions, distill, student_model

    teacher = edmrt.load("digits")
    score = _scorer()
    curve = []

    def callback(r):
        m = student_model(r, teacher)
        curve.append({"iteration": r.step, "train_seconds": round(r.seconds, 1),
                      **{f"fd_train_{k}": score(m, levels=lv) for k, lv in LEVELS.items()}})
        print(f"rank {rank} {'dora' if dora else 'lora'} it {r.step}: "
              + " ".join(f"FD{k} {curve[-1][f'fd_train_{k}']:.2f}" for k in LEVELS), flush=True)

    ck = str(Path(keep) / f"{'dora' if dora else 'lora'}-r{rank}") if keep else None
    opts = DistillOptions(iters=iters, lora_rank=rank, dora=dora, lr=lr, seed=seed)
    r = distill(teacher, opts, progress=False, checkpoint=ck, checkpoint_every=iters, callback=callback,
                callback_every=every)
    n_params = sum(p.numel() for n, p in r.ema.named_parameters() if "lora_" in n)
    return {"rank": rank, "dora": dora, "adapter_parameters": n_params, "seconds": round(r.seconds, 1),
            "seconds_per_iteration": round(r.seconds / max(1, r.step), 4), "curve": curve,
            "loss_last_100": sum(r.losses[-100:]) / max(1, len(r.losses[-100:])), "checkpoint": ck}


def references() -> dict:
    import torch

    torch.set_num_threads(1)
    import edmrt

    score = _scorer()
    cd = edmrt.load("digits-cd")
    return {"digits-cd": {f"fd_train_{k}": score(cd, levels=lv) for k, lv in LEVELS.items()},
            "teacher_heun_18": score(edmrt.load("digits"), solver="heun", steps=18)}


def table(result: dict) -> str:
    ref = result["references"]
    lines = [f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}; {result['iters']} iterations "
             f"per run (batch 64, lr {result['lr']}, seed {result['seed']}), one thread per run, "
             f"{result['jobs']} runs at a time; {result['seconds']:.0f} s in all.", "",
             f"FD-train of 1000 samples (lower is better). References on the same seeds: full student digits-cd "
             f"{ref['digits-cd']['fd_train_1']:.2f} (1 step) / {ref['digits-cd']['fd_train_2']:.2f} (2 steps); "
             f"teacher Heun 18 steps (35 NFE) {ref['teacher_heun_18']:.2f}.", ""]
    its = sorted({p["iteration"] for run in result["runs"] for p in run["curve"]})
    head = "| adapter | rank | parameters | s / it | " + " | ".join(f"it {i}" for i in its) + " |"
    for k in LEVELS:
        lines += [f"FD-train, {k} step{'s' if k != '1' else ''}:", "", head,
                  "|" + "---|" * (4 + len(its))]
        for run in result["runs"]:
            by_it = {p["iteration"]: p[f"fd_train_{k}"] for p in run["curve"]}
            lines.append(f"| {'DoRA' if run['dora'] else 'LoRA'} | {run['rank']} | {run['adapter_parameters']:,} | "
                         f"{run['seconds_per_iteration']:.3f} | "
                         + " | ".join(f"{by_it[i]:.2f}" if i in by_it else "" for i in its) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LEVELS), figsize=(5.5 * len(LEVELS), 4), squeeze=False)
    colours = {4: "tab:blue", 8: "tab:orange", 32: "tab:green"}
    for ax, k in zip(axes[0], LEVELS):
        for run in result["runs"]:
            xs = [p["iteration"] for p in run["curve"]]
            ys = [p[f"fd_train_{k}"] for p in run["curve"]]
            ax.plot(xs, ys, ls="--" if run["dora"] else "-", marker="o", ms=3,
                    color=colours.get(run["rank"]), label=f"{'DoRA' if run['dora'] else 'LoRA'} r{run['rank']}")
        ax.axhline(result["references"]["digits-cd"][f"fd_train_{k}"], color="k", lw=0.8, ls=":",
                   label="full student digits-cd")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("FD-train (1000 samples)")
        ax.set_title(f"few-step adapter, {k} step{'s' if k != '1' else ''}")
        ax.legend(fontsize=8)
    fig.suptitle(f"LoRA vs DoRA consistency distillation of digits ({result['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--keep", metavar="DIR", help="keep each run's checkpoint folder under DIR")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.common import machine_name

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = args.keep
    t0 = time.perf_counter()
    jobs = [(r, d) for r in args.ranks for d in (False, True)]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        ref_f = pool.submit(references)
        futs = [pool.submit(run_one, r, d, args.iters, args.every, args.lr, args.seed, keep) for r, d in jobs]
        runs = [f.result() for f in futs]
        refs = ref_f.result()
    import torch

    result = {"benchmark": "lora_dora_digits", "machine": f"{machine_name().split(' (')[0]} (1 thread per run)",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "seconds": round(time.perf_counter() - t0, 1), "iters": args.iters, "every": args.every, "lr": args.lr,
              "seed": args.seed, "jobs": args.jobs, "samples": SAMPLES, "seeds_from": SEEDS_FROM, "levels": LEVELS,
              "references": refs, "runs": runs}
    (out / "lora_dora_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lora_dora_digits.md").write_text("# LoRA vs DoRA: the few-step adapter's FD-train against iterations\n\n"
                                             + table(result) + "\n")
    plot(result, out / "lora_dora_digits.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
