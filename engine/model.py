"""A model: the network and everything the sampler must know about it (preconditioning, shape, classes,
sigma range), plus the model card's sampling defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checks import check_signature
from .precond import EDMPrecond, Precond
from .schedules import check_range, check_sigmas

__all__ = ["Model", "sampling_defaults", "check_sampling"]


@dataclass
class Model:
    """A model: network + preconditioning + sample shape + conditioning + sigma range + metadata.

    ``network(x_in, c_noise, class_labels)`` returns the raw output F (an ``nn.Module`` or callable);
    ``num_classes`` > 0 makes it class-conditional with label ``num_classes`` as the null label used by
    classifier-free guidance.  ``metadata`` holds the model card (``edmrt.load``), whose ``sampling``
    entry gives the defaults of ``sampling_defaults``.
    """

    network: Any
    precond: Precond = field(default_factory=EDMPrecond)
    sample_shape: tuple = (3, 32, 32)
    num_classes: int = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        shape = self.sample_shape
        if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or not len(shape)
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"sample_shape must be a non-empty sequence of ints >= 1, got {shape!r}")
        self.sample_shape = tuple(int(d) for d in shape)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        check_range(self.sigma_min, self.sigma_max)
        if not isinstance(self.network, torch.nn.Module):
            check_signature(self.network, "network", "network(x_in, c_noise, class_labels) -> F", 3)
        if not isinstance(self.precond, Precond):
            raise ValueError(f"precond must be an edmrt Precond (e.g. EDMPrecond()), got {type(self.precond).__name__}")
        # A network that states its own classes and channels must agree with the model's.
        net_classes = getattr(self.network, "num_classes", None)
        if isinstance(net_classes, int) and net_classes != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} contradicts the network's num_classes={net_classes}")
        net_shape = getattr(self.network, "sample_shape", None)
        if isinstance(net_shape, tuple) and net_shape and tuple(net_shape) != self.sample_shape:
            raise ValueError(f"sample_shape {self.sample_shape} contradicts the network's sample_shape {tuple(net_shape)} "
                             "(the shape it was built and trained for)")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict (the model card), got {type(self.metadata).__name__}")
        check_sampling(self.metadata.get("sampling"))

    @property
    def null_label(self) -> int:
        return self.num_classes


def check_sampling(sampling) -> None:
    """A model card's ``sampling`` entry: None, or {"solver": str, "steps": int >= 1, "solvers": [str, ...],
    "levels": {"N": [sigma_0, ..., 0], ...}, ...}; ValueError naming the first field that is not."""
    if sampling is None:
        return
    if not isinstance(sampling, dict):
        raise ValueError(f"the model card's sampling must be an object (solver, steps, levels), got {sampling!r}")
    solver, steps = sampling.get("solver", "heun"), sampling.get("steps", 18)
    if not isinstance(solver, str):
        raise ValueError(f"the model card's sampling.solver must be a solver name, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the model card's sampling.steps must be an int >= 1, got {steps!r}")
    solvers = sampling.get("solvers", [])
    if not isinstance(solvers, list) or not all(isinstance(v, str) for v in solvers):
        raise ValueError(f"the model card's sampling.solvers must be a list of solver names, got {solvers!r}")
    levels = sampling.get("levels", {})
    if not isinstance(levels, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, list) and len(v) == int(k) + 1
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for k, v in levels.items()):
        raise ValueError("the model card's sampling.levels must map a step count N to N + 1 noise levels "
                         f"(\"2\": [80, tau_1, 0]), got {levels!r}")
    for k, v in levels.items():
        check_sigmas(v, f"the model card's sampling.levels[{k!r}]")


def sampling_defaults(model: Model, solver: str | None, steps: int | None, schedule) -> tuple[str, int, Any]:
    """(solver, steps, schedule) with the model card's ``sampling`` entry filling what is None.

    A card's ``sampling`` holds ``solver`` and ``steps`` (the teacher: heun, 18) and, for a distilled model, the
    noise levels chosen for each step count (``levels``: {"2": [80, tau_1, 0], ...}) and the solvers they are meant
    for (``solvers``); otherwise the schedule is Karras et al.'s."""
    sampling = model.metadata.get("sampling") or {}
    solver = solver if solver is not None else sampling.get("solver", "heun")
    steps = steps if steps is not None else int(sampling.get("steps", 18))
    if schedule is None:
        levels = (sampling.get("levels") or {}).get(str(steps))
        schedule = levels if levels is not None and solver in sampling.get("solvers", ()) else "karras"
    return solver, steps, schedule
