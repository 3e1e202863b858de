"""GPU-only checks: the Triton kernel compiled for CUDA against the reference, every solver and dtype.
They skip on machines without CUDA (CI); ``benchmarks/gpu_check.sh`` runs them on a lent GPU."""
import math
import os

import pytest
import torch

import edmrt
from edmrt.kernels.selfcheck import compare_impls, philox_bits_match

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset or 0)")


def test_triton_on_cuda_equals_the_reference_for_every_solver_and_dtype():
    rows = compare_impls("triton", torch.device("cuda"), f_dtypes=(torch.float32, torch.float16, torch.bfloat16))
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:5]


def test_philox_on_cuda():
    r = philox_bits_match(torch.device("cuda"))
    assert r["ok"], r


def test_fused_solve_on_cuda_equals_the_float64_reference():
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=6, D=48, seed=1)
    noise = torch.randn(7, 48, generator=torch.Generator().manual_seed(3))
    for solver in ("heun", "dpmpp_2m_sde", "unipc"):
        fast = edmrt.solve(g, noise.cuda(), solver=solver, steps=10, seeds=list(range(7)))
        ref = edmrt.solve(g, noise.double(), solver=solver, steps=10, seeds=list(range(7)))
        assert fast.device.type == "cuda"
        assert (fast.cpu().double() - ref).abs().max().item() <= 2e-4 * ref.norm().item() / math.sqrt(ref.numel())
