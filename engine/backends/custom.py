"""Any callable as the network: ``fn(x_in, c_noise, **cond) -> F``, checked and copied into ``out``."""
from __future__ import annotations

from typing import Callable

import torch

from .base import as_cond, check_backend_args, cond_inputs_of, describe

__all__ = ["CallableBackend"]


class CallableBackend:
    """A callable network (not a torch module, or a closure such as ``edmrt.solve``'s denoiser) as a backend.

    ``fn(x_in, c_noise, **cond)`` receives the engine's buffers as they are (x_in of any rank >= 1, c_noise of
    shape (B,), one keyword per conditioning input: ``cond_inputs``, or class labels when ``conditional``).  Its return value must be a
    real floating-point tensor of exactly x_in's shape; it is copied (and cast) into ``out``, detached.  No
    autograd context is imposed: the callable may use gradients itself.  Thread safety is the callable's: an
    engine calls it under its own lock, engines of one Sampler may call it concurrently.
    """

    name = "custom"

    def __init__(self, fn: Callable[..., torch.Tensor], conditional: bool = False, cond_inputs=None):
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(x_in, c_noise, **cond), got {type(fn).__name__}")
        self.fn = fn
        self.cond_inputs = cond_inputs_of(fn, bool(conditional) if cond_inputs is None else cond_inputs)
        self.conditional = bool(self.cond_inputs)

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None:
        check_backend_args(x_in, c_noise, cond, out, self.cond_inputs, ndim=None)
        F = self.fn(x_in, c_noise, **as_cond(cond))
        # Exactly the output's shape (no broadcast of a smaller one) and a real dtype (no complex part dropped).
        if not isinstance(F, torch.Tensor) or F.shape != out.shape or not F.is_floating_point():
            raise ValueError(f"the network must return a real floating-point tensor of shape {tuple(out.shape)}, got "
                             f"{describe(F) if isinstance(F, torch.Tensor) else type(F).__name__}")
        out.copy_(F.detach())  # the engine's buffers never join an autograd graph
