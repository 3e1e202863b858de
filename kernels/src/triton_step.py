"""The fused step in Triton (CUDA; on the CPU under TRITON_INTERPRET=1 for tests).

One program per BLOCK elements; the stage index is a runtime argument, so one compiled kernel
serves every stage of every plan with the same history depth K and the whole sampling loop can
be captured in one CUDA graph.  Coefficients come from the device table (float64), arithmetic
is float32, the network output may be float32, float16 or bfloat16 (loaded, then widened).
Runs on Triton 3.6 to 3.9 (only tl.load/store/where/randn and scalar control flow).  Table column offsets
(``table.COLUMNS``) and Philox streams (``philox.py``) reach the kernels as constexpr arguments from the launchers.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

from .philox import CHURN_STREAM, INITIAL_STREAM, STAGE0_STREAM
from .table import COL, FIXED

__all__ = ["available", "fused_step_triton", "init_state_triton"]


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _philox_offset(stream, elem):
        """tl.randn's offset for (Philox stream, element): counter = (element, stream, 0, 0)."""
        return ((tl.zeros_like(elem) + stream) << 32) | elem

    @triton.jit
    def _coef(row, col):
        """One float64 entry of a stage's table row, as float32 (the kernels' arithmetic)."""
        return tl.load(row + col).to(tl.float32)

    @triton.jit
    def _guided_output(f_ptr, offs, mask, N, w, CFG: tl.constexpr):
        """The network output F, float32; under guidance F = F_u + w (F_c - F_u) from the two rows [F_u; F_c]."""
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            f_c = tl.load(f_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
            f = f + w * (f_c - f)
        return f

    @triton.jit
    def _add_history(acc, row, y_ptr, stage, offs, mask, N, COL_B0: tl.constexpr, K: tl.constexpr):
        """acc + sum_{k >= 1} b[s, k] Y[s - k] over the entries of the history ring that exist."""
        for k in tl.static_range(1, K):
            if stage >= k:  # Y[s - k] exists (a scalar branch: Triton 3.9's interpreter rejects a scalar in a mask)
                yk = tl.load(y_ptr + ((stage - k) % K) * N + offs, mask=mask, other=0.0)
                acc += _coef(row, COL_B0 + k) * yk
        return acc

    @triton.jit
    def _store_network_input(xin_ptr, sig_ptr, v, c_in, c_noise, offs, mask, N, n_sig, TWICE: tl.constexpr):
        """The next network call's inputs: x_in = c_in v (twice for the guidance batch) and c_noise per sample."""
        nxt = (c_in * v).to(xin_ptr.dtype.element_ty)
        tl.store(xin_ptr + offs, nxt, mask=mask)
        if TWICE:
            tl.store(xin_ptr + N + offs, nxt, mask=mask)
        tl.store(sig_ptr + offs, (tl.zeros_like(v) + c_noise).to(sig_ptr.dtype.element_ty), mask=offs < n_sig)

    @triton.jit
    def _fused_step_kernel(
        table_ptr,        # (S, W) float64 plan table
        stage,            # int32 stage index s
        x_ptr,            # (N,) float32 committed state, in/out
        xe_ptr,           # (N,) float32 evaluation point, in/out
        f_ptr,            # (N,) or (2N,) raw network output [uncond; cond]
        y_ptr,            # (K, N) float32 history ring
        xin_ptr,          # (N,) or (2N,) next network input
        sig_ptr,          # (B,) or (2B,) next network noise input
        seed_ptr,         # (B,) int64 per-sample seeds
        z_ptr,            # (N,) float32 given noise of this stage (read only if GIVEN_NOISE)
        N,                # elements in the batch (B * per_sample)
        per_sample,       # elements per sample
        n_sig,            # entries of sig_ptr to write
        w,                # guidance weight (unused without CFG)
        W: tl.constexpr,                 # table width = FIXED + K
        GIVEN_NOISE: tl.constexpr,       # z from z_ptr (an inversion's noise map) instead of Philox
        K: tl.constexpr,                 # history depth
        CFG: tl.constexpr,               # F holds [F_u; F_c]
        TWICE: tl.constexpr,             # x_in holds two copies (guidance batch)
        STAGE0_STREAM: tl.constexpr,     # Philox stream of stage 0's noise (stage s draws STAGE0_STREAM + s)
        COL_C_SKIP: tl.constexpr,        # table column offsets (table.COLUMNS)
        COL_C_OUT: tl.constexpr,
        COL_ALPHA: tl.constexpr,
        COL_BETA: tl.constexpr,
        COL_A: tl.constexpr,
        COL_E: tl.constexpr,
        COL_N: tl.constexpr,
        COL_COMMIT: tl.constexpr,
        COL_C_IN_NEXT: tl.constexpr,
        COL_C_NOISE_NEXT: tl.constexpr,
        COL_B0: tl.constexpr,            # b_0, the first history weight (table.FIXED)
        BLOCK: tl.constexpr,             # elements per program
    ):
        """One stage of a plan (``reference.py``'s equations), its steps in the @triton.jit helpers above, which
        Triton inlines: the same registers as one body."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = table_ptr + stage * W
        a = _coef(row, COL_A)
        n = _coef(row, COL_N)
        xe = tl.load(xe_ptr + offs, mask=mask, other=0.0)
        # Plans set a = 0 wherever x == x_eval: then x is not read.
        x = tl.zeros((BLOCK,), tl.float32)
        if a != 0.0:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        f = _guided_output(f_ptr, offs, mask, N, w, CFG)
        # Preconditioning (EDM Eq. 7) and the history entry.
        D = _coef(row, COL_C_SKIP) * xe + _coef(row, COL_C_OUT) * f
        y = _coef(row, COL_ALPHA) * xe + _coef(row, COL_BETA) * D
        if K > 1:  # with K = 1 no later stage reads the history entry
            tl.store(y_ptr + (stage % K) * N + offs, y, mask=mask)
        # Linear update over the history ring.
        acc = a * x + _coef(row, COL_E) * xe + _coef(row, COL_B0) * y
        acc = _add_history(acc, row, y_ptr, stage, offs, mask, N, COL_B0, K)
        # Philox noise keyed by (sample seed, stage's stream, element), or the given noise map.
        if n != 0.0:
            if GIVEN_NOISE:
                acc += n * tl.load(z_ptr + offs, mask=mask, other=0.0)
            else:
                seed = tl.load(seed_ptr + offs // per_sample, mask=mask, other=0)
                acc += n * tl.randn(seed, _philox_offset(STAGE0_STREAM + stage, offs % per_sample))
        tl.store(xe_ptr + offs, acc, mask=mask)
        if tl.load(row + COL_COMMIT) != 0.0:
            tl.store(x_ptr + offs, acc, mask=mask)
        _store_network_input(xin_ptr, sig_ptr, acc, _coef(row, COL_C_IN_NEXT), _coef(row, COL_C_NOISE_NEXT), offs,
                             mask, N, n_sig, TWICE)

    @triton.jit
    def _init_kernel(
        table_ptr,        # (S, W) float64 plan table (row 0 read)
        x0_ptr,           # (N,) float32 given initial state (read only if GIVEN_X0)
        x_ptr, xe_ptr,    # (N,) float32 state, out
        xin_ptr,          # (N,) or (2N,) network input, out
        sig_ptr,          # (B,) or (2B,) network noise input, out
        seed_ptr,         # (B,) int64 seeds
        N,                # elements in the batch (B * per_sample)
        per_sample,       # elements per sample
        n_sig,            # entries of sig_ptr to write
        t0,               # first noise level (float32)
        n_init,           # churn before stage 0 (float32)
        GIVEN_X0: tl.constexpr,        # x = x0 (+ churn) instead of t0 N(seed, INITIAL_STREAM) (+ churn)
        CHURN: tl.constexpr,           # n_init != 0
        TWICE: tl.constexpr,           # x_in holds two copies (guidance batch)
        INITIAL_STREAM: tl.constexpr,  # Philox stream of the initial noise
        CHURN_STREAM: tl.constexpr,    # Philox stream of the churn before stage 0
        COL_C_IN: tl.constexpr,        # table column offsets (table.COLUMNS)
        COL_C_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,           # elements per program
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        seed = tl.load(seed_ptr + offs // per_sample, mask=mask, other=0)
        elem = offs % per_sample
        if GIVEN_X0:
            v = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        else:
            v = t0 * tl.randn(seed, _philox_offset(INITIAL_STREAM, elem))
        if CHURN:
            v += n_init * tl.randn(seed, _philox_offset(CHURN_STREAM, elem))
        tl.store(x_ptr + offs, v, mask=mask)
        tl.store(xe_ptr + offs, v, mask=mask)
        _store_network_input(xin_ptr, sig_ptr, v, _coef(table_ptr, COL_C_IN), _coef(table_ptr, COL_C_NOISE), offs,
                             mask, N, n_sig, TWICE)


def _block(N: int) -> int:
    return 1024 if N >= 1024 else max(16, triton.next_power_of_2(N))


def _columns(*names: str) -> dict[str, int]:
    """Constexpr column offsets ``COL_<NAME>`` from ``table.COLUMNS`` ("b0": b_0, the first history column)."""
    return {f"COL_{name.upper()}": FIXED if name == "b0" else COL[name] for name in names}


_STEP_COLUMNS = _columns("c_skip", "c_out", "alpha", "beta", "a", "e", "n", "commit", "c_in_next", "c_noise_next", "b0")
_INIT_COLUMNS = _columns("c_in", "c_noise")


def fused_step_triton(table: torch.Tensor, stage: int, x: torch.Tensor, x_eval: torch.Tensor, F: torch.Tensor,
                      Y: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor, seeds: torch.Tensor,
                      guidance: float | None = None, noise: torch.Tensor | None = None) -> None:
    """Launch the kernel for one stage (arguments already validated by ``edmrt.kernels.fused_step``); ``noise``: the
    stage's given noise in place of the Philox draw."""
    B = x.shape[0]
    N = x.numel()
    K = table.shape[1] - FIXED
    grid = (triton.cdiv(max(N, sigma_in.numel()), _block(N)),)
    _fused_step_kernel[grid](
        table, stage, x, x_eval, F, Y, x_in, sigma_in, seeds, x if noise is None else noise, N, N // B,
        sigma_in.numel(), float(guidance) if guidance is not None else 1.0,
        W=table.shape[1], GIVEN_NOISE=noise is not None, K=K, CFG=guidance is not None, TWICE=x_in.shape[0] == 2 * B,
        STAGE0_STREAM=STAGE0_STREAM, **_STEP_COLUMNS, BLOCK=_block(N))


def init_state_triton(table: torch.Tensor, t0: float, n_init: float, seeds: torch.Tensor, x: torch.Tensor,
                      x_eval: torch.Tensor, x_in: torch.Tensor, sigma_in: torch.Tensor,
                      x0: torch.Tensor | None = None) -> None:
    """Launch the initial-state kernel (arguments already validated by ``edmrt.kernels.init_state``)."""
    B = x.shape[0]
    N = x.numel()
    grid = (triton.cdiv(max(N, sigma_in.numel()), _block(N)),)
    _init_kernel[grid](
        table, x if x0 is None else x0, x, x_eval, x_in, sigma_in, seeds, N, N // B, sigma_in.numel(), float(t0),
        float(n_init), GIVEN_X0=x0 is not None, CHURN=n_init != 0.0, TWICE=x_in.shape[0] == 2 * B,
        INITIAL_STREAM=INITIAL_STREAM, CHURN_STREAM=CHURN_STREAM, **_INIT_COLUMNS, BLOCK=_block(N))
