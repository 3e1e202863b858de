"""Any callable as the network: ``fn(x_in, c_noise, **cond) -> F``, checked and copied into ``out``."""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels.dispatch import overlaps
from .base import BoundCheck, as_cond, cond_inputs_of, describe

__all__ = ["CallableBackend"]


class CallableBackend:
    """A callable network (not a torch module, or a closure such as ``edmrt.solve``'s denoiser) as a backend.

    ``fn(x_in, c_noise, **cond)`` receives the engine's buffers as they are (x_in of any rank >= 1, c_noise of
    shape (B,), one keyword per conditioning input: ``cond_inputs``, or class labels when ``conditional``).  Its return value must be a
    real floating-point tensor of exactly x_in's shape; it is copied (and cast) into ``out``, detached.  No
    autograd context is imposed: the callable may use gradients itself.  Thread safety is the callable's: an
    engine calls it under its own lock, engines of one Sampler may call it concurrently.

    ``pass_through=True`` (``edmrt.solve``): a returned tensor that already is what ``out`` would hold (out's dtype,
    shape and device, contiguous, not sharing memory with x_in or out) is returned, detached, for the engine to read
    as F in place of ``out``, saving a copy per evaluation; anything else is copied into ``out`` as usual.
    """

    name = "custom"
    shares_weights = True   # the callable runs whatever weights it closes over: an in-place swap reaches it

    @classmethod
    def from_model(cls, model, device: torch.device, digest=None, **options):
        """The model's network as it is (a callable): ``CallableBackend(model.network, cond_inputs=model.cond)``."""
        return cls(model.network, cond_inputs=model.cond, **options)

    def __init__(self, fn: Callable[..., torch.Tensor], conditional: bool = False, cond_inputs=None,
                 pass_through: bool = False):
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(x_in, c_noise, **cond), got {type(fn).__name__}")
        self.fn = fn
        self.cond_inputs = cond_inputs_of(fn, bool(conditional) if cond_inputs is None else cond_inputs)
        self.conditional = bool(self.cond_inputs)
        self.pass_through = bool(pass_through)
        self._check = BoundCheck(cond_inputs=self.cond_inputs, ndim=None)   # once per set of an engine's buffers

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None,
                 out: torch.Tensor) -> torch.Tensor | None:
        self._check(x_in, c_noise, cond, out)
        F = self.fn(x_in, c_noise, **as_cond(cond))
        # Exactly the output's shape (no broadcast of a smaller one) and a real dtype (no complex part dropped).
        if not isinstance(F, torch.Tensor) or F.shape != out.shape or not F.is_floating_point():
            raise ValueError(f"the network must return a real floating-point tensor of shape {tuple(out.shape)}, got "
                             f"{describe(F) if isinstance(F, torch.Tensor) else type(F).__name__}")
        if (self.pass_through and F.dtype == out.dtype and F.device == out.device and F.is_contiguous()
                and not overlaps(F, x_in) and not overlaps(F, out)):
            return F.detach()
        out.copy_(F.detach())  # the engine's buffers never join an autograd graph
        return None

