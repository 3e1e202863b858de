"""The fused step in plain torch: the readable oracle every fast implementation must equal.

Per element and stage s, with the plan's row r = table[s] (see ``table.py``):

    F     = F_u + w (F_c - F_u)              (classifier-free guidance; otherwise F)
    D     = c_skip x_eval + c_out F          (``precondition``, EDM Eq. 7)
    Y[s % K] = alpha x_eval + beta D         (``history_entry``)
    x_new = a x + e x_eval + sum_{k <= s} b_k Y[(s - k) % K] + n z,  z = N(seed, stage_stream(s), i) or a given map
    x_eval = x_new;  x = x_new if commit;  x_in = c_in_next x_new (both halves with guidance);  sigma_in = c_noise_next

Memory traffic per element (float32 state, F in bytes f, history depth K, guidance g in {0, 1}): reads
x (only where a != 0: plans set a = 0 wherever x == x_eval), x_eval, F (1 + g times) and the older history
entries the stage uses; writes Y[s] (only when K > 1: with K = 1 no later stage reads it), x_eval, x (if
commit), x_in (1 + g times).  ``bytes_moved`` counts them; the C++ step moves exactly these.
"""
from __future__ import annotations

import torch

from .philox import CHURN_STREAM, INITIAL_STREAM, philox_normal, stage_stream
from .table import COL, FIXED

__all__ = ["precondition", "history_entry", "fused_step_reference", "init_state_reference", "bytes_moved"]


def precondition(c_skip, c_out, x_eval: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """The denoiser from the raw network output, D = c_skip x + c_out F (EDM Eq. 7)."""
    return c_skip * x_eval + c_out * F


def history_entry(alpha, beta, x_eval: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The stage's history entry Y = alpha x_eval + beta D (Y = d: alpha = 1 / t, beta = -1 / t; Y = D: 0, 1)."""
    return alpha * x_eval + beta * D


def bytes_moved(plan, stage: int, numel: int, guidance: bool = False, f_bytes: int = 4) -> int:
    """Bytes one stage of ``plan`` must move for ``numel`` float32 state elements (the count above)."""
    g = 1 if guidance else 0
    reads = (plan.a[stage] != 0.0) + 1 + int(min(plan.history - 1, stage))
    writes = (plan.history > 1) + 1 + int(plan.commit[stage]) + (1 + g)
    return numel * (4 * (int(reads) + int(writes)) + f_bytes * (1 + g))


def fused_step_reference(table: torch.Tensor, stage: int, x: torch.Tensor, x_eval: torch.Tensor, F: torch.Tensor,
                         Y: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor, seeds: torch.Tensor,
                         guidance: float | None = None, noise: torch.Tensor | None = None) -> None:
    """One stage in place, reading the table row as device tensors (the noise scale once on the host).  ``noise``:
    the stage's given noise z (an inversion's noise map) in place of the Philox draw."""
    B = x.shape[0]
    K = table.shape[1] - FIXED
    r = table[stage].to(torch.float32)
    col = lambda name: r[COL[name]]  # noqa: E731  (0-d device tensors: no host sync)
    f = F.to(torch.float32)
    if guidance is not None:
        f_u, f_c = f[:B], f[B:]
        f = f_u + guidance * (f_c - f_u)
    D = precondition(col("c_skip"), col("c_out"), x_eval, f)
    y = history_entry(col("alpha"), col("beta"), x_eval, D)
    Y[stage % K] = y
    acc = col("a") * x + col("e") * x_eval + r[FIXED] * y
    for k in range(1, min(K, stage + 1)):
        acc = acc + r[FIXED + k] * Y[(stage - k) % K]
    # Noise: the one host read of the table (a sync on CUDA; this readable path is not the one a CUDA
    # graph captures), so that deterministic stages do not pay for drawing noise they multiply by 0.
    if float(table[stage, COL["n"]]) != 0.0:
        z = noise.to(torch.float32) if noise is not None else \
            philox_normal(seeds, stage_stream(stage), x.shape[1:], torch.float32, x.device)
        acc = acc + col("n") * z
    x_eval.copy_(acc)
    x.copy_(torch.where(col("commit") != 0, acc, x))
    nxt = (col("c_in_next") * acc).to(x_in.dtype)
    x_in[:B] = nxt
    if x_in.shape[0] == 2 * B:
        x_in[B:] = nxt
    sigma_in.copy_(col("c_noise_next").expand(sigma_in.shape).to(sigma_in.dtype))


def init_state_reference(table: torch.Tensor, t0: float, n_init: float, seeds: torch.Tensor, x: torch.Tensor,
                         x_eval: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor,
                         x0: torch.Tensor | None = None) -> None:
    """x = t0 N(seed, INITIAL_STREAM) (or the given x0) + n_init N(seed, CHURN_STREAM); x_eval = x;
    x_in = c_in[0] x; sigma_in = c_noise[0]."""
    B = x.shape[0]
    if x0 is None:
        z0 = philox_normal(seeds, INITIAL_STREAM, x.shape[1:], torch.float32, x.device)
        v = torch.tensor(t0, dtype=torch.float32) * z0
    else:
        v = x0.clone()  # x0 may be x itself
    if n_init:
        z = philox_normal(seeds, CHURN_STREAM, x.shape[1:], torch.float32, x.device)
        v = v + torch.tensor(n_init, dtype=torch.float32) * z
    x.copy_(v)
    x_eval.copy_(v)
    r = table[0].to(torch.float32)
    nxt = (r[COL["c_in"]] * v).to(x_in.dtype)
    x_in[:B] = nxt
    if x_in.shape[0] == 2 * B:
        x_in[B:] = nxt
    sigma_in.copy_(r[COL["c_noise"]].expand(sigma_in.shape).to(sigma_in.dtype))
