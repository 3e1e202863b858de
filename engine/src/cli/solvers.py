"""``edmrt solvers``: list the registered solvers, their options and their references."""
from __future__ import annotations

HELP = "list the solvers"


def register(sub) -> None:
    sub.add_parser("solvers", help=HELP).set_defaults(fn=run)


def run(args) -> int:
    import edmrt
    from edmrt.solvers import solver_options

    s = edmrt.make_sigmas("karras", 10)
    rows = []
    for name in sorted(edmrt.SOLVERS):
        p = edmrt.plan(name, s)
        opts = solver_options(name)
        doc = (edmrt.SOLVERS[name].__doc__ or "").strip().splitlines()[0]
        rows.append((name, f"{p.nfe / p.steps:.2f}", ", ".join(f"{k}={v}" for k, v in opts.items()) or "-", doc))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'solver'.ljust(w[0])}  {'NFE/step (N=10)'.ljust(15)}  {'options'.ljust(w[2])}  reference")
    for r in rows:
        print(f"{r[0].ljust(w[0])}  {r[1].ljust(15)}  {r[2].ljust(w[2])}  {r[3]}")
    return 0
