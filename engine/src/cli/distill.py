"""``edmrt distill``: consistency distillation of a bundled teacher into a 1-4 step student."""
from __future__ import annotations

import numpy as np

from .common import command_line, output_path, positive_int

HELP = "consistency distillation of a bundled teacher into a 1-4 step student (or, with --lora, a few-step adapter)"


def register(sub) -> None:
    p = sub.add_parser("distill", help=HELP)
    p.add_argument("--teacher", default="digits", help="a bundled model (default digits)")
    p.add_argument("--iters", type=positive_int, default=3000, help="total iterations (a resumed run continues up to it)")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 2e-4; 1e-3 with --lora)")
    p.add_argument("--lora", type=positive_int, metavar="RANK",
                   help="train a LoRA of this rank on the frozen teacher (the LCM-LoRA recipe) instead of a full "
                        "student; -o then names an adapter folder")
    p.add_argument("--dora", action="store_true", help="with --lora: DoRA (weight-decomposed LoRA)")
    p.add_argument("--lora-alpha", type=float, help="with --lora: LoRA's alpha (scale alpha / rank; default the rank)")
    p.add_argument("--N", type=int, default=18, help="Karras discretisation levels of [sigma_min, sigma_max]")
    p.add_argument("--mu", type=float, default=0.95, help="EMA decay of the target network")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped student")
    p.add_argument("--loss", default="pseudo_huber", choices=["pseudo_huber", "l2"])
    p.add_argument("--weighting", default="uniform", choices=["uniform", "inverse_gap"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (written every 500 iterations and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder up to --iters")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the EMA student (OUT.safetensors + OUT.json model card); with --lora, the adapter "
                        "folder OUT (peft's adapter_config.json + adapter_model.safetensors, edmrt.json card)")
    p.add_argument("--max-steps", type=int, default=4,
                   help="with -o: choose the card's noise levels for 2..MAX_STEPS step sampling (1: Karras' levels)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.lab.common import machine_name
    from edmrt.lab.distill import (DistillOptions, adapted_model, distill, export_adapter, export_student,
                                   select_levels, student_model)
    from edmrt.loading import load

    if (args.dora or args.lora_alpha is not None) and not args.lora:
        raise ValueError("--dora and --lora-alpha need --lora RANK")
    if args.output and not args.lora:
        output_path(args.output, create=True)
    teacher = load(args.teacher)
    lr = args.lr if args.lr is not None else (1e-3 if args.lora else 2e-4)
    opts = DistillOptions(iters=args.iters, batch=args.batch, lr=lr, N=args.N, mu=args.mu, ema_decay=args.ema,
                          loss=args.loss, weighting=args.weighting, seed=args.seed, lora_rank=args.lora or 0,
                          dora=args.dora, lora_alpha=args.lora_alpha)
    r = distill(teacher, opts, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    loss = float(np.mean(r.losses[-100:])) if r.losses else float("nan")
    what = f" into a rank-{opts.lora_rank} {'DoRA' if opts.dora else 'LoRA'}" if opts.lora_rank else ""
    print(f"distilled {args.teacher}{what} for {r.step} iterations (batch {r.options.batch}, N {r.options.N}, seed "
          f"{r.options.seed}) in {r.seconds:.1f} s; loss (mean of the last 100) {loss:.4f}, first 100 "
          f"{np.mean(r.losses[:100]):.4f}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint}")
    if args.output:
        levels = None
        if args.max_steps > 1:
            levels = select_levels(adapted_model(r, teacher) if opts.lora_rank else student_model(r, teacher),
                                   max_steps=args.max_steps, progress=not args.quiet)
            print("sampling levels (by FD against the training split): " + "; ".join(
                f"{k} steps {[round(v, 4) for v in lv]}" for k, lv in levels["levels"].items()))
        info = {"command": command_line(args), "machine": machine_name()}
        if opts.lora_rank:
            export_adapter(r, teacher, args.output, info, levels)
            print(f"wrote the adapter folder {args.output} (load it with edmrt.load({args.teacher!r}, "
                  f"adapters={{{str(args.output)!r}: 1.0}}) or edmrt sample --adapter {args.output})")
        else:
            export_student(r, teacher, args.output, info, levels)
            print(f"wrote {args.output} and {str(args.output).rsplit('.', 1)[0]}.json")
    return 0
