"""The quality cost of bf16 and int8 on the CPU (issue 16): the digits teacher (Heun, 18 steps = 35 NFE) and student
(digits-cd, consistency at 1, 2 and 4 steps) sampled by torch eager fp32 (the reference), OpenVINO fp32, OpenVINO
bf16, torch's bf16 autocast and OpenVINO int8 (NNCF's post-training quantisation, calibrated on the model's own Heun
trajectories: ``edmrt.backends.calibrate``), from the same seeds and labels.

Per backend: FD-train and FD-digits (``edmrt quality``'s protocol: 5 blocks of 197 class-conditional samples, seeds
197 b .. 197 b + 196, test half A's labels; FD-train against the whole training split), class accuracy, and the
endpoint's difference from torch fp32 on the same seeds (RMSE over all samples, relative to the samples' RMS, and the
largest absolute difference, images in [-1, 1]).  The FD change is paired (same seeds): its mean and std over the
blocks are given beside the relative change.

    python benchmarks/bf16_quality.py              # writes benchmarks/results/bf16_quality_digits.{json,md}
    python benchmarks/bf16_quality.py --blocks 2 --out /tmp/q
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("torch", "openvino", "openvino-bf16", "torch-bf16", "openvino-int8")
RUNS = (("teacher", "digits", "heun", 18), ("student", "digits-cd", "consistency", 1),
        ("student", "digits-cd", "consistency", 2), ("student", "digits-cd", "consistency", 4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import edmrt
    from edmrt.lab.common import cpu_flags, held_out_halves, load_digits_split, machine_name
    from edmrt.lab.metrics import class_accuracy, digits_features, fd_digits_labels, frechet_distance, load_classifier

    clf = load_classifier()
    labels = fd_digits_labels()
    n = len(labels)
    (_, _), (xb, _) = held_out_halves()
    ref_test, ref_train = digits_features(xb, clf), digits_features(load_digits_split("train")[0], clf)
    rows, t_all = [], time.perf_counter()
    for role, name, solver, steps in RUNS:
        model = edmrt.load(name)
        base = None
        for backend in BACKENDS:
            s = edmrt.Sampler(model, solver=solver, steps=steps, backend=backend)
            xs, fd, fd_train, acc, secs = [], [], [], [], 0.0
            for b in range(args.blocks):
                t0 = time.perf_counter()
                x = s.sample(range(b * n, (b + 1) * n), cond=labels)
                secs += time.perf_counter() - t0
                f = digits_features(x, clf)
                xs.append(x)
                fd.append(frechet_distance(f, ref_test))
                fd_train.append(frechet_distance(f, ref_train))
                acc.append(class_accuracy(x, labels, clf))
            x = torch.cat(xs)
            row = {"role": role, "model": name, "solver": solver, "steps": steps, "nfe": s.plan.nfe,
                   "backend": backend, "fd_train": float(np.mean(fd_train)), "fd_train_blocks": fd_train,
                   "fd_digits": float(np.mean(fd)), "class_accuracy": float(np.mean(acc)),
                   "seconds_per_block": round(secs / args.blocks, 3)}
            if base is None:
                base = {"x": x, "fd_train": fd_train, "fd": fd}
            d = (x - base["x"]).double()
            paired = np.asarray(fd_train) - np.asarray(base["fd_train"])
            row.update(endpoint_rmse=float(d.pow(2).mean().sqrt()), endpoint_max_abs=float(d.abs().max()),
                       endpoint_rel_rmse=float(d.pow(2).mean().sqrt() / base["x"].double().pow(2).mean().sqrt()),
                       fd_train_change=float(paired.mean()),
                       fd_train_change_std=float(paired.std(ddof=1)) if args.blocks > 1 else 0.0,
                       fd_train_rel_change=float(paired.mean() / np.mean(base["fd_train"])))
            rows.append(row)
            print(f"{name} {solver} {steps} {backend}: FD-train {row['fd_train']:.2f} "
                  f"({100 * row['fd_train_rel_change']:+.2f}%), acc {row['class_accuracy']:.3f}, "
                  f"endpoint RMSE {row['endpoint_rmse']:.2e}", flush=True)
    result = {"benchmark": "bf16_quality_digits", "machine": machine_name(), "cpu_flags": cpu_flags(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "blocks": args.blocks,
              "samples_per_block": n, "seconds": round(time.perf_counter() - t_all, 1), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_quality_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    (out / "bf16_quality_digits.md").write_text(md)
    print(md)
    return 0


def _table(result: dict) -> str:
    lines = [f"# The quality cost of bf16 and int8 on the digits models ({result['machine']}; CPU flags "
             f"{', '.join(result['cpu_flags'])}; torch {result['torch']}, {result['date']})", "",
             f"{result['blocks']} blocks of {result['samples_per_block']} class-conditional samples, the same seeds "
             "and labels for every backend. FD change: paired against torch fp32 on the same seeds (mean ± std over "
             "the blocks). Endpoint: the samples' difference from torch fp32 (images in [-1, 1]).", "",
             "| model | solver | steps | NFE | backend | FD-train | FD change | FD-digits | class acc. | endpoint RMSE "
             "| rel. RMSE | max abs | s / block |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        change = "" if r["backend"] == "torch" else \
            f"{100 * r['fd_train_rel_change']:+.2f}% ({r['fd_train_change']:+.3f} ± {r['fd_train_change_std']:.3f})"
        lines.append(f"| {r['model']} | {r['solver']} | {r['steps']} | {r['nfe']} | {r['backend']} | "
                     f"{r['fd_train']:.2f} | {change} | {r['fd_digits']:.2f} | {100 * r['class_accuracy']:.1f}% | "
                     f"{r['endpoint_rmse']:.2e} | {r['endpoint_rel_rmse']:.2e} | {r['endpoint_max_abs']:.2e} | "
                     f"{r['seconds_per_block']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
