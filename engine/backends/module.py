"""A torch module as the network: eager, or compiled with ``torch.compile``."""
from __future__ import annotations

import torch
from torch import nn

from .base import check_backend_args

__all__ = ["TorchBackend", "torch_compile"]


class TorchBackend:
    """A torch module ``net(x_in, c_noise, class_labels) -> F`` (put in eval mode), eager or ``torch.compile``d.

    ``dtype`` is the I/O dtype (x_in, c_noise, out): float32 also for an ``EDMUNet.to_fp16()`` net, whose
    float16 lives inside.
    ``out.copy_(F)``: the one allocation per call is the network's own output.  ``compile=True`` compiles
    lazily, at the first call; a compiler failure there (no C++ toolchain, an unsupported op) raises
    RuntimeError saying so, rather than silently running eager.
    """

    def __init__(self, net: nn.Module, compile: bool = False, dtype: torch.dtype = torch.float32, **compile_options):
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net.eval()
        self.conditional = int(getattr(net, "num_classes", 0) or 0) > 0
        self.compiled = bool(compile)
        self.name = "torch-compile" if compile else "torch"
        self._fn = torch.compile(net, **compile_options) if compile else net
        self._first = True
        p = next(net.parameters(), None)
        self.device = p.device if p is not None else None
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype (of x_in, c_noise and out) must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        check_backend_args(x_in, c_noise, class_labels, out, self.conditional, self.dtype, self.dtype)
        if self.device is not None and x_in.device != self.device:
            raise ValueError(f"x_in is on {x_in.device} but the network is on {self.device}")
        with torch.inference_mode():
            if self.compiled and self._first:
                try:
                    F = self._fn(x_in, c_noise, class_labels)
                except Exception as exc:
                    raise RuntimeError(f"torch.compile failed on {x_in.device} ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:300]}); use backend 'torch' (eager) instead") from exc
                self._first = False
            else:
                F = self._fn(x_in, c_noise, class_labels)
            if F.shape != out.shape:
                raise ValueError(f"the network returned shape {tuple(F.shape)}, expected {tuple(out.shape)}")
            out.copy_(F)


def torch_compile(net: nn.Module, **options) -> TorchBackend:
    """``TorchBackend(net, compile=True, **options)``: the "torch-compile" entry of the registry."""
    return TorchBackend(net, compile=True, **options)
