"""The backend protocol: one call per network evaluation, writing F into a buffer the engine owns.

    backend(x_in, c_noise, cond, out) -> None        # writes F = network(x_in, c_noise, **cond) into out

=============  ===================================================================================
x_in           (B, C, H, W), contiguous, the model's input dtype (float32 for every edmrt export)
c_noise        B values: shape (B,) or (B, 1, ..., 1) (the executors' sigma view), contiguous, x_in's dtype
cond           {name: (B, *shape) tensor} for every conditioning input the model declares (``edmrt.CondInput``:
               class labels int64, text embeddings float32, ...), contiguous; None (or {}) when it has none.
               A bare tensor is shorthand for {"class_labels": tensor}.
out            (B, C, H, W), contiguous, preallocated by the caller; every element is overwritten
=============  ===================================================================================

All tensors on one device.  Arguments are checked on host metadata only (no device sync); a wrong
shape, dtype or device raises ValueError naming it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..request import named_cond

__all__ = ["Backend", "check_backend_args", "describe", "as_cond", "cond_inputs_of", "BoundCheck"]


@runtime_checkable
class Backend(Protocol):
    """Writes the network output F into a caller-owned buffer."""

    name: str

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None: ...


def as_cond(cond) -> dict:
    """The protocol's ``cond`` as a dict: None -> {}, a tensor -> {"class_labels": tensor} (``named_cond``), a dict as
    is."""
    if cond is not None and not isinstance(cond, (dict, torch.Tensor)):
        raise ValueError(f"cond must be a dict of tensors (name -> (B, ...) tensor) or None, got {type(cond).__name__}")
    return named_cond(cond) or {}


def cond_inputs_of(net, cond_inputs=None) -> tuple:
    """The conditioning inputs a backend checks: ``cond_inputs`` when given (CondInputs, or True/False for class labels
    of an unknown count), else the network's ``cond_inputs`` attribute, else class labels when it has num_classes > 0."""
    from ..model import CondInput

    if cond_inputs is None:
        cond_inputs = getattr(net, "cond_inputs", None)
        if cond_inputs is None:
            cond_inputs = int(getattr(net, "num_classes", 0) or 0) > 0
    if isinstance(cond_inputs, bool):
        return (CondInput("class_labels", (), torch.int64),) if cond_inputs else ()
    return tuple(cond_inputs)


def describe(t) -> str:
    """A tensor's dtype, shape and device (or the type of a non-tensor), for error messages."""
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_backend_args(x_in, c_noise, cond, out, cond_inputs: tuple = (), in_dtype: torch.dtype | None = None,
                       out_dtype: torch.dtype | None = None, sample_shape=None, batch: int | None = None,
                       ndim: int | None = 4) -> None:
    """Raise ValueError naming the first argument that breaks the protocol (module docstring); host metadata only.

    ``ndim``: the rank x_in must have (4 for images; None for a custom callable of any rank >= 1)."""
    if (not isinstance(x_in, torch.Tensor) or not x_in.is_floating_point() or x_in.ndim < 1
            or (ndim is not None and x_in.ndim != ndim)):
        want = "(B, C, H, W)" if ndim == 4 else "(B, ...)"
        raise ValueError(f"x_in must be a floating-point tensor of shape {want}, got {describe(x_in)}")
    dev, B = x_in.device, x_in.shape[0]
    if in_dtype is not None and x_in.dtype != in_dtype:
        raise ValueError(f"x_in must have dtype {in_dtype} (the model's input), got {x_in.dtype}")
    if sample_shape is not None and any(isinstance(e, int) and e != g for e, g in zip(sample_shape, x_in.shape[1:])):
        raise ValueError(f"x_in must have shape (B, {', '.join(str(e) for e in sample_shape)}), got {tuple(x_in.shape)}")
    if batch is not None and B != batch:
        raise ValueError(f"the model has a fixed batch of {batch}, got x_in of batch {B}")
    if not x_in.is_contiguous():
        raise ValueError("x_in must be contiguous")
    if (not isinstance(c_noise, torch.Tensor) or c_noise.ndim < 1 or c_noise.shape[0] != B
            or c_noise.numel() != B or c_noise.dtype != x_in.dtype or c_noise.device != dev or not c_noise.is_contiguous()):
        raise ValueError(f"c_noise must be a contiguous {x_in.dtype} tensor of shape ({B},) or ({B}, 1, ..., 1) on {dev}, "
                         f"got {describe(c_noise)}")
    cond = as_cond(cond)
    names = [c.name for c in cond_inputs]
    if set(cond) != set(names):
        raise ValueError(f"cond must hold exactly the model's conditioning inputs {names}, got {sorted(cond)}")
    for c in cond_inputs:
        t, shape = cond[c.name], (B,) + c.shape
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != c.dtype or t.device != dev
                or not t.is_contiguous()):
            raise ValueError(f"cond[{c.name!r}] must be a contiguous {c.dtype} tensor of shape {shape} on {dev}, "
                             f"got {describe(t)}")
    want = out_dtype if out_dtype is not None else x_in.dtype
    if (not isinstance(out, torch.Tensor) or out.shape != x_in.shape or out.dtype != want or out.device != dev
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {want} tensor of shape {tuple(x_in.shape)} on {dev}, got {describe(out)}")


class BoundCheck:
    """``check_backend_args`` once per set of buffers, as the fused step's ``Stepper`` binds its own: an engine calls
    its backend with the same tensors at every stage, so a call with the very tensor objects last checked (compared by
    identity: the same x_in, c_noise, out and the same cond tensors under the same names) is not checked again."""

    def __init__(self, **check_options):
        self.options, self._seen = check_options, None

    def __call__(self, x_in, c_noise, cond, out) -> None:
        key = (x_in, c_noise, out, tuple(cond.items()) if isinstance(cond, dict) else cond)
        seen = self._seen
        if seen is not None and _same_objects(seen, key):
            return
        check_backend_args(x_in, c_noise, cond, out, **self.options)
        self._seen = key


def _same_objects(a: tuple, b: tuple) -> bool:
    """The same tensors (by identity) under the same names: (x_in, c_noise, out, cond items or cond)."""
    if any(x is not y for x, y in zip(a[:3], b[:3])):
        return False
    ca, cb = a[3], b[3]
    if isinstance(ca, tuple) and isinstance(cb, tuple):
        return len(ca) == len(cb) and all(ka == kb and va is vb for (ka, va), (kb, vb) in zip(ca, cb))
    return ca is cb
