"""Schedules fitted to a model (edmrt.optimize_schedule) and iPNDM with an analytic first step (ipndm_afs)."""
import numpy as np
import pytest
import torch

import edmrt
from edmrt.models.gmm import GaussianMixture
from edmrt.schedules import karras

FAST = dict(samples=32, max_iter=15, reference_nfe=200, starts=(0.0, 0.25))


@pytest.fixture(scope="module")
def gmm16():
    return GaussianMixture.random(K=4, D=16, seed=0, spread=3.0)


class Counter:
    """Counts network evaluations the way the reported cost does: calls x batch."""

    def __init__(self, den):
        self.den, self.calls, self.evaluations = den, 0, 0

    def __call__(self, x, sigma):
        self.calls += 1
        self.evaluations += x.shape[0]
        return self.den(x, sigma)


@pytest.fixture(scope="module")
def fitted(gmm16):
    counter = Counter(gmm16)
    opt = edmrt.optimize_schedule(counter, solver="ipndm", nfe=5, shape=(16,), seed=7, batch=20, **FAST)
    return opt, counter


def test_schedule_is_valid_and_usable_by_solve(fitted, gmm16):
    opt, _ = fitted
    s = np.asarray(opt.sigmas)
    assert (opt.solver, opt.steps, opt.nfe) == ("ipndm", 5, 5)
    assert s.dtype == np.float64 and s.shape == (opt.steps + 1,)
    assert s[0] == 80.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0) and s[-2] >= 0.002
    # solve keeps the list as it is (exactly `steps` positive values) ...
    assert np.array_equal(edmrt.make_sigmas(opt.sigmas, opt.steps), s)
    # ... and runs it by name.
    noise = torch.randn(3, 16, dtype=torch.float64)
    x = edmrt.solve(gmm16, noise, solver=opt.solver, steps=opt.steps, schedule=opt.sigmas, **opt.options)
    ref = edmrt.execute(edmrt.plan("ipndm", s), gmm16, 80.0 * noise)
    assert torch.equal(x, ref)


def test_cost_is_every_network_evaluation(fitted):
    opt, counter = fitted
    assert counter.calls > 0
    assert opt.cost == counter.evaluations
    # The reference: 32 samples in batches of 20, 200 evaluations each (lms, one per step).
    assert opt.reference_cost == 32 * 200
    assert opt.cost == opt.reference_cost + opt.solves * 32 * opt.nfe


def test_fitted_schedule_beats_karras_on_held_out_noise(fitted, gmm16):
    opt, _ = fitted
    noise = torch.randn(48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(123))  # not seed 7
    exact = gmm16.ode(80.0 * noise, 80.0, 0.0)
    rmse = lambda x: float((x - exact).pow(2).mean().sqrt())  # noqa: E731
    fitted_err = rmse(edmrt.solve(gmm16, noise, "ipndm", steps=5, schedule=opt.sigmas))
    karras_err = rmse(edmrt.solve(gmm16, noise, "ipndm", steps=5))
    # Measured 0.104 against 0.165 (ratio 0.63; 0.40-0.75 on mixture seeds 0-3).
    assert fitted_err < 0.8 * karras_err
    assert opt.loss < opt.initial_loss


def test_candidates_return_the_one_kept(gmm16):
    counter = Counter(gmm16)
    cands = (("ipndm", {"order": 2}), ("ipndm_afs", {"order": 3}))
    opt = edmrt.optimize_schedule(counter, nfe=4, shape=(16,), candidates=cands, samples=16, max_iter=4,
                                  screen_iter=2, reference_nfe=50, starts=(0.25,))
    assert (opt.solver, opt.options) in [(n, o) for n, o in cands]
    assert opt.nfe == 4 and opt.steps == (5 if opt.solver == "ipndm_afs" else 4)
    assert opt.cost == counter.evaluations
    x = edmrt.solve(gmm16, torch.randn(2, 16, dtype=torch.float64), solver=opt.solver, steps=opt.steps,
                    schedule=opt.sigmas, **opt.options)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kw,match", [
    (dict(nfe=0), "nfe"),
    (dict(nfe=2.5), "nfe"),
    (dict(samples=0), "samples"),
    (dict(seed=-1), "seed"),
    (dict(reference_nfe=1), "reference_nfe"),
    (dict(max_iter=-1), "max_iter"),
    (dict(screen_iter=-2), "screen_iter"),
    (dict(batch=0), "batch"),
    (dict(shape=()), "shape"),
    (dict(shape=(0, 4)), "shape"),
    (dict(shape="x"), "shape"),
    (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(sigma_max=float("nan")), "sigma_max"),
    (dict(solver="nope"), "unknown solver 'nope'"),
    (dict(reference_solver="nope"), "unknown solver 'nope'"),
    (dict(solver="dpmpp_2m_sde"), "deterministic"),
    (dict(order=9), "order"),
    (dict(stepsize=3), "unknown option 'stepsize'"),
    (dict(starts=(1.5,)), "starts"),
    (dict(starts=()), "starts"),
    (dict(candidates=[("ipndm",)]), "candidates"),
    (dict(candidates=[]), "candidates"),
    (dict(candidates=[("ipndm", {})], order=3), "candidates"),
    (dict(init=[10.0, 1.0, 0.1, 0.01, 0.005, 0.0]), "init"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(denoiser=3), "denoiser"),
])
def test_bad_arguments_raise_naming_them(gmm16, kw, match):
    args = dict(denoiser=gmm16, nfe=5, shape=(16,), samples=4, max_iter=0, reference_nfe=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        edmrt.optimize_schedule(args.pop("denoiser"), **args)


# ----------------------------------------------------------------------------- ipndm_afs

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_afs_loop(den, x, sigmas, order):
    """Zhou et al. (2024) iPNDM with AFS as a plain loop: d_0 = x_0 / t_0, then iPNDM with d_0 in the history."""
    hist = []
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        d = x / t if i == 0 else (x - den(x, torch.tensor(t, dtype=torch.float64))) / t
        hist = [d] + hist[:order - 1]
        w = _AB[len(hist)]
        x = x + (t_next - t) * sum(c * h for c, h in zip(w, hist))
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("steps", [2, 3, 5, 9])
def test_ipndm_afs_equals_the_loop(gmm16, gen, order, steps):
    noise = torch.randn(7, 16, dtype=torch.float64, generator=gen)
    s = karras(steps)
    s[1:-1] *= np.exp(0.1 * torch.rand(steps - 1, generator=gen, dtype=torch.float64).numpy())  # irregular steps
    x = edmrt.solve(gmm16, noise, "ipndm_afs", steps=steps, schedule=s, order=order)
    ref = _ipndm_afs_loop(gmm16, 80.0 * noise, s, order)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-11)
    assert edmrt.plan("ipndm_afs", s, order=order).nfe == steps - 1


def test_ipndm_afs_with_preconditioning_feeds_the_network_x1(gen):
    """With EDM preconditioning the first network input is c_in(t_1) x_1, x_1 = (t_1 / t_0) x_0."""
    s = karras(4)
    p = edmrt.plan("ipndm_afs", s, edmrt.EDMPrecond(0.5), order=3)
    c_skip, c_out, c_in, _ = edmrt.EDMPrecond(0.5).coefficients(np.array([s[1]]))
    assert p.sigma[0] == s[1]
    assert p.c_in[0] == pytest.approx(c_in[0] * s[1] / s[0], rel=1e-14)
    assert p.c_skip[0] == pytest.approx(c_skip[0] * s[1] / s[0], rel=1e-14)
    assert p.c_out[0] == pytest.approx(c_out[0], rel=1e-14)


def test_ipndm_afs_needs_two_steps():
    with pytest.raises(ValueError, match="steps >= 2"):
        edmrt.plan("ipndm_afs", karras(1))
