"""Argument checks shared by the runtime's entry points: real numbers, devices, seeds, callables' signatures.  Each
raises ValueError naming the argument and what it expects."""
from __future__ import annotations

import decimal
import inspect
import numbers

import numpy as np
import torch

__all__ = ["is_real", "check_device", "check_seeds", "check_signature"]


def is_real(value) -> bool:
    """A real number: an int, a float, a Fraction or Decimal, a NumPy scalar or a one-element real torch tensor; not a
    bool, a string or a complex number."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and (value.is_floating_point() or value.dtype in _INT_DTYPES)
    return isinstance(value, (numbers.Real, decimal.Decimal, np.integer, np.floating))


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_device(device, name: str = "device") -> torch.device:
    """A torch device that exists here: "cpu", "cuda" or "cuda:N" (with a CUDA device present)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} is {device!r} but no CUDA device is usable here (torch.cuda.is_available() is False)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"{name} is {device!r} but there are {torch.cuda.device_count()} CUDA devices")
    return d


def check_signature(fn, name: str, call: str, n_args: int, kwargs=()) -> None:
    """``fn`` can be called with ``n_args`` positional arguments and the keyword arguments ``kwargs`` (``call`` shows
    them), or ValueError.  Callables
    whose signature Python cannot read (some builtins) pass: their first call will tell."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable as {call}, got {type(fn).__name__}")
    if isinstance(fn, type):
        # A class is callable, but calling it builds an object rather than returning a tensor (int(x, sigma) fails
        # with a message about indices): an nn.Module class instead of an instance is the usual slip.
        raise ValueError(f"{name} must be callable as {call}, got the class {fn.__name__} itself "
                         f"(pass an instance, e.g. {fn.__name__}(...))")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*range(n_args), **{k: 0 for k in kwargs})
    except TypeError:
        raise ValueError(f"{name} must be callable as {call} ({n_args} positional arguments"
                         f"{', keywords ' + ', '.join(kwargs) if kwargs else ''}), "
                         f"got {getattr(fn, '__name__', type(fn).__name__)}{sig}") from None


def check_seeds(seeds, batch: int | None = None) -> list[int]:
    """Seeds: one non-negative integer < 2**63 per sample (``batch`` of them, when given).  Integers only: a float,
    a bool or a float tensor is refused, never truncated."""
    if isinstance(seeds, (torch.Tensor, np.ndarray)):
        integer = seeds.dtype in (torch.int32, torch.int64) if isinstance(seeds, torch.Tensor) else seeds.dtype.kind in "iu"
        if not integer or seeds.ndim != 1:
            raise ValueError(f"seeds must be a 1-D integer tensor or array, or a list of ints, got {seeds.dtype} of shape "
                             f"{tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)):
        raise ValueError(f"seeds must be a sequence of integers, got {seeds!r}")
    try:
        seeds = list(seeds)
    except TypeError:
        raise ValueError(f"seeds must be a sequence of {batch or 'N'} integers, got {seeds!r}") from None
    if batch is None and not seeds:
        raise ValueError("seeds must hold at least one integer")
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"seeds must hold one integer per sample: expected {batch}, got {len(seeds)}")
    out = []
    for s in seeds:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, int) and not hasattr(s, "__index__"):
            raise ValueError(f"seeds must be integers, got {s!r}")
        s = int(s)
        if not 0 <= s < 2 ** 63:
            raise ValueError(f"seeds must be in [0, 2**63), got {s}")
        out.append(s)
    return out
