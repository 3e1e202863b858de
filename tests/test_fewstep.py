"""Few-step samplers (consistency, TCD, LCM): parity with diffusers 0.42.1, per-sample seeds, limits.

Conventions of the diffusers peers, mapped onto EDM's sigma space (what the parity tests feed each side):

- Discrete-time schedulers (``TCDScheduler``, ``LCMScheduler``, Stable Diffusion's scaled-linear betas):
  integer timesteps t in [0, 999], alpha_bar_t = ``alphas_cumprod[t]`` (float32), and the VP state
  x_vp = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.  In EDM space sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
  and x = x_vp / sqrt(alpha_bar_t) = x_vp sqrt(1 + sigma_t^2) = x0 + sigma_t eps.  Our schedule is
  [sigma_{t_0}, ..., sigma_{t_{N-1}}, 0] over the scheduler's timesteps; the pipelines start from
  x_vp = noise * init_noise_sigma (= 1) at t_0 = 999, so our x_init = noise / sqrt(alpha_bar_{t_0}).
- Model output: prediction_type "epsilon" gets eps = (x - D) / sigma_t, "sample" gets D (the VP and EDM x0 are
  the same data-space quantity).  Our side runs the same raw network through ``EpsilonPrecond`` / ``X0Precond``
  with that ``alphas_cumprod``: the network sees c_in x = x_vp and c_noise = t, as a diffusers UNet does.
- LCM's boundary-condition scalings (denoised = c_out(t) F + c_skip(t) x_vp, c(t) with 10 t) belong to the model:
  we return F = (D - c_skip x_vp) / c_out with the scheduler's own c_skip, c_out, so its denoised is D.
- ``CMStochasticIterativeScheduler`` works in EDM space already (x = x0 + sigma eps, Karras sigmas in float32,
  sigma_min = 0.002 appended as the final level, x_init = 80 noise); its ``step`` rebuilds
  denoised = c_skip_bc(sigma) x + c_out_bc(sigma) F with the boundary-condition scalings, so we feed
  F = (D - c_skip_bc x) / c_out_bc and its denoised is D.
- Noise: every ``step()`` that adds noise draws one (B, D) float64 tensor from the generator passed to it, in step
  order (TCD and LCM not on the last step, CM on every step, the last one multiplied by ~0).  We pass a seeded
  ``torch.Generator`` and draw the same sequence from a twin generator: draw k belongs to step k, which is our
  stream k + 1 (the noise added at the end of stage k; stream 0, before the first stage, is never used).
"""
import numpy as np
import pytest
import torch

import edmrt
from edmrt.models import GaussianMixture
from edmrt.schedules import vp_sigma, vp_sigma_inv

B, DIM = 24, 64

# Tolerances.  The peers keep alphas_cumprod (TCD, LCM) or sigmas (CM) in float32 and compute 1 - alpha_bar,
# sqrt(...) and the noise scales in float32, so coefficients carry ~6e-8 relative error; multiplied by states of
# size ~15-80 and amplified where samples sit near a mixture's mode boundary, we measured at most 2.2e-6 max abs
# (RMS <= 7e-7) over 2-16 steps (TCD ~1e-6, LCM ~3e-7, CM ~2.5e-6, the last mostly its final-step noise, below).
# With the peers' tables replaced by float64 ones the same runs agree to <= 3e-13.
TOL_F32 = 2e-5
TOL_F64 = 1e-10


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")


def _mixture(seed):
    return GaussianMixture.random(K=8, D=DIM, seed=seed)


def _draws(seed, n):
    """The n float64 (B, DIM) tensors a generator seeded with ``seed`` gives to successive step() calls."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, DIM, dtype=torch.float64, generator=g) for _ in range(n)]


def _noise_from(draws):
    def noise(stream):
        assert stream >= 1, "these plans add no noise before their first stage"
        return draws[stream - 1]
    return noise


def _maxabs_rms(a, b):
    d = a - b
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------- discrete-time peers (TCD, LCM)

def _discrete_levels(sched):
    """alpha_bar_t (the scheduler's float32 values, in float64) and sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    acp = sched.alphas_cumprod.double()
    return acp, torch.sqrt((1.0 - acp) / acp)


def _raw_net(g, sigma_levels, prediction_type):
    """A diffusers-style network on the exact D: input x_vp = c_in x and timestep t, output eps or x0."""
    def net(x_in, c_noise):
        t = int(round(c_noise.reshape(-1)[0].item()))
        sigma = sigma_levels[t]
        x = x_in * torch.sqrt(sigma ** 2 + 1.0)           # (B, DIM) EDM state
        D = g.denoise(x, sigma)
        return (x - D) / sigma if prediction_type == "epsilon" else D
    return net


def _discrete_case(sched, gen, float64_tables, steps):
    """A fresh mixture, the scheduler's timesteps and levels, initial noise and a noise seed for a discrete-time
    parity test; ``float64_tables`` keeps its alphas_cumprod values but makes its arithmetic float64."""
    g = _mixture(int(torch.randint(0, 1000, (1,), generator=gen)))
    if float64_tables:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    acp, sig = _discrete_levels(sched)
    noise = torch.randn(B, DIM, dtype=torch.float64, generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    return g, acp, sig, noise, seed


def _ours_discrete(solver, sched, g, noise, draws, prediction_type, **options):
    acp, sig = _discrete_levels(sched)
    ts = sched.timesteps.tolist()
    sigmas = np.array([sig[t].item() for t in ts] + [0.0])
    pre_cls = edmrt.EpsilonPrecond if prediction_type == "epsilon" else edmrt.X0Precond
    plan = edmrt.plan(solver, sigmas, pre_cls(alphas_cumprod=acp.numpy()), **options)
    return edmrt.execute(plan, _raw_net(g, sig, prediction_type), noise / acp[ts[0]].sqrt(), _noise_from(draws))


@pytest.mark.parametrize("float64_tables", [False, True], ids=["stock", "float64"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("gamma,steps", [(0.0, 4), (0.3, 4), (0.5, 8), (1.0, 2)])
def test_tcd_parity_with_diffusers_given_the_same_noise(diffusers, gen, float64_tables, prediction_type, gamma, steps):
    # SD defaults: original_inference_steps=50, e.g. timesteps [999, 759, 499, 259]
    sched = diffusers.TCDScheduler(prediction_type=prediction_type)
    g, acp, sig, noise, seed = _discrete_case(sched, gen, float64_tables, steps)
    # diffusers' loop on the VP state.
    x_vp, gen_peer = noise.clone(), torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x = x_vp / acp[t].sqrt()
        D = g.denoise(x, sig[t])
        out = (x - D) / sig[t] if prediction_type == "epsilon" else D
        x_vp = sched.step(out, t, x_vp, eta=gamma, generator=gen_peer).prev_sample
    # diffusers' last step stops at timestep 0 (sigma_0 = 0.029), x_vp = sqrt(alpha_bar_0) (x0 + sigma_0 eps); ours
    # goes to sigma = 0.  Both take the x0 of the last evaluation: compare that (it depends on every earlier step).
    ours = _ours_discrete("tcd", sched, g, noise, _draws(seed, steps), prediction_type, gamma=gamma)
    err = _maxabs_rms(ours, D)
    assert err[0] <= (TOL_F64 if float64_tables else TOL_F32), err
    # The check can fail: another gamma on the same inputs and noise is far away.
    other = _ours_discrete("tcd", sched, g, noise, _draws(seed, steps), prediction_type, gamma=abs(gamma - 0.2))
    assert (other - D).abs().max().item() > 1e-2


@pytest.mark.parametrize("float64_tables", [False, True], ids=["stock", "float64"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_parity_with_diffusers_given_the_same_noise(diffusers, gen, float64_tables, prediction_type, steps):
    sched = diffusers.LCMScheduler(prediction_type=prediction_type)
    g, acp, sig, noise, seed = _discrete_case(sched, gen, float64_tables, steps)
    x_vp, gen_peer = noise.clone(), torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x = x_vp / acp[t].sqrt()
        D = g.denoise(x, sig[t])
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        x0 = (D - c_skip * x_vp) / c_out                 # so that its denoised = c_out x0 + c_skip x_vp = D
        a_t = sched.alphas_cumprod[t]
        out = x0 if prediction_type == "sample" else (x_vp - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x_vp = sched.step(out, t, x_vp, generator=gen_peer).prev_sample
    # LCM's last step returns its denoised: the data-space x0, as ours does.
    theirs = x_vp
    ours = _ours_discrete("lcm", sched, g, noise, _draws(seed, steps), prediction_type)
    err = _maxabs_rms(ours, theirs)
    assert err[0] <= (TOL_F64 if float64_tables else TOL_F32), err
    if steps > 1:  # the check can fail: TCD with gamma = 0.8 keeps part of the trajectory instead of restarting
        other = _ours_discrete("tcd", sched, g, noise, _draws(seed, steps), prediction_type, gamma=0.8)
        assert (other - theirs).abs().max().item() > 1e-2


@pytest.mark.parametrize("float64_tables", [False, True], ids=["stock", "float64"])
@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_consistency_parity_with_diffusers_cm_scheduler(diffusers, gen, float64_tables, steps):
    g = _mixture(int(torch.randint(0, 1000, (1,), generator=gen)))
    sched = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0,
                                                     clip_denoised=False)
    sched.set_timesteps(steps)
    if float64_tables:
        # Its sigmas are float32, so the appended final level 0.002 is 0.0020000000949949 and the last step adds
        # sqrt(that^2 - 0.002^2) z = 6.2e-7 z: the main float32 term above.  Same levels, the last one exact.
        sched.sigmas = torch.cat([sched.sigmas[:-1].double(), torch.tensor([0.002], dtype=torch.float64)])
    sched.set_begin_index(0)
    levels = sched.sigmas                                # [sigma_0, ..., sigma_{N-1}, sigma_min]
    noise = torch.randn(B, DIM, dtype=torch.float64, generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    x, gen_peer = noise * sched.init_noise_sigma, torch.Generator().manual_seed(seed)
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)  # as its pipeline does (the network input; our F is built from x directly)
        D = g.denoise(x, levels[i].double())
        c_skip, c_out = sched.get_scalings_for_boundary_condition(levels[i])
        x = sched.step((D - c_skip * x) / c_out, t, x, generator=gen_peer).prev_sample
    sigmas = np.array(levels[:-1].tolist() + [0.0])
    ours = edmrt.execute(edmrt.plan("consistency", sigmas, model_sigma_min=0.002), g,
                         noise * sched.init_noise_sigma, _noise_from(_draws(seed, steps)))
    err = _maxabs_rms(ours, x)
    assert err[0] <= (TOL_F64 if float64_tables else TOL_F32), err
    if steps > 1:  # the check can fail: TCD's partial DDIM jump (gamma = 0.5) on the same noise is far away
        other = edmrt.execute(edmrt.plan("tcd", sigmas, gamma=0.5), g,
                              noise * sched.init_noise_sigma, _noise_from(_draws(seed, steps)))
        assert (other - x).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------- per-sample seeds

@pytest.mark.parametrize("solver,options", [("tcd", dict(gamma=0.5)), ("consistency", {}), ("lcm", {})])
def test_per_sample_seeds_do_not_depend_on_the_batch(gen, solver, options):
    g = _mixture(5)
    noise = torch.randn(64, DIM, dtype=torch.float64, generator=gen)
    seeds = torch.randint(0, 2 ** 62, (64,), generator=gen).tolist()
    batch = edmrt.solve(g, noise, solver=solver, steps=4, seeds=seeds, **options)
    for i in range(64):
        one = edmrt.solve(g, noise[i:i + 1], solver=solver, steps=4, seeds=[seeds[i]], **options)
        assert torch.equal(one[0], batch[i])
    other = edmrt.solve(g, noise[:1], solver=solver, steps=4, seeds=[seeds[0] + 1], **options)
    assert not torch.equal(other[0], batch[0])


# ----------------------------------------------------------------------------- limits and options

def test_tcd_gamma_0_is_deterministic_ddim_and_gamma_1_restarts_like_lcm(gen):
    g = _mixture(6)
    s = edmrt.make_sigmas("karras", 6)
    acp = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    sd = edmrt.make_sigmas("karras", 6, 0.03, 14.0)  # within SD's discrete levels [0.029, 14.6], off the grid
    for sigmas, pre in ((s, None), (s, edmrt.VPPrecond()), (sd, edmrt.EpsilonPrecond(alphas_cumprod=acp))):
        plan = edmrt.plan("tcd", sigmas, pre, gamma=0.0)
        assert not plan.stochastic and plan.n_init == 0.0
        assert edmrt.plan("tcd", sigmas, pre, gamma=0.1).stochastic
    x = 80.0 * torch.randn(B, DIM, dtype=torch.float64, generator=gen)
    # DDIM in sigma space, x_{i+1} = D + (sigma_{i+1} / sigma_i)(x_i - D), is Euler's step.
    ddim = edmrt.execute(edmrt.plan("tcd", s, gamma=0.0), g, x)
    assert (ddim - edmrt.execute(edmrt.plan("euler", s), g, x)).abs().max().item() <= 1e-12
    # gamma = 1 in EDM time: s = 0, x_{i+1} = D + sigma_{i+1} z, LCM's step.
    draws = _draws(1, 6)
    full = edmrt.execute(edmrt.plan("tcd", s, gamma=1.0), g, x, _noise_from(draws))
    assert (full - edmrt.execute(edmrt.plan("lcm", s), g, x, _noise_from(draws))).abs().max().item() <= 1e-12


def test_tcd_intermediate_level_follows_the_model_time():
    """s = (1 - gamma) t in the model's time: sigma(t) = t (EDM), VP's sigma(t), discrete floor((1 - gamma) t)."""
    gamma = 0.3
    s = edmrt.make_sigmas("karras", 5, 0.05, 10.0)
    sigma_s = lambda plan: (plan.a + plan.e)[:-1] * plan.sigma[:-1]  # noqa: E731  state weight = sigma_s / sigma_t
    np.testing.assert_allclose(sigma_s(edmrt.plan("tcd", s, edmrt.EDMPrecond(), gamma=gamma)), (1 - gamma) * s[1:-1],
                               rtol=1e-14)
    vp = edmrt.VPPrecond()
    np.testing.assert_allclose(sigma_s(edmrt.plan("tcd", s, vp, gamma=gamma)),
                               vp_sigma((1 - gamma) * vp_sigma_inv(s[1:-1])), rtol=1e-13)
    acp = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    levels = np.sqrt((1 - acp) / acp)
    t_next = np.array([759, 90, 10])  # 0.7 * 90 = 63 and 0.7 * 10 = 7 exactly, though 0.7 * 90 < 63 in float64
    sd = np.concatenate([levels[[999]], levels[t_next], [0.0]])
    plan = edmrt.plan("tcd", sd, edmrt.EpsilonPrecond(alphas_cumprod=acp), gamma=gamma)
    np.testing.assert_allclose(sigma_s(plan), levels[[531, 63, 7]], rtol=1e-13)
    # Noise from s to the next level: sqrt(sigma_next^2 - sigma_s^2).
    np.testing.assert_allclose(plan.n[:-1], np.sqrt(levels[t_next] ** 2 - levels[[531, 63, 7]] ** 2), rtol=1e-12)
    assert plan.n[-1] == 0.0 and plan.a[-1] == 0.0 and plan.b[-1, 0] == 1.0  # the last step returns x0 = D


def test_one_step_consistency_is_the_denoiser(gen):
    g = _mixture(7)
    noise = torch.randn(B, DIM, dtype=torch.float64, generator=gen)
    s = edmrt.make_sigmas("karras", 1)
    out = edmrt.solve(g, noise, solver="consistency", steps=1)
    assert torch.equal(out, g.denoise(float(s[0]) * noise, float(s[0])))
    assert not edmrt.plan("consistency", s).stochastic and not edmrt.plan("lcm", s).stochastic


def test_consistency_noise_scales_follow_algorithm_1():
    s = edmrt.make_sigmas("karras", 5)
    p = edmrt.plan("consistency", s, model_sigma_min=0.001)
    np.testing.assert_allclose(p.n[:-1], np.sqrt(s[1:-1] ** 2 - 0.001 ** 2), rtol=1e-14)
    assert p.n[-1] == 0.0 and p.n_init == 0.0 and np.all(p.b[:, 0] == 1.0) and np.all(p.a == 0.0)
    np.testing.assert_array_equal(edmrt.plan("lcm", s).n[:-1], s[1:-1])


@pytest.mark.parametrize("solver,options,match", [
    ("tcd", dict(gamma=1.5), "gamma"),
    ("tcd", dict(gamma=-0.1), "gamma"),
    ("tcd", dict(gamma=float("nan")), "gamma"),
    ("tcd", dict(gamma="0.3x"), "gamma"),
    ("consistency", dict(model_sigma_min=-1.0), "model_sigma_min"),
    ("consistency", dict(model_sigma_min=float("inf")), "model_sigma_min"),
    ("consistency", dict(model_sigma_min=0.01), r"model_sigma_min = 0\.01"),  # karras schedule reaches 0.002
    ("lcm", dict(gamma=0.3), "unknown option 'gamma' for solver 'lcm'"),
])
def test_bad_options_raise_naming_the_option(solver, options, match):
    with pytest.raises(ValueError, match=match):
        edmrt.plan(solver, edmrt.make_sigmas("karras", 4), **options)
