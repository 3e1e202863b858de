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

__all__ = ["Model", "CondInput", "sampling_defaults", "check_sampling", "card_options", "card_shift", "card_schedule_options",
           "free_inputs"]

_COND_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)


@dataclass(frozen=True)
class CondInput:
    """One conditioning input of a network: the keyword ``name`` it is passed as, its per-sample ``shape`` and
    ``dtype``, and its unconditional row for classifier-free guidance (``null``).

    ``null``: a number (the unconditional row is filled with it: class labels' null label, zeros), ``"cond"`` (the
    unconditional row repeats the conditional one: SDXL's ``time_ids``, LCM's ``timestep_cond``), or None (the
    caller passes it in ``uncond``: negative prompt embeddings).  ``num_classes`` > 0 marks an integer input whose
    values lie in [0, num_classes) (class labels; the null label may be num_classes itself).  ``free``: the indices
    of ``shape`` whose size the given tensors decide (a text input's token count: ``(0,)``); ``shape`` holds the
    default, and ``Sampler.sample`` takes other sizes there on backends that run any shape (``free_inputs``).

    Examples: ``CondInput("class_labels", (), torch.int64, null=10, num_classes=10)``,
    ``CondInput("encoder_hidden_states", (77, 768))``, ``CondInput("time_ids", (6,), null="cond")``.
    """

    name: str
    shape: tuple = ()
    dtype: torch.dtype = torch.float32
    null: Any = None
    num_classes: int = 0
    free: tuple = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name in ("x_in", "c_noise", "F"):
            raise ValueError(f"a conditioning input's name must be a Python identifier other than x_in, c_noise and F, "
                             f"got {self.name!r}")
        shape = self.shape
        if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__")
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"{self.name}: shape must be a sequence of ints >= 1 (per sample), got {shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        if self.dtype not in _COND_DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {list(_COND_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.num_classes and self.dtype != torch.int64:
            raise ValueError(f"{self.name}: an input with num_classes must have dtype torch.int64, got {self.dtype}")
        free = self.free
        if (isinstance(free, (str, bytes)) or not hasattr(free, "__len__")
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(self.shape) for i in free)):
            raise ValueError(f"{self.name}: free must be indices into its shape {self.shape}, got {free!r}")
        object.__setattr__(self, "free", tuple(sorted(set(free))))
        null = self.null
        if not (null is None or null == "cond" or (isinstance(null, (int, float)) and not isinstance(null, bool)
                                                   and np.isfinite(null))):
            raise ValueError(f"{self.name}: null must be a finite number, 'cond' or None, got {null!r}")

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
             "null": self.null, "num_classes": self.num_classes}
        return {**d, "free": list(self.free)} if self.free else d


def free_inputs(inputs: tuple, cond, uncond) -> tuple:
    """``inputs`` with each free size (``CondInput.free``) taken from the tensors given for it in ``cond`` /
    ``uncond`` ((N, *shape) or (*shape)); an input whose given tensors do not fit its other sizes is left as it is
    (the request's check names it).  ValueError when cond and uncond give one input different free sizes (its
    rows share one buffer)."""
    out = []
    for c in inputs:
        sizes = {}
        for what, d in (("cond", cond), ("uncond", uncond)):
            t = d.get(c.name) if isinstance(d, dict) else None
            if not c.free or not isinstance(t, torch.Tensor) or t.ndim not in (len(c.shape), len(c.shape) + 1):
                continue
            per = tuple(t.shape[t.ndim - len(c.shape):])
            if all(per[i] == c.shape[i] for i in range(len(c.shape)) if i not in c.free) and min(per) >= 1:
                sizes[what] = per
        if len(set(sizes.values())) > 1:
            raise ValueError(f"cond[{c.name!r}] has shape {sizes['cond']} per sample and uncond[{c.name!r}] "
                             f"{sizes['uncond']}: the conditional and unconditional rows share one buffer; give both "
                             "the same length (pad the shorter, as diffusers' pipelines require too)")
        shape = next(iter(sizes.values()), c.shape)
        out.append(c if shape == c.shape else CondInput(c.name, shape, c.dtype, c.null, c.num_classes, c.free))
    return tuple(out)


def check_cond_inputs(cond, num_classes: int) -> tuple:
    """The model's conditioning inputs: ``cond`` (CondInputs, unique names) plus class labels when num_classes > 0."""
    if isinstance(cond, CondInput):
        cond = (cond,)
    if not isinstance(cond, (tuple, list)) or not all(isinstance(c, CondInput) for c in cond):
        raise ValueError(f"cond must be a sequence of edmrt.CondInput, got {cond!r:.200}")
    cond = tuple(cond)
    names = [c.name for c in cond]
    if len(set(names)) != len(names):
        raise ValueError(f"cond names must be unique, got {names}")
    if num_classes:
        labels = CondInput("class_labels", (), torch.int64, null=num_classes, num_classes=num_classes)
        if "class_labels" not in names:
            cond = (labels,) + cond
        elif cond[names.index("class_labels")] != labels:
            raise ValueError(f"num_classes={num_classes} contradicts cond's class_labels {cond[names.index('class_labels')]}")
    return cond


@dataclass
class Model:
    """A model: network + preconditioning + sample shape + conditioning + sigma range + metadata.

    ``network(x_in, c_noise, **cond)`` returns the raw output F (an ``nn.Module`` or callable), where ``cond``
    maps each conditioning input's name to a (B, *shape) tensor (``CondInput``); an unconditional network is
    called ``network(x_in, c_noise)``.  ``num_classes`` > 0 is shorthand for the input
    ``CondInput("class_labels", (), torch.int64, null=num_classes, num_classes=num_classes)``: label
    ``num_classes`` is the null label used by classifier-free guidance.  ``cond`` left empty takes the network's
    own ``cond_inputs`` attribute when it has one.  ``decoder`` (optional) maps the final state (N, *sample_shape)
    to images (N, 3, H, W) in [-1, 1] (a VAE's decode, ``edmrt.adapters.diffusers.VAEDecoder``).  ``metadata``
    holds the model card (``edmrt.load``), whose ``sampling`` entry gives the defaults of ``sampling_defaults``.
    """

    network: Any
    precond: Precond = field(default_factory=EDMPrecond)
    sample_shape: tuple = (3, 32, 32)
    num_classes: int = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    metadata: dict = field(default_factory=dict)
    cond: tuple = ()
    decoder: Any = None

    def __post_init__(self):
        shape = self.sample_shape
        if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or not len(shape)
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"sample_shape must be a non-empty sequence of ints >= 1, got {shape!r}")
        self.sample_shape = tuple(int(d) for d in shape)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        check_range(self.sigma_min, self.sigma_max)
        if not self.cond and isinstance(getattr(self.network, "cond_inputs", None), (tuple, list)):
            self.cond = tuple(self.network.cond_inputs)
        self.cond = check_cond_inputs(self.cond, self.num_classes)
        if not isinstance(self.network, torch.nn.Module):
            names = ", ".join(f"{c.name}=..." for c in self.cond)
            check_signature(self.network, "network", f"network(x_in, c_noise{', ' if names else ''}{names}) -> F", 2,
                            self.cond_names)
        if self.decoder is not None and not callable(self.decoder):
            raise ValueError(f"decoder must be callable as decoder(latents) -> images, got {type(self.decoder).__name__}")
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

    @property
    def cond_names(self) -> tuple:
        return tuple(c.name for c in self.cond)


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
    options = sampling.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"the model card's sampling.options must map option names to values, got {options!r}")
    params = sampling.get("schedule_options", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                               and not isinstance(v, bool) for k, v in params.items()):
        raise ValueError("the model card's sampling.schedule_options must map schedule parameters to numbers "
                         f"({{\"s\": 0.008}}), got {params!r}")


def card_options(model: Model) -> dict:
    """The options of the model card's default solver (``sampling.options``: e.g. a diffusers UniPC's order and
    variant), which a Sampler takes when the caller chose neither the solver nor any option."""
    return dict((model.metadata.get("sampling") or {}).get("options") or {})


def sampling_defaults(model: Model, solver: str | None, steps: int | None, schedule) -> tuple[str, int, Any]:
    """(solver, steps, schedule) with the model card's ``sampling`` entry filling what is None.

    A card's ``sampling`` holds ``solver`` and ``steps`` (the teacher: heun, 18) and, for a distilled model, the
    noise levels chosen for each step count (``levels``: {"2": [80, tau_1, 0], ...}) and the solvers they are meant
    for (``solvers``); otherwise the schedule is the card's ``schedule`` (a flow model's "flow", with its ``shift``)
    or Karras et al.'s."""
    sampling = model.metadata.get("sampling") or {}
    solver = solver if solver is not None else sampling.get("solver", "heun")
    steps = steps if steps is not None else int(sampling.get("steps", 18))
    if schedule is None:
        levels = (sampling.get("levels") or {}).get(str(steps))
        schedule = levels if levels is not None and solver in sampling.get("solvers", ()) else \
            sampling.get("schedule", "karras")
    return solver, steps, schedule


def card_shift(model: Model) -> float:
    """The flow-time shift of the card's schedule (``sampling.shift``: SD3's 3.0), 1 where the card has none."""
    return float((model.metadata.get("sampling") or {}).get("shift", 1.0))


def card_schedule_options(model: Model) -> dict:
    """The parameters of the card's named schedule beyond its range (``sampling.schedule_options``: Stable Cascade's
    cosine schedule's ``s`` and ``scaler``), which ``make_sigmas`` passes to a schedule that takes them."""
    return dict((model.metadata.get("sampling") or {}).get("schedule_options") or {})
