import math

import numpy as np
import pytest

import edmrt
from edmrt import schedules as S

NAMED = sorted(S.SCHEDULES)


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("steps", [1, 2, 7, 18, 40])
def test_every_schedule_is_float64_descending_and_ends_in_zero(name, steps):
    """All but the cosine schedule end in 0; that one stops at its t = 0 (the clamp's level 0.01), as
    DDPMWuerstchenScheduler's loop does (tests/test_cascade.py)."""
    s = edmrt.make_sigmas(name, steps)
    assert s.dtype == np.float64
    assert s.shape == (steps + 1,)
    assert s[-1] == (pytest.approx(0.0100005, rel=1e-6) if name == "cosine" else 0.0)
    assert np.all(np.diff(s) < 0)
    assert np.all(np.isfinite(s))


def test_karras_matches_edm_eq5():
    N, lo, hi, rho = 18, 0.002, 80.0, 7.0
    s = S.karras(N, lo, hi, rho)
    for i in range(N):
        expected = (hi ** (1 / rho) + i / (N - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert s[i] == pytest.approx(expected, rel=1e-14)
    assert s[0] == pytest.approx(hi, rel=1e-14) and s[N - 1] == pytest.approx(lo, rel=1e-14)


def test_vp_matches_table1():
    beta_d, beta_min, eps_s, N = 19.9, 0.1, 1e-3, 10
    s = S.vp(N)  # Table 1: t_i = 1 + i/(N-1) (eps_s - 1), sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    for i in range(N):
        t = 1 + i / (N - 1) * (eps_s - 1)
        assert s[i] == pytest.approx(math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1), rel=1e-12)
    # sigma_min/sigma_max select the VP-time interval between their inverses.
    s2 = S.vp(N, sigma_min=S.vp_sigma(eps_s), sigma_max=S.vp_sigma(1.0))
    np.testing.assert_allclose(s2, s, rtol=1e-12)
    assert S.vp_sigma_inv(S.vp_sigma(0.37)) == pytest.approx(0.37, rel=1e-13)


def test_ve_is_geometric_and_equals_loglinear():
    N, lo, hi = 12, 0.02, 100.0
    s = S.ve(N, lo, hi)
    for i in range(N):  # Table 1: t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma = sqrt(t)
        assert s[i] == pytest.approx(math.sqrt(hi ** 2 * (lo ** 2 / hi ** 2) ** (i / (N - 1))), rel=1e-13)
    np.testing.assert_allclose(s, S.loglinear(N, lo, hi), rtol=1e-13)


def test_iddpm_levels_and_snapping():
    u = S.iddpm_sigmas()
    assert u.shape == (1001,) and u[-1] == 0.0 and np.all(np.diff(u) < 0)
    # Table 1 recursion, checked at a few j directly.
    M, C_1, C_2 = 1000, 0.001, 0.008
    ab = lambda j: math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2  # noqa: E731
    for j in (1000, 999, 500, 9):
        assert u[j - 1] == pytest.approx(math.sqrt((u[j] ** 2 + 1) / max(ab(j - 1) / ab(j), C_1) - 1), rel=1e-12)
    s = S.iddpm(18, 0.002, 81.0)
    assert set(s[:-1]).issubset(set(u))  # snapped to the model's levels
    assert s[0] == u[8]  # EDM's j_0 = 8 for sigma_max = 81
    assert s[-2] == u[u >= 0.002].min()
    # Snapping to another model's discrete sigmas (diffusers-style alphas_cumprod).
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ms = edmrt.sigmas_from_alphas_cumprod(np.cumprod(1 - betas))
    s = S.iddpm(10, 0.03, 15.0, model_sigmas=ms)
    assert set(s[:-1]).issubset(set(ms))


def test_linear_polyexponential_given():
    np.testing.assert_allclose(S.linear(5, 1.0, 5.0)[:-1], [5, 4, 3, 2, 1], rtol=1e-15)
    np.testing.assert_allclose(S.polyexponential(9, 0.01, 10.0, rho=1.0), S.loglinear(9, 0.01, 10.0), rtol=1e-13)
    pe = S.polyexponential(9, 0.01, 10.0, rho=2.0)
    r = 1 - np.arange(9) / 8
    np.testing.assert_allclose(pe[:-1], np.exp(np.log(0.01) + r ** 2 * (np.log(10.0) - np.log(0.01))), rtol=1e-13)
    np.testing.assert_array_equal(S.given(3, [5.0, 2.0, 0.5]), [5.0, 2.0, 0.5, 0.0])
    np.testing.assert_array_equal(S.given(3, [5.0, 2.0, 0.5, 0.0]), [5.0, 2.0, 0.5, 0.0])
    # log-linear interpolation of anchors: the midpoint of [8, 0.5] in log is 2.
    np.testing.assert_allclose(S.given(3, [8.0, 0.5]), [8.0, 2.0, 0.5, 0.0], rtol=1e-14)


BAD = [
    (lambda: S.karras(0), "steps"),
    (lambda: S.karras(2.5), "steps"),
    (lambda: S.karras(10, sigma_min=0.0), "sigma_min"),
    (lambda: S.karras(10, sigma_min=-1.0), "sigma_min"),
    (lambda: S.karras(10, sigma_min=80.0, sigma_max=80.0), "sigma_min must be < sigma_max"),
    (lambda: S.karras(10, sigma_min=1.0, sigma_max=0.5), "sigma_min must be < sigma_max"),
    (lambda: S.karras(10, sigma_max=float("nan")), "sigma_max"),
    (lambda: S.karras(10, sigma_max=float("inf")), "sigma_max"),
    (lambda: S.karras(10, rho=0.0), "rho"),
    (lambda: S.loglinear(10, sigma_min=float("nan")), "sigma_min"),
    (lambda: S.vp(10, eps_s=1.5), "eps_s"),
    (lambda: S.iddpm(995, 0.002, 80.0), "steps must be <="),
    (lambda: S.given(3, [1.0, 2.0, 0.5]), "strictly descending"),
    (lambda: S.given(3, [1.0, 1.0, 0.5]), "strictly descending"),
    (lambda: S.given(3, [3.0, float("nan"), 0.5]), "finite"),
    (lambda: S.given(3, [3.0, float("inf"), 0.5]), "finite"),
    (lambda: S.given(3, [3.0, -1.0]), "> 0"),
    (lambda: edmrt.make_sigmas("sine", 10), "unknown schedule"),
    (lambda: S.check_sigmas([3.0, -1.0]), "end in 0"),
    (lambda: S.check_sigmas([3.0, 1e-9]), r"must lie in \[1e-06"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_schedule_may_stop_at_a_positive_level():
    """diffusers' final_sigmas_type="sigma_min": t_N > 0, the result keeps that noise.  A list of steps + 1 values is
    the full schedule as it is; other lengths keep their meaning (levels, then 0)."""
    np.testing.assert_array_equal(S.check_sigmas([3.0, 1.0]), [3.0, 1.0])
    np.testing.assert_array_equal(S.given(2, [3.0, 1.0, 0.5]), [3.0, 1.0, 0.5])
    np.testing.assert_array_equal(S.given(3, [3.0, 1.0, 0.5]), [3.0, 1.0, 0.5, 0.0])
    np.testing.assert_array_equal(S.given(2, [3.0, 1.0, 0.0]), [3.0, 1.0, 0.0])
    for solver in sorted(edmrt.SOLVERS):
        plan = edmrt.plan(solver, [80.0, 5.0, 0.5, 0.05], edmrt.EDMPrecond())
        assert plan.sigmas[-1] == 0.05 and edmrt.Plan.from_json(plan.to_json()).sigmas[-1] == 0.05
