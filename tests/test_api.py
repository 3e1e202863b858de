import pytest
import torch

import edmrt
from edmrt.models import GaussianMixture


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(K=6, D=10, seed=8)


def test_solve_defaults_are_edm_heun_18(gmm, gen):
    noise = torch.randn(4, 10, dtype=torch.float64, generator=gen)
    calls = []

    def den(x, sigma):
        calls.append(sigma)
        return gmm(x, sigma)

    out = edmrt.solve(den, noise)
    assert len(calls) == 35 and calls[0].shape == (4, 1) and float(calls[0][0, 0]) == 80.0
    assert out.shape == noise.shape and out.dtype == torch.float64
    direct = edmrt.execute(edmrt.plan("heun", edmrt.make_sigmas("karras", 18)), gmm, 80.0 * noise)
    assert torch.equal(out, direct)


@pytest.mark.parametrize("schedule", sorted(edmrt.SCHEDULES) + ["list"])
def test_every_schedule_name_and_a_list_is_honoured(gmm, gen, schedule):
    """The denoiser is evaluated at exactly the schedule's levels (DPM-Solver++(2M) evaluates at t_0 .. t_{N-1}),
    from t_0 times the noise, and the result is the reference executor's on that plan, bit for bit."""
    noise = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    sched = [80.0, 20.0, 3.0, 0.5, 0.05, 0.002] if schedule == "list" else schedule
    levels = edmrt.make_sigmas(sched, 12)
    seen = []

    def den(x, sigma):
        seen.append(sigma)
        return gmm(x, sigma)

    out = edmrt.solve(den, noise, solver="dpmpp_2m", steps=12, schedule=sched)
    assert [float(s[0, 0]) for s in seen] == levels[:-1].tolist()
    assert all(torch.equal(s, s[:1].expand_as(s)) for s in seen)  # one sigma per call, for every sample
    ref = edmrt.execute(edmrt.plan("dpmpp_2m", levels), gmm, float(levels[0]) * noise)
    assert torch.equal(out, ref)
    if schedule in ("karras", "loglinear", "linear", "polyexponential", "list"):
        assert levels[0] == pytest.approx(80.0, rel=1e-12) and levels[-2] == pytest.approx(0.002, rel=1e-9)


def test_float32_follows_float64(gmm, gen):
    noise = torch.randn(6, 2, 5, generator=gen)  # float32, any trailing shape
    a = edmrt.solve(gmm, noise, steps=10)
    b = edmrt.solve(gmm, noise.double(), steps=10)
    assert a.dtype == torch.float32 and a.shape == (6, 2, 5)
    assert (a.double() - b).abs().max().item() < 1e-4


def test_per_sample_seeds_do_not_depend_on_the_batch(gmm, gen):
    noise = torch.randn(64, 10, dtype=torch.float64, generator=gen)
    seeds = list(range(1000, 1064))
    batch = edmrt.solve(gmm, noise, solver="edm", steps=10, seeds=seeds, S_churn=30.0)
    for i in (0, 17, 63):
        one = edmrt.solve(gmm, noise[i:i + 1], solver="edm", steps=10, seeds=[seeds[i]], S_churn=30.0)
        assert torch.equal(one[0], batch[i])
    other = edmrt.solve(gmm, noise[:1], solver="edm", steps=10, seeds=[7], S_churn=30.0)
    assert not torch.equal(other[0], batch[0])


def test_seeded_noise_is_standard_normal_and_keyed():
    src = edmrt.SeededNoise(list(range(4000)), (64,), torch.float64)  # 256k draws: 0.01 is 5 standard errors
    z = src(3)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert not torch.equal(src(3), src(4))
    assert torch.equal(src(3), z)


@pytest.mark.parametrize("kw,match", [
    (dict(solver="nope"), "unknown solver 'nope'"),
    (dict(schedule="sine"), "unknown schedule"),
    (dict(steps=0), "steps"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=100.0), "sigma_min must be < sigma_max"),
    (dict(schedule=[1.0, 2.0]), "strictly descending"),
    (dict(solver="heun", foo=1), "unknown option 'foo'"),
    (dict(solver="edm", S_churn=10.0, seeds=[1, 2]), "one integer per sample"),
    (dict(solver="edm", S_churn=10.0, seeds=[1, 2, -3]), r"seeds must be in \[0, 2\*\*63\)"),
    (dict(solver="edm", S_churn=10.0, seeds=[1, 2, 3.5]), "integers"),
])
def test_bad_arguments_raise(gmm, kw, match):
    noise = torch.randn(3, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        edmrt.solve(gmm, noise, **kw)


def test_bad_noise_and_denoisers_raise(gmm):
    with pytest.raises(ValueError, match="finite"):
        edmrt.solve(gmm, torch.tensor([[float("nan")] * 10]))
    with pytest.raises(ValueError, match="floating-point"):
        edmrt.solve(gmm, torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="callable"):
        edmrt.solve("gmm", torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        edmrt.solve(lambda x, s: x[:, :3], torch.zeros(2, 10))
    with pytest.raises(FloatingPointError, match="NaN"):
        edmrt.solve(lambda x, s: x * float("nan"), torch.zeros(2, 10))
    p = edmrt.plan("edm", edmrt.make_sigmas("karras", 5), S_churn=10.0)
    with pytest.raises(ValueError, match="stochastic"):
        edmrt.execute(p, gmm, torch.zeros(2, 10))


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_solve_reads_the_denoisers_output_in_place_and_equals_the_copying_engine(gmm, gen, solver):
    """edmrt.solve hands the fused step the denoiser's own float32 output (no copy into the engine's F buffer):
    the result is bit for bit the one of an engine that copies every output, also when the denoiser returns a
    view of its input (which is copied, never read in place), and a second call (its plan from the cache) agrees."""
    from edmrt.backends import CallableBackend
    from edmrt.engine import Engine

    noise = torch.randn(5, 10, generator=gen)
    seeds = [11, 12, 13, 14, 15]
    den = lambda x, sigma: gmm(x.double(), sigma.double()).float()  # noqa: E731
    fast = edmrt.solve(den, noise, solver=solver, steps=7, seeds=seeds)
    plan = edmrt.plan(solver, edmrt.make_sigmas("karras", 7))
    copying = CallableBackend(lambda x_in, c: den(x_in, c.view(-1, 1)))   # pass_through off: out.copy_ each time
    eng = Engine(copying, plan, 5, (10,), "cpu", graph=False, cond_inputs=())
    slow = eng.run(torch.tensor(seeds), x_init=80.0 * noise)
    assert torch.equal(fast, slow)
    assert torch.equal(edmrt.solve(den, noise, solver=solver, steps=7, seeds=seeds), fast)
    # A denoiser that returns (a view of) the engine's own input buffer: copied, so the step never reads what it writes
    aliasing = lambda x, sigma: x.mul_(1.0)  # noqa: E731  (in place: returns x_in itself)
    out = edmrt.solve(aliasing, noise, solver="euler", steps=4)
    ref = edmrt.execute(edmrt.plan("euler", edmrt.make_sigmas("karras", 4)), lambda x, s: x, 80.0 * noise.double())
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_solve_from_threads_with_different_denoisers_on_one_cached_engine(gmm, gen):
    """Calls with the same plan and shape share a cached engine; each thread's call still runs its own denoiser."""
    import threading

    noise = torch.randn(6, 10, generator=gen)
    scales = [0.5, 0.8, 1.0, 1.3]
    dens = [lambda x, sigma, k=k: (gmm(x.double(), sigma.double()) * k).float() for k in scales]
    want = [edmrt.solve(d, noise, solver="dpmpp_2m", steps=6) for d in dens]
    assert not torch.equal(want[0], want[1])
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(5):
                got[i] = edmrt.solve(dens[i], noise, solver="dpmpp_2m", steps=6)
                assert torch.equal(got[i], want[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(dens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
