"""``edmrt plan SOLVER``: print a solver's coefficient plan as a table, optionally save its JSON."""
from __future__ import annotations

import logging

from .common import schedule_args, solver_options

HELP = "print a solver's coefficient plan as a table (optionally save its JSON)"
PRECOND_CHOICES = ("identity", "edm", "vp", "ve", "iddpm", "flow")
log = logging.getLogger("edmrt")


def register(sub) -> None:
    p = sub.add_parser("plan", help=HELP)
    p.add_argument("solver")
    schedule_args(p)
    p.add_argument("--precond", default="identity", choices=PRECOND_CHOICES,
                   help="preconditioning of the network (default identity: the network returns D)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(fn=run)


def run(args) -> int:
    import edmrt
    from edmrt.precond import PRECONDS

    sigmas = edmrt.make_sigmas(args.schedule, args.steps, args.sigma_min, args.sigma_max, args.rho)
    p = edmrt.plan(args.solver, sigmas, PRECONDS[args.precond](), **solver_options(args.option))
    if args.json:
        p.save(args.json)
        log.info("wrote %s", args.json)
    print(p.table())
    return 0
