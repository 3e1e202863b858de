"""Quality per NFE on the bundled digits models (``edmrt quality --model digits``).

For each teacher solver at each NFE budget (the largest step count whose NFE fits, Karras levels) and for the
distilled student at 1-4 steps (``consistency`` and ``tcd`` on the levels of its model card), sample
``blocks`` disjoint blocks of 197 class-conditional samples (seeds 197 b .. 197 b + 196, test half A's labels:
the protocol of ``edmrt.lab.metrics.evaluate_digits``) and report FD-digits (mean and standard deviation over the
blocks) and the class accuracy; the real-vs-real floor is FD between the test split's two halves.

FD-train: the same blocks against the whole training split (1397 images) as the reference, with the floor
FD(test half A, training split) at the same sample size (197).  The larger reference set removes the
reference half's share of the noise (block std ~3 against ~5 for FD-digits); every row uses the same seeds,
so differences between rows are paired and less noisy than either std.  The teacher was trained on those
images, so a model that memorised them would score *below* the floor: read it as a comparison between
samplers of one model, not as a distance to the data distribution.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["TEACHER_SOLVERS", "STUDENT_RUNS", "NFES", "run_quality_digits", "table", "goals", "write_results_digits"]

TEACHER_SOLVERS = ("euler", "heun", "dpmpp_2m", "ipndm", "unipc")
NFES = (2, 3, 4, 5, 6, 8, 10, 16, 20, 35)
STUDENT_RUNS = (("consistency", {}), ("tcd", {"gamma": 0.3}))


def run_quality_digits(teacher: str = "digits", student: str | Sequence[str] | None = "digits-cd",
                       nfes: Sequence[int] = NFES,
                       solvers: Sequence[str] = TEACHER_SOLVERS, student_steps: Sequence[int] = (1, 2, 3, 4),
                       blocks: int = 5, progress: bool = True, learned: Sequence = ()) -> dict:
    """Every job's FD-digits, FD-train and class accuracy over ``blocks`` blocks (the module docstring).  ``learned``:
    plan files from ``edmrt fit-solver`` for the teacher, each run as one more row (solver ``learned:NAME``)."""
    from tqdm import tqdm

    from .common import held_out_halves, load_digits_split, machine_name
    from .metrics import class_accuracy, digits_features, fd_digits_labels, frechet_distance, load_classifier

    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {blocks!r}")
    clf = load_classifier()
    labels = fd_digits_labels()
    n = len(labels)
    (xa, _), (xb, _) = held_out_halves()
    ref, feats_a = digits_features(xb, clf), digits_features(xa, clf)
    ref_train = digits_features(load_digits_split("train")[0], clf)
    students = () if not student else (student,) if isinstance(student, str) else tuple(student)
    jobs = _jobs(teacher, students, nfes, solvers, student_steps, learned)
    rows = []
    t_start = time.perf_counter()
    bar = tqdm(total=len(jobs) * blocks, disable=not progress, desc="quality digits", unit="run", dynamic_ncols=True)
    for role, name, solver, opts, s in jobs:
        fds, fds_train, accs, secs = [], [], [], 0.0
        for b in range(blocks):
            t0 = time.perf_counter()
            x = s.sample(range(b * n, (b + 1) * n), cond=labels)
            secs += time.perf_counter() - t0
            feats = digits_features(x, clf)
            fds.append(frechet_distance(feats, ref))
            fds_train.append(frechet_distance(feats, ref_train))
            accs.append(class_accuracy(x, labels, clf))
            bar.update(1)
        rows.append({"role": role, "model": name, "solver": solver, "options": opts, "steps": s.steps,
                     "nfe": s.plan.nfe, "sigmas": [float(v) for v in s.plan.sigmas],
                     "fd_digits": float(np.mean(fds)), "fd_digits_std": float(np.std(fds, ddof=1)) if blocks > 1 else 0.0,
                     "fd_digits_blocks": fds, "fd_train": float(np.mean(fds_train)),
                     "fd_train_std": float(np.std(fds_train, ddof=1)) if blocks > 1 else 0.0,
                     "class_accuracy": float(np.mean(accs)),
                     "seconds_per_block": round(secs / blocks, 3)})
    bar.close()
    return {"benchmark": "quality_digits", "machine": machine_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - t_start, 1),
            "teacher": teacher, "student": students[0] if students else None, "students": list(students),
            "blocks": blocks, "samples_per_block": n,
            "protocol": "FD-digits (edmrt.lab.metrics) of each block of 197 class-conditional samples (test half A's "
                        "labels, seeds 197 b .. 197 b + 196) against test half B; mean and std over blocks",
            "fd_digits_floor": frechet_distance(feats_a, ref), "fd_train_floor": frechet_distance(feats_a, ref_train),
            "rows": rows}


def _jobs(teacher: str, students: tuple, nfes, solvers, student_steps, learned=()) -> list[tuple]:
    """(role, model name, solver, options, Sampler) for every teacher solver at each distinct NFE its step counts
    reach within the budgets, then each student's runs at ``student_steps``.  A student that is a bundled adapter
    (``BUNDLED_ADAPTERS``, e.g. digits-cd-lora) runs fused into the teacher."""
    from ..loading import load
    from ..models.bundled import BUNDLED_ADAPTERS
    from ..plan import Plan
    from ..sampler import Sampler
    from .quality_gmm import Recipe, steps_for

    t_model = load(teacher)
    jobs = []
    for solver in solvers:
        seen = set()
        for nfe in nfes:
            steps = steps_for(Recipe(solver, solver), nfe, t_model.sigma_min, t_model.sigma_max)
            if steps is None:
                continue
            s = Sampler(t_model, solver=solver, steps=steps, backend="torch", device="cpu")
            if s.plan.nfe in seen:
                continue
            seen.add(s.plan.nfe)
            jobs.append(("teacher", teacher, solver, {}, s))
    for path in learned:
        s = Sampler(t_model, plan=Plan.load(path), backend="torch", device="cpu")
        jobs.append(("learned", teacher, f"learned:{Path(path).stem}", {}, s))
    for student in students:
        s_model = load(teacher, adapters={student: 1.0}) if student in BUNDLED_ADAPTERS else load(student)
        for solver, opts in STUDENT_RUNS:
            for k in student_steps:
                s = Sampler(s_model, solver=solver, steps=k, backend="torch", device="cpu", **opts)
                jobs.append(("student", student, solver, opts, s))
    return jobs


def table(result: dict) -> str:
    out = ["| model | solver | steps | NFE | FD-digits (mean ± std) | FD-train (mean ± std) | class accuracy | "
           "s / 197 samples |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        out.append(f"| {r['model']} | {r['solver']}{f' ({opts})' if opts else ''} | {r['steps']} | {r['nfe']} | "
                   f"{r['fd_digits']:.1f} ± {r['fd_digits_std']:.1f} | {r['fd_train']:.2f} ± {r['fd_train_std']:.2f} | "
                   f"{100 * r['class_accuracy']:.1f}% | "
                   f"{r['seconds_per_block']:.2f} |")
    return "\n".join(out)


def goals(result: dict) -> dict:
    """The issue's goals, read off the rows: teacher Heun at 35 NFE vs the floor, student 2-step vs 1.5x that."""
    rows = result["rows"]
    heun35 = next((r for r in rows if r["role"] == "teacher" and r["solver"] == "heun" and r["nfe"] == 35), None)
    first = result.get("student")
    cm2 = next((r for r in rows if r["role"] == "student" and r["model"] == first and r["solver"] == "consistency"
                and r["steps"] == 2), None)
    out = {"fd_digits_floor": result["fd_digits_floor"]}
    if heun35:
        out["teacher_heun_35"] = heun35["fd_digits"]
    if cm2:
        out["student_consistency_2"] = cm2["fd_digits"]
    out["fd_train_floor"] = result["fd_train_floor"]
    if heun35:
        out["teacher_heun_35_fd_train"] = heun35["fd_train"]
    if cm2:
        out["student_consistency_2_fd_train"] = cm2["fd_train"]
    if heun35 and cm2:
        out["student_2_step_over_teacher_35"] = cm2["fd_digits"] / heun35["fd_digits"]
        out["student_2_step_over_teacher_35_fd_train"] = cm2["fd_train"] / heun35["fd_train"]
        out["student_goal_met"] = cm2["fd_digits"] <= 1.5 * heun35["fd_digits"]
    for other in result.get("students", [])[1:]:  # each further student's FD-train against the first's
        for k in (1, 2, 4):
            a = next((r for r in rows if r["model"] == other and r["solver"] == "consistency" and r["steps"] == k), None)
            b = next((r for r in rows if r["model"] == first and r["solver"] == "consistency" and r["steps"] == k), None)
            if a and b:
                out[f"{other}_over_{first}_fd_train_{k}_steps"] = a["fd_train"] / b["fd_train"]
    cond = [r["class_accuracy"] for r in rows if (r["role"] == "teacher" and r["nfe"] >= 10) or r["role"] == "student"]
    if cond:
        out["min_class_accuracy_teacher_nfe_ge_10_and_student"] = min(cond)
    return out


def plot_digits(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    cmap = plt.get_cmap("tab10")
    groups = list(dict.fromkeys((r["role"], r["model"], r["solver"]) for r in result["rows"]))
    for k, (role, model, solver) in enumerate(groups):
        pts = sorted((r["nfe"], r["fd_digits"], r["fd_digits_std"], r["class_accuracy"], r["fd_train"],
                      r["fd_train_std"]) for r in result["rows"]
                     if r["role"] == role and r["model"] == model and r["solver"] == solver)
        style = dict(ls="-", marker="o") if role == "teacher" else dict(ls="--", marker="s", lw=2)
        label = f"{model}: {solver}"
        nfe = [p[0] for p in pts]
        axes[0].errorbar(nfe, [p[1] for p in pts], yerr=[p[2] for p in pts], color=cmap(k % 10), ms=4, capsize=2,
                         label=label, **style)
        axes[1].errorbar(nfe, [p[4] for p in pts], yerr=[p[5] for p in pts], color=cmap(k % 10), ms=4, capsize=2,
                         label=label, **style)
        axes[2].plot(nfe, [100 * p[3] for p in pts], color=cmap(k % 10), ms=4, label=label, **style)
    floor = result["fd_digits_floor"]
    axes[0].axhline(floor, color="k", lw=0.8, ls=":", label=f"real-vs-real floor {floor:.1f}")
    g = goals(result)
    if "teacher_heun_35" in g:
        axes[0].axhline(1.5 * g["teacher_heun_35"], color="r", lw=0.8, ls="-.",
                        label=f"1.5 x teacher Heun 35 NFE = {1.5 * g['teacher_heun_35']:.1f}")
    axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="FD-digits (lower is better)",
                title=f"FD-digits per NFE ({result['blocks']} blocks of {result['samples_per_block']}; bars: std)")
    axes[1].axhline(result["fd_train_floor"], color="k", lw=0.8, ls=":",
                    label=f"test half A vs training split {result['fd_train_floor']:.1f}")
    axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="FD-train (lower is better)",
                title="FD against the training split (1397 images; less noisy)")
    axes[2].set(xscale="log", xlabel="NFE", ylabel="class accuracy (%)", title="conditional samples classified as asked")
    axes[2].axhline(90, color="r", lw=0.8, ls="-.", label="goal 90%")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"edmrt quality on the bundled digits models ({result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results_digits(result: dict, stem: Path, make_plot: bool = True) -> list[Path]:
    """``stem.json``, ``stem.md`` (the table and the goals) and ``stem.png``; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "goals": goals(result)}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1))
    g = result["goals"]
    md = ["# Quality per NFE on the bundled digits models", "",
          f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}; {result['seconds']} s.", "",
          result["protocol"] + f". Real-vs-real floor: {result['fd_digits_floor']:.2f}. FD-train: the same blocks "
          f"against the training split (1397 images); test half A against it: {result['fd_train_floor']:.2f} (the "
          "teacher was trained on these images: compare samplers with it, not models with data).", "", table(result), "",
          "Goals: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) and not isinstance(v, bool) else f"{k} = {v}"
                                for k, v in g.items()), ""]
    paths[1].write_text("\n".join(md))
    if make_plot:
        paths.append(stem.with_suffix(".png"))
        plot_digits(result, paths[2])
    return paths
