"""``edmrt bench``: solvers x steps x backends x batch sizes of one model, timed side by side (``edmrt.lab.bench``)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import command_line, output_path, positive_int

HELP = "measure solvers, steps, backends and batch sizes of a model (images/s, latency, NFE/s, overhead; --peers)"


def register(sub) -> None:
    p = sub.add_parser("bench", help=HELP)
    p.add_argument("--model", default="digits", help="a bundled model (default digits), a local diffusers folder "
                   "(its --peers: the folder's own pipeline), or a benchmark network with random weights: "
                   "unet-cifar10, unet-sd15")
    p.add_argument("--solvers", nargs="+", default=None, help="default heun dpmpp_2m; a diffusers folder: its "
                   "scheduler's method")
    p.add_argument("--steps", nargs="+", type=positive_int, default=[], help="step counts (default: the card's)")
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    p.add_argument("--batch", nargs="+", type=positive_int, default=None, help="batch sizes (default 1 8 64)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="interleaved timed rounds after one warm-up (default 3)")
    p.add_argument("--quick", action="store_true", help="batches 1 and 8 and one timed round unless --batch / "
                   "--rounds say otherwise (a first look; the full run's batch-64 cells are its slowest part)")
    p.add_argument("--peers", action="store_true", help="also k-diffusion's and diffusers' loops of each solver (a "
                   "diffusers folder: its own pipeline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", metavar="STEM", help="write STEM.json, STEM.md, STEM.png (default bench_MODEL)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.lab.bench import QUICK, plot_bench, run_bench, table, time_summary
    from edmrt.solvers import get_solver

    batches = args.batch or list(QUICK["batches"] if args.quick else (1, 8, 64))
    rounds = args.rounds or (QUICK["rounds"] if args.quick else 3)

    for name in args.solvers or ():
        get_solver(name)
    stem = Path(args.output or f"bench_{Path(args.model).name or 'model'}")
    output_path(stem.with_suffix(".json"), create=True)
    result = run_bench(args.model, args.solvers, args.steps, args.backends, batches, rounds=rounds,
                       peers=args.peers, device=args.device, progress=not args.quiet)
    result["command"] = command_line(args)
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    flags = ", ".join(result["cpu_flags"]) or "none of avx2 / avx512 / amx"
    md = "\n".join([f"# edmrt bench --model {args.model} ({result['machine']}, {result['date']})", "",
                    f"CPU flags: {flags}; {versions}.", "",
                    f"`{result['command']}`: {result['rounds']} interleaved rounds after a warm-up; latency per call "
                    "of the whole batch; 'vs bare network': each call's time over the time spent inside its network calls (median); peak MB: the process's peak RSS after the cell "
                    "(CPU).", "", table(result), "", time_summary(result) + ".", ""])
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)
    plot_bench(result, stem.with_suffix(".png"))
    print(table(result))
    print(time_summary(result))
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {stem.with_suffix('.png')}")
    return 0
