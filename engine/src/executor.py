"""The reference executor: a plain torch loop over a plan; the definition every fast path must meet.

No per-step ``.item()`` and no Python branching on tensor values: every branch below is on a
host float of the plan, decided before the loop could have been captured.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .checks import check_seeds
from .plan import Plan

__all__ = ["execute", "SeededNoise", "NoiseSource"]


class NoiseSource(Protocol):
    def __call__(self, stream: int) -> torch.Tensor: ...


class SeededNoise:
    """Standard normal noise keyed by (sample seed, stream): a sample's noise never depends on its batch.

    Counter-based Philox4x32-10 (``edmrt.kernels.philox``), the same numbers the C++ core and the
    Triton kernel draw: the plan's stream 0 (the churn before stage 0) is Philox's ``CHURN_STREAM``, its
    stream s + 1 (the noise of stage s) is ``stage_stream(s)``.  Drawn in float32 and cast to ``dtype``.
    """

    def __init__(self, seeds: Sequence[int], sample_shape: Sequence[int], dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        self.seeds = check_seeds(seeds, len(seeds) if not isinstance(seeds, torch.Tensor) else seeds.numel())
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self._seeds = torch.tensor(self.seeds, dtype=torch.int64, device=self.device)

    def __call__(self, stream: int) -> torch.Tensor:
        from edmrt.kernels.philox import CHURN_STREAM, philox_normal, stage_stream

        return philox_normal(self._seeds, CHURN_STREAM if stream == 0 else stage_stream(stream - 1), self.sample_shape,
                             torch.float32, self.device).to(self.dtype)


def execute(plan: Plan, net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_init: torch.Tensor,
            noise: NoiseSource | None = None) -> torch.Tensor:
    """Run ``plan`` from ``x_init`` in ``x_init``'s dtype and device; returns the final state.

    ``net(x_in, c_noise)`` returns the raw network output F for the input ``c_in * x_eval``; ``c_noise``
    is a tensor of shape (B, 1, ..., 1) (with ``Identity`` preconditioning, F is D and c_noise is sigma).
    ``noise(stream)`` gives standard normal noise shaped like ``x_init``; required iff the plan is stochastic.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an edmrt Plan, got {type(plan).__name__}")
    if not isinstance(x_init, torch.Tensor) or not x_init.is_floating_point() or x_init.ndim < 1:
        raise ValueError("x_init must be a floating-point torch.Tensor of shape (B, ...)")
    if plan.stochastic and noise is None:
        raise ValueError(f"plan {plan.solver!r} is stochastic (noise scales > 0): pass a noise source (seeds)")
    from edmrt.kernels.reference import history_entry, precondition  # the stage equations, defined once
    S, K = plan.stages, plan.history
    # Host copies of the plan: Python floats, so the loop never touches device values.
    c_in, c_noise, c_skip, c_out = (getattr(plan, k).tolist() for k in ("c_in", "c_noise", "c_skip", "c_out"))
    alpha, beta, a, e, n = (getattr(plan, k).tolist() for k in ("alpha", "beta", "a", "e", "n"))
    b, commit = plan.b.tolist(), plan.commit.tolist()
    bshape = (x_init.shape[0],) + (1,) * (x_init.ndim - 1)

    x = x_init
    if plan.n_init > 0.0:
        x = x + plan.n_init * noise(0)
    x_eval = x
    Y: list[torch.Tensor | None] = [None] * K  # ring: Y[s % K]
    for s in range(S):
        # Network evaluation with preconditioning (EDM Eq. 7).
        sig_in = torch.full(bshape, c_noise[s], dtype=x.dtype, device=x.device)
        F = net(c_in[s] * x_eval, sig_in)
        if not isinstance(F, torch.Tensor) or F.shape != x.shape or not F.is_floating_point():
            raise ValueError(f"the network must return a real floating-point tensor of shape {tuple(x.shape)}, got "
                             f"{f'{F.dtype} {tuple(F.shape)}' if isinstance(F, torch.Tensor) else type(F).__name__} "
                             f"at stage {s}")
        D = precondition(c_skip[s], c_out[s], x_eval, F.to(x.dtype))
        # History entry.
        Y[s % K] = history_entry(alpha[s], beta[s], x_eval, D)
        # Linear update.
        x_new = a[s] * x + e[s] * x_eval
        for k in range(min(K, s + 1)):
            if b[s][k] != 0.0:
                x_new = x_new + b[s][k] * Y[(s - k) % K]
        if n[s] > 0.0:
            x_new = x_new + n[s] * noise(s + 1)
        x_eval = x_new
        if commit[s]:
            x = x_new
    return x
