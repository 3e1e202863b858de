"""The backend protocol: one call per network evaluation, writing F into a buffer the engine owns.

    backend(x_in, c_noise, class_labels, out) -> None        # writes F(x_in; c_noise, class_labels) into out

=============  ===================================================================================
x_in           (B, C, H, W), contiguous, the model's input dtype (float32 for every edmrt export)
c_noise        B values: shape (B,) or (B, 1, ..., 1) (the executors' sigma view), contiguous, x_in's dtype
class_labels   (B,) int64 for a conditional model (num_classes = the null label); None otherwise
out            (B, C, H, W), contiguous, preallocated by the caller; every element is overwritten
=============  ===================================================================================

All tensors on one device.  Arguments are checked on host metadata only (no device sync); a wrong
shape, dtype or device raises ValueError naming it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Backend", "check_backend_args", "describe"]


@runtime_checkable
class Backend(Protocol):
    """Writes the network output F into a caller-owned buffer."""

    name: str

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None: ...


def describe(t) -> str:
    """A tensor's dtype, shape and device (or the type of a non-tensor), for error messages."""
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_backend_args(x_in, c_noise, class_labels, out, conditional: bool, in_dtype: torch.dtype | None = None,
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
    if conditional:
        if (not isinstance(class_labels, torch.Tensor) or class_labels.shape != (B,) or class_labels.dtype != torch.int64
                or class_labels.device != dev or not class_labels.is_contiguous()):
            raise ValueError(f"class_labels must be a contiguous int64 tensor of shape ({B},) on {dev} for a conditional "
                             f"model (the null label for unconditional rows), got {describe(class_labels)}")
    elif class_labels is not None:
        raise ValueError(f"class_labels must be None for an unconditional model, got {describe(class_labels)}")
    want = out_dtype if out_dtype is not None else x_in.dtype
    if (not isinstance(out, torch.Tensor) or out.shape != x_in.shape or out.dtype != want or out.device != dev
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {want} tensor of shape {tuple(x_in.shape)} on {dev}, got {describe(out)}")
