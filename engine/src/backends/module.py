"""A torch module as the network: eager, or compiled with ``torch.compile``."""
from __future__ import annotations

import torch
from torch import nn

from .base import BoundCheck, as_cond, cond_inputs_of
from .custom import CallableBackend

__all__ = ["TorchBackend"]


class TorchBackend:
    """A torch module ``net(x_in, c_noise, **cond) -> F`` (put in eval mode), eager or ``torch.compile``d.

    ``cond_inputs``: the conditioning inputs every call must bind (``Model.cond``); default the network's own
    ``cond_inputs`` attribute, or class labels when it has ``num_classes`` > 0.

    ``dtype`` is the I/O dtype (x_in, c_noise, out): float32 also for an ``EDMUNet.to_fp16()`` net, whose
    float16 lives inside.
    ``out.copy_(F)``: the one allocation per call is the network's own output.  ``compile=True`` compiles
    lazily, at the first call; a compiler failure there (no C++ toolchain, an unsupported op) raises
    RuntimeError saying so, rather than silently running eager.
    ``autocast``: None, or torch.bfloat16 / torch.float16 to run the network under ``torch.autocast`` on its device
    (the "torch-bf16" entry: bf16 matrix work on CPUs that have it), I/O and the sampler's state staying float32.
    """

    shares_weights = True   # runs the module's own parameters: an in-place adapter swap reaches it at once

    def __init__(self, net: nn.Module, compile: bool = False, dtype: torch.dtype = torch.float32, cond_inputs=None,
                 autocast: torch.dtype | None = None, **compile_options):
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net.eval()
        self.cond_inputs = cond_inputs_of(net, cond_inputs)
        self.conditional = bool(self.cond_inputs)
        self.compiled = bool(compile)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        self.name = ("torch-compile" if compile else "torch") + ({torch.bfloat16: "-bf16", torch.float16: "-fp16"}
                                                                  .get(autocast, ""))
        self._fn = torch.compile(net, **compile_options) if compile else net
        self._first = True
        p = next(net.parameters(), None)
        self.device = p.device if p is not None else None
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype (of x_in, c_noise and out) must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self._check = BoundCheck(cond_inputs=self.cond_inputs, in_dtype=dtype, out_dtype=dtype, ndim=None)

    @classmethod
    def from_model(cls, model, device: torch.device, digest=None, **options):
        """The model's network moved to ``device`` (``compile``, ``autocast``: the registry's variants); a network
        that is not a torch module runs as a ``CallableBackend`` instead, except under autocast (refused)."""
        net = model.network
        if not isinstance(net, nn.Module) and options.get("autocast") is None:
            return CallableBackend(net, cond_inputs=model.cond)
        return cls(net.to(device) if isinstance(net, nn.Module) else net, cond_inputs=model.cond, **options)

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None:
        self._check(x_in, c_noise, cond, out)
        cond = as_cond(cond)
        if self.device is not None and x_in.device != self.device:
            raise ValueError(f"x_in is on {x_in.device} but the network is on {self.device}")
        with torch.inference_mode(), torch.autocast(x_in.device.type, dtype=self.autocast or torch.bfloat16,
                                                    enabled=self.autocast is not None):
            if self.compiled and self._first:
                try:
                    F = self._fn(x_in, c_noise, **cond)
                except Exception as exc:
                    raise RuntimeError(f"torch.compile failed on {x_in.device} ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:300]}); use backend 'torch' (eager) instead") from exc
                self._first = False
            else:
                F = self._fn(x_in, c_noise, **cond)
            if not isinstance(F, torch.Tensor) or F.shape != out.shape or not F.is_floating_point():
                got = f"{F.dtype} {tuple(F.shape)}" if isinstance(F, torch.Tensor) else type(F).__name__
                raise ValueError(f"the network must return a real floating-point tensor of shape {tuple(out.shape)}, "
                                 f"got {got}")
            out.copy_(F)   # cast back to out's dtype under autocast
