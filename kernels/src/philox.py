"""Counter-based Philox4x32-10 noise (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").

One stream for every backend: key = the sample's 64-bit seed (k0 = low word, k1 = high word),
counter = (element index within the sample, stream, 0, 0).  This is exactly Triton's
``tl.randint4x(seed, offset)`` with ``offset = (stream << 32) | element``, and its ``tl.randn``
maps the first two words to a normal variate by Box-Muller:

    u_i = float32(int32(w_i) < 0 ? ~int32(w_i) : int32(w_i)) * 4.6566127342e-10,
    z = sqrt(-2 ln max(u_1, 1e-7)) cos(2 pi u_2).

Streams, defined here once (the C++ core's kInitialStream, kChurnStream, kStage0Stream equal them, and the
Triton kernels receive them as constexpr arguments): ``INITIAL_STREAM`` is the initial noise, ``CHURN_STREAM``
the churn before stage 0, ``stage_stream(s)`` the noise of stage s.
The integers agree bit for bit across torch, C++ and Triton; normal variates within float32 rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["philox4x32", "uniform_from_uint32", "normal_from_uint32", "philox_normal", "INITIAL_STREAM", "CHURN_STREAM",
           "STAGE0_STREAM", "stage_stream"]

M0, M1 = 0xD2511F53, 0xCD9E8D57          # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85          # Weyl key increments
_MASK32 = 0xFFFFFFFF

# Philox streams.
INITIAL_STREAM = 0                       # x_init = t0 N(seed, INITIAL_STREAM)
CHURN_STREAM = 1                         # the churn before stage 0
STAGE0_STREAM = 2                        # the noise of stage 0


def stage_stream(stage: int) -> int:
    """Philox stream of the noise of stage ``stage``."""
    return STAGE0_STREAM + stage


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for a in [0, 2^32) held in int64, by 16-bit limbs (no int64 overflow)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    m_lo, m_hi = m & 0xFFFF, m >> 16
    p0, p1, p2, p3 = a_lo * m_lo, a_hi * m_lo, a_lo * m_hi, a_hi * m_hi
    mid = p1 + p2                                   # < 2^33
    t = p0 + ((mid & 0xFFFF) << 16)                 # < 2^33
    lo = t & _MASK32
    hi = p3 + (mid >> 16) + (t >> 32)
    return hi & _MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in (k0, k1))
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & _MASK32, (k1 + W1) & _MASK32
    return c0, c1, c2, c3


def uniform_from_uint32(w: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: a float32 in [0, 1)."""
    x = torch.where(w >= 2 ** 31, w - 2 ** 32, w)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)               # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def normal_from_uint32(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Box-Muller on two words, as Triton's ``tl.randn``: the cosine branch, in float32."""
    u1 = torch.clamp(uniform_from_uint32(w0), min=1.0e-7)
    u2 = uniform_from_uint32(w1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def philox_normal(seeds: Sequence[int] | torch.Tensor, stream: int, sample_shape: Sequence[int],
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of shape (B, *sample_shape): element i of sample b is N(seed_b, stream, i)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
    if seeds.numel() and bool((seeds < 0).any()):
        raise ValueError("seeds must be in [0, 2**63)")
    n = 1
    for d in sample_shape:
        n *= int(d)
    elem = torch.arange(n, dtype=torch.int64, device=seeds.device)[None, :]   # (1, n)
    k0 = (seeds & _MASK32)[:, None]                                           # (B, 1)
    k1 = (seeds >> 32)[:, None]
    w0, w1, _, _ = philox4x32(elem, torch.full_like(elem, stream & _MASK32), 0, 0, k0, k1)
    z = normal_from_uint32(w0, w1)
    return z.reshape((seeds.numel(), *[int(d) for d in sample_shape])).to(dtype)
