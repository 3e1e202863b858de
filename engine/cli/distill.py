"""``edmrt distill``: consistency distillation of a bundled teacher into a 1-4 step student."""
from __future__ import annotations

import numpy as np

from .common import command_line, output_path, positive_int

HELP = "consistency distillation of a bundled teacher into a 1-4 step student"


def register(sub) -> None:
    p = sub.add_parser("distill", help=HELP)
    p.add_argument("--teacher", default="digits", help="a bundled model (default digits)")
    p.add_argument("--iters", type=positive_int, default=3000, help="total iterations (a resumed run continues up to it)")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--N", type=int, default=18, help="Karras discretisation levels of [sigma_min, sigma_max]")
    p.add_argument("--mu", type=float, default=0.95, help="EMA decay of the target network")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped student")
    p.add_argument("--loss", default="pseudo_huber", choices=["pseudo_huber", "l2"])
    p.add_argument("--weighting", default="uniform", choices=["uniform", "inverse_gap"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (written every 500 iterations and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder up to --iters")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="write the EMA student + OUT.json model card")
    p.add_argument("--max-steps", type=int, default=4,
                   help="with -o: choose the card's noise levels for 2..MAX_STEPS step sampling (1: Karras' levels)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.lab.common import machine_name
    from edmrt.lab.distill import DistillOptions, distill, export_student, select_levels, student_model
    from edmrt.models.bundled import load

    if args.output:
        output_path(args.output, create=True)
    teacher = load(args.teacher)
    opts = DistillOptions(iters=args.iters, batch=args.batch, lr=args.lr, N=args.N, mu=args.mu, ema_decay=args.ema,
                          loss=args.loss, weighting=args.weighting, seed=args.seed)
    r = distill(teacher, opts, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    loss = float(np.mean(r.losses[-100:])) if r.losses else float("nan")
    print(f"distilled {args.teacher} for {r.step} iterations (batch {r.options.batch}, N {r.options.N}, seed "
          f"{r.options.seed}) in {r.seconds:.1f} s; loss (mean of the last 100) {loss:.4f}, first 100 "
          f"{np.mean(r.losses[:100]):.4f}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint}")
    if args.output:
        levels = None
        if args.max_steps > 1:
            levels = select_levels(student_model(r, teacher), max_steps=args.max_steps, progress=not args.quiet)
            print("sampling levels (by FD against the training split): " + "; ".join(
                f"{k} steps {[round(v, 4) for v in lv]}" for k, lv in levels["levels"].items()))
        export_student(r, teacher, args.output, {"command": command_line(args), "machine": machine_name()}, levels)
        print(f"wrote {args.output} and {str(args.output).rsplit('.', 1)[0]}.json")
    return 0
