"""Solvers: parity with k-diffusion, convergence order against the exact ODE, plan structure."""
import math

import numpy as np
import pytest
import torch

import edmrt
from edmrt.models import GaussianMixture
from peers import k_denoiser


def _mixture(seed):
    return GaussianMixture.random(K=8, D=64, seed=seed)


def _kd_noise_for(plan, eps):
    """Our noise streams in k-diffusion's order: k-diffusion draws eps_i at the start of step i; we add
    step 0's churn from stream 0 and step i+1's from the stream of the last stage of step i."""
    def noise(stream):
        return eps[0] if stream == 0 else eps[int(plan.step[stream - 1]) + 1]
    return noise


@pytest.mark.parametrize("seed", [0, 11])
@pytest.mark.parametrize("solver,kname", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                          ("dpmpp_2m", "sample_dpmpp_2m")])
def test_deterministic_parity_with_k_diffusion(kdiff, gen, seed, solver, kname):
    g = _mixture(seed)
    steps = int(torch.randint(5, 30, (1,), generator=gen))
    noise = torch.randn(24, 64, dtype=torch.float64, generator=gen)
    ours = edmrt.solve(g, noise, solver=solver, steps=steps)
    sig = torch.from_numpy(edmrt.make_sigmas("karras", steps))  # float64; k-diffusion's own is float32
    theirs = getattr(kdiff, kname)(k_denoiser(g), sig[0] * noise, sig, disable=True)
    assert (ours - theirs).abs().max().item() <= 1e-8
    # The check can fail: another method on the same inputs is far away.
    other = edmrt.solve(g, noise, solver="euler" if solver != "euler" else "heun", steps=steps)
    assert (other - theirs).abs().max().item() > 1e-3


@pytest.mark.parametrize("solver,kname", [("edm", "sample_heun"), ("euler", "sample_euler")])
@pytest.mark.parametrize("churn", [dict(S_churn=40.0), dict(S_churn=80.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)])
def test_churn_parity_with_k_diffusion_given_the_same_noise(kdiff, gen, monkeypatch, solver, kname, churn):
    g = _mixture(3)
    steps = 18
    B = 16
    sig = torch.from_numpy(edmrt.make_sigmas("karras", steps))
    x_init = sig[0] * torch.randn(B, 64, dtype=torch.float64, generator=gen)
    eps = [torch.randn(B, 64, dtype=torch.float64, generator=gen) for _ in range(steps)]
    plan = edmrt.plan(solver, sig.numpy(), **churn)
    ours = edmrt.execute(plan, g, x_init, _kd_noise_for(plan, eps))
    draws = iter(eps)
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: next(draws))
    kw = dict(s_churn=churn["S_churn"], s_tmin=churn.get("S_tmin", 0.0), s_tmax=churn.get("S_tmax", float("inf")),
              s_noise=churn.get("S_noise", 1.0))
    theirs = getattr(kdiff, kname)(k_denoiser(g), x_init.clone(), sig, disable=True, **kw)
    monkeypatch.undo()
    assert (ours - theirs).abs().max().item() <= 1e-8
    det = edmrt.execute(edmrt.plan(solver, sig.numpy()), g, x_init)
    assert (det - theirs).abs().max().item() > 1e-2  # churn really changed the result


def test_edm_without_churn_is_heun():
    s = edmrt.make_sigmas("karras", 18)
    a, b = edmrt.plan("edm", s, S_churn=0.0), edmrt.plan("heun", s)
    for k in ("sigma", "alpha", "beta", "a", "e", "b", "n", "commit", "step", "c_in", "c_noise", "c_skip", "c_out"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.n_init == b.n_init == 0.0 and not a.stochastic


def test_plan_structure_matches_edm_generate_conventions():
    s = edmrt.make_sigmas("karras", 18)
    assert edmrt.plan("heun", s).nfe == 35  # EDM: 18 steps = 35 network evaluations
    assert edmrt.plan("euler", s).nfe == 18 and edmrt.plan("dpmpp_2m", s).nfe == 18
    h = edmrt.plan("heun", s)
    assert h.commit.tolist() == [False, True] * 17 + [True]  # trial points never commit
    assert h.sigma[-1] == s[-2]  # Euler on the last step from t_{N-1}
    d = edmrt.plan("dpmpp_2m", s)
    assert d.b[0, 1] == 0.0 and d.b[-1].tolist() == [1.0, 0.0] and d.a[-1] == 0.0  # first-order ends
    e = edmrt.plan("edm", s, S_churn=40.0)
    gamma = min(40.0 / 18, math.sqrt(2) - 1)
    assert e.sigma[0] == pytest.approx(s[0] * (1 + gamma), rel=1e-15)
    assert e.n_init == pytest.approx(s[0] * math.sqrt((1 + gamma) ** 2 - 1), rel=1e-14)


def _rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_against_the_exact_ode(solver, order):
    """Error against the exact ODE endpoint falls 2^order-fold when steps double.

    Every method's last step maps x(sigma_min) to D(x; sigma_min), so the reference is
    D(x_exact(sigma_min); sigma_min): what remains is the discretisation error on [sigma_min, sigma_max].
    """
    g = _mixture(21)
    noise = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    x_min = g.ode(80.0 * noise, 80.0, 0.002)
    ref = g.denoise(x_min, 0.002)
    errs = [_rmse(edmrt.solve(g, noise, solver=solver, steps=n), ref) for n in (32, 64, 128)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    for r in ratios:
        assert 2 ** order * 0.85 <= r <= 2 ** order * 1.2, (errs, ratios)


def test_options_are_validated_once():
    s = edmrt.make_sigmas("karras", 10)
    with pytest.raises(ValueError, match=r"unknown solver 'hune'.*dpmpp_2m.*euler.*heun"):
        edmrt.plan("hune", s)
    with pytest.raises(ValueError, match="unknown option 'S_churn' for solver 'heun'"):
        edmrt.plan("heun", s, S_churn=1.0)
    with pytest.raises(ValueError, match="S_churn"):
        edmrt.plan("edm", s, S_churn=-1.0)
    with pytest.raises(ValueError, match="S_noise"):
        edmrt.plan("edm", s, S_noise=float("nan"))
    with pytest.raises(ValueError, match="S_tmax must be >= S_tmin"):
        edmrt.plan("edm", s, S_churn=1.0, S_tmin=2.0, S_tmax=1.0)
    with pytest.raises(ValueError, match="strictly descending"):
        edmrt.plan("heun", [80.0, 90.0, 0.0])
    with pytest.raises(ValueError, match="precond"):
        edmrt.plan("heun", s, precond="edm")


def test_plans_with_preconditioning_execute_a_network(gen):
    """The same sampler through EDM preconditioning and a raw network F equals the Identity plan on D."""
    g = _mixture(4)
    pre = edmrt.EDMPrecond(sigma_data=0.5)
    s = edmrt.make_sigmas("karras", 12)

    def raw_net(x_in, c_noise):  # F = (D(x) - c_skip x) / c_out, recovering sigma from c_noise = ln(sigma)/4
        sigma = torch.exp(4 * c_noise)
        x = x_in * torch.sqrt(sigma ** 2 + 0.25)
        c_skip = 0.25 / (sigma ** 2 + 0.25)
        c_out = sigma * 0.5 / torch.sqrt(sigma ** 2 + 0.25)
        return (g(x, sigma) - c_skip * x) / c_out

    x_init = 80.0 * torch.randn(8, 64, dtype=torch.float64, generator=gen)
    for solver in ("heun", "dpmpp_2m"):
        a = edmrt.execute(edmrt.plan(solver, s, pre), raw_net, x_init)
        b = edmrt.execute(edmrt.plan(solver, s), g, x_init)
        assert (a - b).abs().max().item() <= 1e-9
