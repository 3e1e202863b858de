"""Solvers: pure host functions ``solver(sigmas, precond, **options) -> Plan``, built in float64.

Each solver is written in the paper's symbols; every decision that k-diffusion or diffusers
make per step inside their loops (churn, the last step to sigma = 0, a multistep warm-up) is
made here, once, as a row of the plan.  One registry: ``SOLVERS``.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..plan import Plan
from ..precond import Identity, Precond
from ..schedules import check_sigmas
from .dpm import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde
from .edm import edm, euler, euler_ancestral, heun
from .fewstep import consistency, lcm, tcd
from .multistep import ipndm, ipndm_afs, lms
from .unipc import unipc

__all__ = ["SOLVERS", "UPWARD_SOLVERS", "get_solver", "build_plan", "solver_options"]

SOLVERS: dict[str, Callable[..., Plan]] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "edm": edm,
    "consistency": consistency,
    "tcd": tcd,
    "lcm": lcm,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "ipndm": ipndm,
    "ipndm_afs": ipndm_afs,
    "lms": lms,
    "unipc": unipc,
}


# The solvers that also run a schedule upward (an inversion: the probability-flow ODE from an image to noise): the
# deterministic ones whose updates hold for either sign of the step (tests/test_inversion.py: their error against the
# exact ODE falls at their order).  Stochastic and few-step solvers add noise or jump to the data: not an inversion.
UPWARD_SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "lms")


def get_solver(name: str) -> Callable[..., Plan]:
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}") from None


def solver_options(name: str) -> dict[str, object]:
    """The options a solver accepts, with their defaults."""
    sig = inspect.signature(get_solver(name))
    return {k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_plan(solver: str, sigmas, precond: Precond | None = None, **options) -> Plan:
    """Validate the solver name, its options, the schedule and the preconditioning; then build the plan."""
    fn = get_solver(solver)
    known = solver_options(solver)
    for k in options:
        if k not in known:
            raise ValueError(f"unknown option {k!r} for solver {solver!r}; expected one of {sorted(known) or 'none'}")
    s = check_sigmas(sigmas)
    if s[0] < s[-1] and (solver not in UPWARD_SOLVERS or float(options.get("S_churn", 0.0) or 0.0) != 0.0):
        raise ValueError(f"solver {solver!r}{' with S_churn' if solver in UPWARD_SOLVERS else ''} does not run a "
                         f"schedule upward (an inversion); expected one of {list(UPWARD_SOLVERS)}, deterministic")
    if precond is None:
        precond = Identity()
    if not isinstance(precond, Precond):
        raise ValueError(f"precond must be an edmrt Precond (e.g. EDMPrecond()) or None, got {type(precond).__name__}")
    return fn(s, precond, **options)
