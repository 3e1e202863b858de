"""``edmrt quality``: quality per NFE on the exact Gaussian mixture (default), or on the bundled digits models."""
from __future__ import annotations

import json
from pathlib import Path

from .common import output_path, positive_int

HELP = ("quality per NFE: every solver on the exact Gaussian mixture (default), or FD-digits of the bundled teacher "
        "and its distilled student (--model digits)")


def register(sub) -> None:
    p = sub.add_parser("quality", help=HELP)
    p.add_argument("--model", default="gmm", help="gmm (exact mixture, default) or digits (the bundled models)")
    p.add_argument("--student", nargs="+", default=["digits-cd"],
                   help="digits: the distilled student(s) run at 1-4 steps (a bundled model, or a bundled few-step "
                        "adapter such as digits-cd-lora, fused into the teacher)")
    p.add_argument("--no-student", action="store_true", help="digits: teacher solvers only")
    p.add_argument("--blocks", type=positive_int, default=5, help="digits: blocks of 197 samples per configuration")
    p.add_argument("--dims", type=positive_int, nargs="+", default=[64, 2])
    p.add_argument("--samples", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="mixture and noise seed")
    p.add_argument("--nfe", type=positive_int, nargs="+", help="NFE budgets (gmm: 3 5 6 8 10 16 20 35; digits: 2 .. 35)")
    p.add_argument("--solvers", nargs="+", help="solver/recipe names (default: all; digits: euler heun dpmpp_2m "
                                                "ipndm unipc)")
    p.add_argument("--peers", action="store_true", help="also run the installed k-diffusion and diffusers samplers")
    p.add_argument("--learned", nargs="*", metavar="PLAN.json",
                   help="also a learned solver: gmm: fitted per mixture and NFE (edmrt.optimize_solver, no files); "
                        "digits: the plan files of edmrt fit-solver, one row each")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", help="output stem: STEM.json, STEM.md, STEM.png (default quality_gmm / "
                                          "quality_digits)")
    p.set_defaults(fn=run)


def run(args) -> int:
    stem = Path(args.output or ("quality_gmm" if args.model == "gmm" else "quality_digits"))
    for suffix in (".json", ".md", ".png"):
        output_path(stem.with_suffix(suffix), create=True)  # before minutes of work
    return run_gmm(args) if args.model == "gmm" else run_digits(args)


def run_gmm(args) -> int:
    from edmrt.lab import quality_gmm as Q

    nfes = args.nfe or list(Q.NFES)
    names = args.solvers or list(Q.RECIPES)
    unknown = [n for n in names if n not in Q.RECIPES]
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; expected names from {sorted(Q.RECIPES)}")
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 (the sliced Wasserstein distance compares sets), got {args.samples}")
    if args.learned:
        raise ValueError("--learned on gmm fits a solver for each mixture and NFE: give it without plan files")
    result = Q.run_quality(dims=args.dims, samples=args.samples, seed=args.seed, nfes=nfes,
                           recipes=[Q.RECIPES[n] for n in names], peers=args.peers, progress=not args.quiet,
                           learned=args.learned is not None)
    for dim in args.dims:
        print(Q.table(result, dim, "rmse"))
        print()
    paths = Q.write_results(result, Path(args.output or "quality_gmm"), make_plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_digits(args) -> int:
    from edmrt.lab import quality_digits as QD
    from edmrt.models.bundled import BUNDLED
    from edmrt.solvers import get_solver

    if args.model not in BUNDLED:
        raise ValueError(f"--model must be gmm or a bundled teacher ({', '.join(BUNDLED)}), got {args.model!r}")
    for name in args.solvers or ():
        get_solver(name)
    student = None if args.no_student else args.student
    if args.learned is not None and not args.learned:
        raise ValueError("--learned on digits runs plan files: edmrt fit-solver --model digits -o FILE.json first")
    missing = [f for f in args.learned or () if not Path(f).is_file()]
    if missing:
        raise ValueError(f"--learned: no such file {missing[0]!r}")
    result = QD.run_quality_digits(args.model, student, nfes=args.nfe or QD.NFES,
                                   solvers=args.solvers or QD.TEACHER_SOLVERS, blocks=args.blocks,
                                   progress=not args.quiet, learned=args.learned or ())
    paths = QD.write_results_digits(result, Path(args.output or "quality_digits"), make_plot=not args.no_plot)
    print(QD.table(result))
    print("goals: " + json.dumps(QD.goals(result)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
