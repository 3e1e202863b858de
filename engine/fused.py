"""The fused executor: a callable denoiser in the loop, every update one fused step.

Buffers are float32 and allocated once; per stage the loop does one network call and one
``edmrt.kernels.fused_step`` (Triton on CUDA, C++ on the CPU), with no host sync and no
Python branching on device values.  ``engine/executor.py`` stays the float64 definition.
"""
from __future__ import annotations

from typing import Callable

import torch

from .plan import Plan

__all__ = ["execute_fused"]


def execute_fused(plan: Plan, net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_init: torch.Tensor,
                  seeds: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Run ``plan`` from ``x_init`` (float32, any device) with ``net(x_in, c_noise (B, 1, ..))``; returns x."""
    from edmrt.kernels import Stepper, philox_normal, plan_table

    if not isinstance(x_init, torch.Tensor) or x_init.dtype != torch.float32 or x_init.ndim < 1:
        raise ValueError("x_init must be a float32 tensor of shape (B, ...) for the fused executor")
    dev, B = x_init.device, x_init.shape[0]
    if seeds is None:
        if plan.stochastic:
            raise ValueError(f"plan {plan.solver!r} is stochastic (noise scales > 0): pass seeds")
        seeds = torch.zeros(B, dtype=torch.int64)
    seeds = seeds.to(device=dev, dtype=torch.int64)
    table = plan_table(plan, dev)
    x = x_init.clone().contiguous()
    if plan.n_init > 0.0:
        x += plan.n_init * philox_normal(seeds, 1, x.shape[1:], torch.float32, dev)
    x_eval = x.clone()
    Y = torch.zeros((plan.history,) + tuple(x.shape), dtype=torch.float32, device=dev)
    x_in = (plan.c_in[0] * x).contiguous()
    sigma_in = torch.full((B,), plan.c_noise[0], dtype=torch.float32, device=dev)
    sig_view = sigma_in.view((B,) + (1,) * (x.ndim - 1))
    step = Stepper(table, x, x_eval, Y, x_in, sigma_in, seeds, impl=impl)
    for s in range(plan.stages):
        F = net(x_in, sig_view)
        if not isinstance(F, torch.Tensor) or F.shape != x.shape:
            raise ValueError(f"the network must return a tensor of shape {tuple(x.shape)}, got "
                             f"{tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__} at stage {s}")
        F = F.to(torch.float32).contiguous() if (F.dtype != torch.float32 or not F.is_contiguous()) else F
        step(s, F)
    return x
