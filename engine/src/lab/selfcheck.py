"""The kernel self-check: the fused step against the torch reference, shared by the tests and
``benchmarks/gpu_check.py``.

Each check returns plain dicts (JSON-ready) with the measured error and its bound, so a GPU run can
record numbers as well as pass or fail.
"""
from __future__ import annotations

import math

import torch

__all__ = ["solver_plans", "run_stages", "compare_impls", "philox_bits_match", "measure_bandwidth"]


def solver_plans(steps: int = 5):
    """(name, plan) for every registered solver, stochastic options switched on where a solver has them."""
    import edmrt

    s = edmrt.make_sigmas("karras", steps)
    pre = edmrt.EDMPrecond()
    extra = {"edm": dict(S_churn=30.0), "unipc": dict(order=3), "euler": dict(S_churn=10.0)}
    return [(name, edmrt.plan(name, s, pre, **extra.get(name, {}))) for name in sorted(edmrt.SOLVERS)]


def run_stages(plan, impl: str, shape, guidance, f_dtype, device, seed: int = 0, poison: bool = True):
    """Every stage of ``plan`` on seeded random network outputs; outputs poisoned with NaN before each call."""
    from edmrt.kernels import fused_step, init_state, plan_table

    B = shape[0]
    table = plan_table(plan, device)
    seeds = torch.tensor([11, 2 ** 35 + 1, 5, 99, 7, 3, 1, 8][:B], dtype=torch.int64, device=device)
    x = torch.empty(shape, device=device)
    x_eval = torch.empty(shape, device=device)
    Y = torch.full((plan.history,) + tuple(shape), math.nan, device=device)
    nin = 2 * B if guidance is not None else B
    x_in = torch.empty((nin,) + tuple(shape[1:]), device=device)
    sigma_in = torch.empty(nin, device=device)
    init_state(table, float(plan.sigmas[0]), plan.n_init, seeds, x, x_eval, x_in, sigma_in, impl=impl)
    g = torch.Generator().manual_seed(seed)
    for s in range(plan.stages):
        F = torch.randn((nin,) + tuple(shape[1:]), generator=g).to(device=device, dtype=f_dtype)
        if poison:
            x_in.fill_(math.nan)
            sigma_in.fill_(math.nan)
            Y[s % plan.history] = math.nan
        fused_step(table, s, x, x_eval, F, Y, x_in, sigma_in, seeds, guidance, impl=impl)
    return x, x_in, sigma_in


def compare_impls(impl: str, device, f_dtypes=(torch.float32,), shapes=((3, 5, 7), (2, 3, 61)), bound: float = 1e-6):
    """Relative max error (to the state's norm) of ``impl`` against the reference, per solver, dtype, shape."""
    rows = []
    for name, plan in solver_plans():
        for f_dtype in f_dtypes:
            for shape, guidance in zip(shapes, (None, 2.5)):
                ref, ref_in, _ = run_stages(plan, "reference", shape, guidance, f_dtype, device)
                got, got_in, got_sig = run_stages(plan, impl, shape, guidance, f_dtype, device)
                err = float((got - ref).abs().max() / ref.norm())
                finite = bool(torch.isfinite(got).all() and torch.isfinite(got_in).all() and torch.isfinite(got_sig).all())
                rows.append(dict(solver=name, impl=impl, device=str(device), f_dtype=str(f_dtype).split(".")[-1],
                                 shape=list(shape), guidance=guidance, rel_err=err, bound=bound,
                                 ok=finite and err <= bound))
    return rows


def philox_bits_match(device) -> dict:
    """Triton's tl.randint4x words and tl.randn values against the torch Philox on ``device``."""
    import triton
    import triton.language as tl

    from edmrt.kernels.philox import philox4x32, philox_normal

    @triton.jit
    def draw(seed_ptr, w_ptr, z_ptr, N, per, stream, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        seed = tl.load(seed_ptr + i // per, mask=m, other=0)
        off = (stream.to(tl.int64) << 32) | (i % per).to(tl.int64)
        w0, w1, _, _ = tl.randint4x(seed, off)
        tl.store(w_ptr + 2 * i, w0.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(w_ptr + 2 * i + 1, w1.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(z_ptr + i, tl.randn(seed, off), mask=m)

    seeds = torch.tensor([0, 7, 2 ** 33 + 5, 2 ** 62 + 12345], dtype=torch.int64, device=device)
    per = 1001
    w = torch.zeros(4 * per * 2, dtype=torch.int64, device=device)
    z = torch.zeros(4 * per, device=device)
    draw[(triton.cdiv(4 * per, 256),)](seeds, w, z, 4 * per, per, 9, BLOCK=256)
    e = torch.arange(per, device=device)[None]
    w0, w1, _, _ = philox4x32(e, torch.full_like(e, 9), 0, 0, (seeds & 0xFFFFFFFF)[:, None], (seeds >> 32)[:, None])
    bits = bool(torch.equal(w.view(4, per, 2)[..., 0], w0) and torch.equal(w.view(4, per, 2)[..., 1], w1))
    zerr = float((philox_normal(seeds, 9, (per,), device=device) - z.view(4, per)).abs().max())
    return dict(device=str(device), bits_equal=bits, normal_max_abs_diff=zerr, ok=bits and zerr <= 1e-5)


def measure_bandwidth(impl: str, device, shape, solver: str = "dpmpp_2m", iters: int = 200) -> dict:
    """Achieved GB/s of one fused stage (bytes it must move / time) against a copy of the same bytes."""
    import edmrt

    from edmrt.kernels import fused_step, plan_table
    from edmrt.kernels.reference import bytes_moved

    plan = edmrt.plan(solver, edmrt.make_sigmas("karras", 18), edmrt.EDMPrecond())
    stage = 5
    n = math.prod(shape)
    nbytes = bytes_moved(plan, stage, n)
    b = dict(table=plan_table(plan, device), x=torch.randn(shape, device=device), x_eval=torch.randn(shape, device=device),
             F=torch.randn(shape, device=device), Y=torch.randn((plan.history,) + tuple(shape), device=device),
             x_in=torch.empty(shape, device=device), sigma_in=torch.empty(shape[0], device=device),
             seeds=torch.arange(shape[0], dtype=torch.int64, device=device))
    src = torch.empty(nbytes // 8, device=device)
    dst = torch.empty_like(src)

    def timed(fn):
        for _ in range(10):
            fn()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        import time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    t_step, t_copy = [], []
    for _ in range(5):  # interleaved
        t_step.append(timed(lambda: fused_step(stage=stage, impl=impl, check=False, **b)))
        t_copy.append(timed(lambda: dst.copy_(src)))
    ts, tc = sorted(t_step)[2], sorted(t_copy)[2]
    return dict(impl=impl, device=str(device), shape=list(shape), solver=solver, bytes=nbytes, step_us=ts * 1e6,
                copy_us=tc * 1e6, step_gbps=nbytes / ts / 1e9, copy_gbps=nbytes / tc / 1e9, step_over_copy=ts / tc)
