"""``edmrt metrics``: train and ship the digits classifier behind FD-digits, or measure a bundled model into its card."""
from __future__ import annotations

import json

from .common import command_line, output_path

HELP = ("train the digits classifier used by FD-digits and write it (default: over the shipped one), or "
        "(--evaluate NAME) measure a bundled model and record it in its card")


def register(sub) -> None:
    p = sub.add_parser("metrics", help=HELP)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="classifier weights (default: the shipped file)")
    p.add_argument("--evaluate", metavar="NAME", help="a bundled model or adapter: write its metrics into its card")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.lab.metrics import CLASSIFIER, record_card_metrics, write_classifier
    from edmrt.models.bundled import BUNDLED_ADAPTERS, WEIGHTS_DIR

    if args.evaluate:
        for r in record_card_metrics(args.evaluate):
            print(json.dumps(r))
        card = WEIGHTS_DIR / args.evaluate / "edmrt.json" if args.evaluate in BUNDLED_ADAPTERS else \
            WEIGHTS_DIR / (args.evaluate + ".json")
        print(f"wrote metrics into {card}")
        return 0
    out = str(output_path(args.output or WEIGHTS_DIR / f"{CLASSIFIER}.safetensors"))
    card = write_classifier(out, epochs=args.epochs, seed=args.seed, command=command_line(args))
    m = card["metrics"]
    print(f"wrote {out}: held-out accuracy {m['test_accuracy']:.4f}, FD-digits floor {m['fd_digits_floor']:.3f}, "
          f"{card['training']['wall_time_s']:.1f} s")
    return 0
