"""``edmrt train``: EDM training of the class-conditional UNet on scikit-learn's 8x8 digits."""
from __future__ import annotations

import numpy as np

from .common import command_line, output_path, positive_int

HELP = "EDM training of the class-conditional UNet on scikit-learn's 8x8 digits"


def register(sub) -> None:
    p = sub.add_parser("train", help=HELP)
    p.add_argument("--config", default="digits", help="UNet config (digits; tiny for tests)")
    p.add_argument("--iters", type=positive_int, default=2500, help="total iterations (a resumed run continues up to it)")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null label (CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (written every 500 iterations and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder up to --iters")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="write the EMA weights + OUT.json model card")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.lab.common import machine_name
    from edmrt.lab.train import TrainOptions, export_weights, train

    if args.output:
        output_path(args.output, create=True)
    opts = TrainOptions(config=args.config, iters=args.iters, batch=args.batch, lr=args.lr, seed=args.seed,
                        p_uncond=args.p_uncond, ema_decay=args.ema)
    r = train(opts, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    loss = float(np.mean(r.losses[-100:])) if r.losses else float("nan")
    print(f"trained {r.options.config} for {r.step} iterations (batch {r.options.batch}, seed {r.options.seed}) in "
          f"{r.seconds:.1f} s; loss (mean of the last 100) {loss:.4f}, first 100 {np.mean(r.losses[:100]):.4f}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint}")
    if args.output:
        card = export_weights(r, args.output, {"command": command_line(args), "machine": machine_name()})
        print(f"wrote {args.output} and {str(args.output).rsplit('.', 1)[0]}.json "
              f"({len(card['architecture'])} architecture fields)")
    return 0
