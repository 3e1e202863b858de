"""UniPC: parity with diffusers' UniPCMultistepScheduler, the step to sigma = 0, convergence order, options."""
import math

import numpy as np
import pytest
import torch

import edmrt
from edmrt.models import GaussianMixture


def _mixture(seed):
    return GaussianMixture.random(K=8, D=64, seed=seed)


@pytest.fixture(scope="module")
def UniPCMultistepScheduler():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers==0.42.1)")
    return diffusers.UniPCMultistepScheduler


def _diffusers_unipc(cls, g, x_init, steps, order, variant, float64_sigmas):
    """Run diffusers' UniPC on the exact mixture denoiser; returns its states mapped back to EDM space,
    one per step (the last is the sample), and its float32 sigmas.

    Mapping of conventions: diffusers works in VP discrete time with alpha_t = 1 / sqrt(sigma^2 + 1),
    sigma_t = sigma alpha_t, so lambda_t = ln(alpha_t / sigma_t) = -ln sigma is our lambda (same h, same r_k)
    and its state is x_vp = alpha_t x.  ``prediction_type="sample"`` with ``predict_x0=True`` takes the model
    output as the data prediction D itself, which is D(x_vp / alpha_t; sigma) of our denoiser.  Its integer
    timesteps (sigma mapped onto the 1000 training betas) are only labels: after ``set_begin_index(0)``,
    ``step()`` reads ``self.sigmas`` by its counter.  ``use_karras_sigmas`` with sigma_min/sigma_max in the
    config gives EDM's schedule (rho = 7), in float32; ``final_sigmas_type="zero"`` ends in t_N = 0.
    Method options: ``solver_order=order``, ``solver_type=variant``, ``lower_order_final=True`` (order
    min(order, N - i) at step i, as ours), ``disable_corrector=[]`` (UniC after every step but the last).
    """
    sched = cls(solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
                disable_corrector=[], prediction_type="sample", use_karras_sigmas=True, final_sigmas_type="zero",
                sigma_min=0.002, sigma_max=80.0)
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    theirs = sched.sigmas.clone()
    sigmas = edmrt.make_sigmas("karras", steps)
    if float64_sigmas:
        sched.sigmas = torch.from_numpy(sigmas.copy())  # every coefficient of step() is then computed in float64
    scale = [math.sqrt(s ** 2 + 1.0) for s in sigmas]  # 1 / alpha_t
    x = x_init / scale[0]
    states = []
    for i, timestep in enumerate(sched.timesteps):
        D = g(x * scale[i], torch.full((x.shape[0], 1), sigmas[i], dtype=torch.float64))
        x = sched.step(D, timestep, x).prev_sample
        states.append(x * scale[i + 1])
    return states, theirs


def _diff(a, b):
    d = (a - b).abs()
    return d.max().item(), d.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("seed", [0, 11])
@pytest.mark.parametrize("order", [2, 3])
def test_parity_with_diffusers_unipc_bh2(UniPCMultistepScheduler, gen, seed, order):
    g = _mixture(seed)
    steps = int(torch.randint(5, 30, (1,), generator=gen))
    x_init = 80.0 * torch.randn(16, 64, dtype=torch.float64, generator=gen)
    sigmas = edmrt.make_sigmas("karras", steps)
    ours = edmrt.execute(edmrt.plan("unipc", sigmas, order=order, variant="bh2"), g, x_init)

    states, their_sigmas = _diffusers_unipc(UniPCMultistepScheduler, g, x_init, steps, order, "bh2", False)
    # Its schedule is ours rounded to float32 (relative 2^-24), so sigma_min/sigma_max in the config are honoured.
    np.testing.assert_allclose(their_sigmas.double().numpy(), sigmas, rtol=1.2e-7, atol=0.0)
    # Float32 sigmas put ~1e-7 relative errors into h, e^{-h}, B(h) and rho at every step; the mixture's
    # Jacobian near mode boundaries amplifies them.  Measured over seeds 0-5, N = 4..40, orders 2 and 3:
    # max abs <= 1.4e-6, RMS <= 2e-7 (DESIGN: float32 peers agree ~1e-7..7e-5 on 64-D mixtures).
    max_abs, rms = _diff(ours, states[-1])
    assert max_abs <= 1e-4 and rms <= 1e-5, (max_abs, rms)
    # With float64 sigmas patched in, diffusers computes every coefficient in float64: measured <= 1.1e-12.
    states64, _ = _diffusers_unipc(UniPCMultistepScheduler, g, x_init, steps, order, "bh2", True)
    max_abs, rms = _diff(ours, states64[-1])
    assert max_abs <= 1e-10, (max_abs, rms)
    # The check can fail: another second-order multistep method on the same inputs is far away (>= 8e-3).
    other = edmrt.execute(edmrt.plan("dpmpp_2m", sigmas), g, x_init)
    assert (other - states64[-1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("order", [2, 3])
def test_bh1_step_to_zero_is_finite_where_diffusers_gives_nan(UniPCMultistepScheduler, gen, order):
    g = _mixture(5)
    steps = 10
    x_init = 80.0 * torch.randn(16, 64, dtype=torch.float64, generator=gen)
    sigmas = edmrt.make_sigmas("karras", steps)
    calls = []

    def net(x, sigma):  # Identity preconditioning: the network sees x_eval and sigma
        calls.append(x.clone())
        return g(x, sigma)

    ours = edmrt.execute(edmrt.plan("unipc", sigmas, order=order, variant="bh1"), net, x_init)
    assert bool(torch.isfinite(ours).all())
    # The last step is the h -> inf limit of UniP-1: x_N = D(x_{N-1}; t_{N-1}) exactly.
    assert torch.equal(ours, g(calls[-1], torch.full((16, 1), sigmas[-2], dtype=torch.float64)))
    states, _ = _diffusers_unipc(UniPCMultistepScheduler, g, x_init, steps, order, "bh1", True)
    # Up to the last step bh1 is the same method as diffusers' (x_{N-1}, where both evaluate last: measured
    # <= 2e-13 with float64 sigmas).
    assert (calls[-1] - states[-2]).abs().max().item() <= 1e-10
    if bool(torch.isfinite(states[-1]).all()):
        pytest.skip("diffusers' bh1 no longer returns NaN on the step to sigma = 0; nothing left to document")
    # The peer's bug: B(h) = -h = -inf times a zero residual (order 1) is NaN on the step to sigma = 0.
    assert bool(torch.isnan(states[-1]).all())


def test_plan_structure():
    s = edmrt.make_sigmas("karras", 8)
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            p = edmrt.plan("unipc", s, order=order, variant=variant)
            assert p.nfe == 8 and p.history == order + 1 and bool(p.commit.all()) and not p.stochastic
            assert np.all(p.a == 0.0) and np.all(p.alpha == 0.0) and np.all(p.beta == 1.0)
            # Consistency: x = D = c constant stays c (e + sum_k b_k = 1 at every stage).
            np.testing.assert_allclose(p.e + p.b.sum(axis=1), 1.0, rtol=0, atol=1e-12)
            assert p.e[-1] == 0.0 and p.b[-1].tolist() == [1.0] + [0.0] * order  # x_N = D_{N-1}
    p3 = edmrt.plan("unipc", s, order=3)
    assert np.any(p3.b[:, 3] != 0.0)  # UniC-3 reads D_{i-3}: K = 4 is needed
    assert edmrt.plan("unipc", edmrt.make_sigmas("karras", 1)).b.tolist() == [[1.0, 0.0, 0.0]]


def _rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


def test_convergence_order_against_the_exact_ode():
    """UniPC with ``order=p`` (UniP-p + UniC-p) converges at order p + 1 (Theorem 3.1), not p.

    Reference: D(x_exact(sigma_min); sigma_min), as in test_solvers.  The lower orders on the last steps
    (min(order, N - i)) do not cap the observed order: there sigma << the data's spread, D hardly changes
    with lambda and those steps' truncation errors are negligible.  Measured ratios per doubling
    32 -> 64 -> 128 -> 256 (fitted order): p=1 bh2 3.76 3.84 3.91 (1.94); p=2 bh2 5.50 6.67 7.72 (2.74),
    still pre-asymptotic at 32 steps; p=3 bh2 8.98 19.3 25.3 (4.0), irregular per doubling but order 4 over
    the range; p=2 bh1 7.71 7.54 8.09 (2.96).  Other mixtures (seeds 5, 7) give the same picture.
    """
    g = _mixture(21)
    noise = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    ref = g.denoise(g.ode(80.0 * noise, 80.0, 0.002), 0.002)
    ns = (32, 64, 128, 256)
    for order, variant in [(1, "bh2"), (2, "bh2"), (3, "bh2"), (2, "bh1")]:
        errs = [_rmse(edmrt.solve(g, noise, solver="unipc", steps=n, order=order, variant=variant), ref) for n in ns]
        ratios = [errs[i] / errs[i + 1] for i in range(len(ns) - 1)]
        fitted = -np.polyfit(np.log2(ns), np.log2(errs), 1)[0]
        info = (order, variant, errs, ratios, fitted)
        assert abs(fitted - (order + 1)) <= 0.35, info
        # Every doubling gains more than the predictor's order p alone: the corrector works.
        assert all(r > 2 ** order for r in ratios), info
        if order < 3:
            assert all(r <= 2 ** (order + 1) * 1.2 for r in ratios), info
            assert ratios[-1] >= 2 ** (order + 1) * 0.85, info


def test_options_are_validated():
    s = edmrt.make_sigmas("karras", 10)
    for bad in (0, 4, 2.5, "2", True, None):
        with pytest.raises(ValueError, match="order"):
            edmrt.plan("unipc", s, order=bad)
    for bad in ("bh3", "BH2", "vary_coeff", None):
        with pytest.raises(ValueError, match="variant"):
            edmrt.plan("unipc", s, variant=bad)
    with pytest.raises(ValueError, match="unknown option 'lower_order_final' for solver 'unipc'"):
        edmrt.plan("unipc", s, lower_order_final=False)
    assert edmrt.plan("unipc", s, order=2.0).options == {"order": 2, "variant": "bh2"}
