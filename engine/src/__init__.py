"""edmrt: a sampling engine for diffusion models in the EDM formulation (Karras et al. 2022, arXiv 2206.00364).

A sampler is a float64 coefficient plan built once (``edmrt.plan``); one fused step per network evaluation
executes every plan (``edmrt.Sampler`` / ``edmrt.Engine`` for models, ``edmrt.solve`` for any denoiser
callable, ``edmrt.execute`` the float64 reference loop).  docs/ARCHITECTURE.md walks the path from seeds to
image and names the module of each step.  ``import edmrt`` loads torch, numpy and this package only; the lab
(``edmrt.lab``: training, distillation, metrics, quality studies, peers), the exporters (``edmrt.export``)
and optional libraries are imported where they are used.
"""
from __future__ import annotations

from .adapters.diffusers import from_diffusers
from .executor import SeededNoise, execute
from .model import CondInput, Model
from .loading import load
from .learned import LearnedSolver, load_learned, optimize_solver
from .optimize import OptimizedSchedule, optimize_schedule
from .pipelines import CascadeSampler, Inversion, cascade, edit, inpaint, invert
from .plan import Plan
from .precond import (ConsistencyPrecond, EDMPrecond, EpsilonPrecond, FlowPrecond, IDDPMPrecond, Identity, LCMPrecond,
                      Precond, VEPrecond, VPPrecond, VPredictionPrecond, WuerstchenPrecond, X0Precond,
                      sigmas_from_alphas_cumprod)
from .engine import Engine
from .sampler import Sampler
from .schedules import SCHEDULES, make_sigmas
from .solve import solve
from .solvers import SOLVERS, build_plan

__version__ = "0.1.0"
__all__ = [
    "plan", "solve", "make_sigmas", "execute", "Plan", "SOLVERS", "SCHEDULES", "SeededNoise", "Engine", "Model", "CondInput",
    "Sampler",
    "Precond", "Identity", "EDMPrecond", "ConsistencyPrecond", "VPPrecond", "VEPrecond", "IDDPMPrecond",
    "EpsilonPrecond", "VPredictionPrecond", "X0Precond", "LCMPrecond", "FlowPrecond", "WuerstchenPrecond",
    "sigmas_from_alphas_cumprod", "from_diffusers",
    "optimize_schedule", "OptimizedSchedule", "optimize_solver", "LearnedSolver", "load_learned", "load", "invert", "Inversion", "edit", "inpaint", "cascade",
    "CascadeSampler",
]


def plan(solver: str, sigmas, precond: Precond | None = None, **options) -> Plan:
    """Build the float64 coefficient plan of ``solver`` on the schedule ``sigmas`` (descending, ending in 0).

    ``precond=None`` means the network is a denoiser D(x; sigma) itself (``Identity``).
    Unknown solver names and options raise ``ValueError`` listing what is known.
    """
    return build_plan(solver, sigmas, precond, **options)
