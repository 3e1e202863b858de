import math

import numpy as np
import pytest

import edmrt
from edmrt.precond import PRECONDS, precond_from_dict
from edmrt.schedules import iddpm_sigmas, vp_sigma

SIG = np.array([0.002, 0.03, 0.5, 1.0, 7.3, 80.0])


def test_edm_table1():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edmrt.EDMPrecond().coefficients(SIG)
    for i, s in enumerate(SIG):
        assert c_skip[i] == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-15)
        assert c_out[i] == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-15)
        assert c_in[i] == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-15)
        assert c_noise[i] == pytest.approx(0.25 * math.log(s), rel=1e-15)
    # EDM's design rules (Appendix B.6): unit-variance input, and c_out^2 is the variance of the
    # effective training target (x_0 - c_skip x) / c_out ... = 1 when x_0 has variance sigma_data^2.
    np.testing.assert_allclose(c_in ** 2 * (SIG ** 2 + sd ** 2), 1.0, rtol=1e-14)
    np.testing.assert_allclose((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * SIG ** 2, c_out ** 2, rtol=1e-13)


def test_vp_ve_iddpm_table1():
    c_skip, c_out, c_in, c_noise = edmrt.VPPrecond().coefficients(SIG)
    np.testing.assert_array_equal(c_skip, 1.0)
    np.testing.assert_allclose(c_out, -SIG, rtol=1e-15)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(SIG ** 2 + 1), rtol=1e-15)
    t = np.array([1e-3, 0.25, 1.0])
    np.testing.assert_allclose(edmrt.VPPrecond().coefficients(vp_sigma(t))[3], 999 * t, rtol=1e-12)

    c_skip, c_out, c_in, c_noise = edmrt.VEPrecond().coefficients(SIG)
    np.testing.assert_array_equal(c_skip, 1.0)
    np.testing.assert_allclose(c_out, SIG, rtol=1e-15)
    np.testing.assert_array_equal(c_in, 1.0)
    np.testing.assert_allclose(c_noise, np.log(0.5 * SIG), rtol=1e-15)

    u = iddpm_sigmas()
    j = np.array([8, 100, 500, 998])
    c_skip, c_out, c_in, c_noise = edmrt.IDDPMPrecond().coefficients(u[j])
    np.testing.assert_allclose(c_out, -u[j], rtol=1e-15)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(u[j] ** 2 + 1), rtol=1e-15)
    np.testing.assert_array_equal(c_noise, 999 - j)  # M - 1 - argmin_j |u_j - sigma|


def _linear_betas(T=1000):
    return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2


@pytest.mark.parametrize("discrete", [False, True])
def test_foreign_parameterisations_recover_x0_pointwise(discrete):
    """For x = x_0 + sigma eps, the exact targets (eps, v = (eps - sigma x_0)/sqrt(1 + sigma^2), x_0)
    through c_skip x + c_out F give x_0 back exactly, and c_in x is the VP-scaled input."""
    rng = np.random.default_rng(7)
    acp = np.cumprod(1 - _linear_betas()) if discrete else None
    sig = np.array([0.03, 0.4, 1.0, 6.0, 14.0])
    x0, eps = rng.normal(size=(2, sig.size))
    x = x0 + sig * eps
    targets = {"epsilon": eps, "v": (eps - sig * x0) / np.sqrt(1 + sig ** 2), "x0": x0}
    for name, F in targets.items():
        pre = PRECONDS[name](alphas_cumprod=acp)
        c_skip, c_out, c_in, c_noise = pre.coefficients(sig)
        np.testing.assert_allclose(c_skip * x + c_out * F, x0, rtol=1e-12, atol=1e-12)
        alpha, sigma_vp = 1 / np.sqrt(1 + sig ** 2), sig / np.sqrt(1 + sig ** 2)
        np.testing.assert_allclose(c_in * x, alpha * x0 + sigma_vp * eps, rtol=1e-12)
        if not discrete:
            np.testing.assert_array_equal(c_noise, sig)


def test_discrete_timesteps_match_alphas_cumprod():
    acp = np.cumprod(1 - _linear_betas())
    sig_t = np.sqrt((1 - acp) / acp)
    pre = edmrt.EpsilonPrecond(alphas_cumprod=acp)
    t = np.array([0, 1, 17, 500, 999])
    np.testing.assert_allclose(pre.coefficients(sig_t[t])[3], t, atol=1e-9)
    # Between two levels, the timestep interpolates linearly in ln sigma.
    mid = math.exp(0.5 * (math.log(sig_t[10]) + math.log(sig_t[11])))
    assert pre.coefficients(np.array([mid]))[3][0] == pytest.approx(10.5, abs=1e-9)
    nearest = edmrt.EpsilonPrecond(alphas_cumprod=acp, timestep="nearest")
    assert nearest.coefficients(np.array([sig_t[10] * 1.001]))[3][0] == 10.0
    with pytest.raises(ValueError, match="discrete levels"):
        pre.coefficients(np.array([sig_t[-1] * 2]))


def test_identity_and_round_trip():
    c_skip, c_out, c_in, c_noise = edmrt.Identity().coefficients(SIG)
    np.testing.assert_array_equal(c_skip, 0.0)
    np.testing.assert_array_equal(c_out, 1.0)
    np.testing.assert_array_equal(c_in, 1.0)
    np.testing.assert_array_equal(c_noise, SIG)
    acp = np.cumprod(1 - _linear_betas())
    for pre in [edmrt.EDMPrecond(0.7), edmrt.ConsistencyPrecond(0.75, 0.002), edmrt.VPPrecond(), edmrt.IDDPMPrecond(), edmrt.VEPrecond(),
                edmrt.VPredictionPrecond(alphas_cumprod=acp), edmrt.X0Precond(sigma_data=0.5)]:
        back = precond_from_dict(pre.to_dict())
        for u, v in zip(pre.coefficients(np.array([0.1, 1.0])), back.coefficients(np.array([0.1, 1.0]))):
            np.testing.assert_array_equal(u, v)


def test_consistency_parameterisation_boundary_and_limit():
    """Song et al. (2023) App. C: f(x; sigma_min) = x exactly; far above sigma_min it tends to EDM's coefficients."""
    rng = np.random.default_rng(5)
    sd, eps = float(rng.uniform(0.3, 1.0)), float(rng.uniform(1e-3, 1e-2))
    cm = edmrt.ConsistencyPrecond(sd, eps)
    c_skip, c_out, c_in, c_noise = cm.coefficients([eps])
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    sig = np.exp(rng.uniform(np.log(0.01), np.log(80.0), 50))
    ours, edm = cm.coefficients(sig), edmrt.EDMPrecond(sd).coefficients(sig)
    np.testing.assert_array_equal(ours[2], edm[2])                    # same network input and noise embedding,
    np.testing.assert_array_equal(ours[3], edm[3])                    # so a student starts from the teacher
    big = sig > 1.0
    np.testing.assert_allclose(ours[0][big], edm[0][big], rtol=0.05, atol=1e-12)
    np.testing.assert_allclose(ours[1][big], edm[1][big], rtol=0.02)
    # the parameterisation written out (App. C)
    np.testing.assert_allclose(ours[0], sd ** 2 / ((sig - eps) ** 2 + sd ** 2), rtol=1e-15)
    np.testing.assert_allclose(ours[1], sd * (sig - eps) / np.sqrt(sig ** 2 + sd ** 2), rtol=1e-15)


@pytest.mark.parametrize("call,match", [
    (lambda: edmrt.EDMPrecond(sigma_data=0.0), "sigma_data"),
    (lambda: edmrt.ConsistencyPrecond(sigma_min=-1.0), "sigma_min"),
    (lambda: edmrt.EDMPrecond().coefficients([0.0]), "sigma"),
    (lambda: edmrt.EDMPrecond().coefficients([float("nan")]), "sigma"),
    (lambda: edmrt.VPPrecond(M=1), "M"),
    (lambda: edmrt.EpsilonPrecond(timestep="round"), "timestep"),
    (lambda: edmrt.EpsilonPrecond(alphas_cumprod=[0.5, 0.9]), "decreasing"),
    (lambda: precond_from_dict({"name": "cosine"}), "unknown preconditioning"),
])
def test_bad_preconditioning_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
