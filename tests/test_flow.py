"""Flow-matching models (rectified flow: SD3's ``SD3Transformer2DModel`` with ``FlowMatchEulerDiscreteScheduler``).

- ``FlowPrecond`` turns a velocity network into EDM's denoiser: on x_t = (1 - t) x_0 + t eps and v = eps - x_0 its
  D is x_0 (float64, fresh random x_0, eps and t).
- The "flow" schedule with SD3's shift is diffusers' set_timesteps, to float32 rounding (diffusers keeps float32);
  the model card's default sampler is it.
- ``StableDiffusion3Pipeline`` on a tiny random transformer built here (given prompt and pooled embeddings, with
  and without guidance, shift 1 and 3): edmrt's Sampler with ``sampler_args(scheduler)`` and
  ``initial_noise(latents, scheduler)`` gives the pipeline's latents.  Differences in method, none in the result:
  diffusers' t = 1 is edmrt's level ``FLOW_T_MAX`` (sigma 1.7e7, the network's input identical in float32), and
  edmrt's Euler runs in data form (the same step; diffusers' x + (t' - t) v in the flow state).  Measured 1.6e-7 ..
  3.8e-7 relative; another solver is > 100x the tolerance away.
- The exact Gaussian mixture as a velocity network, from t = 1 against its exact ODE solution: the data-form
  solvers (Euler, DPM-Solver++, UniPC) converge, the second-order ones faster; the derivative-form ones (Heun, LMS,
  iPNDM: x + h d, which cancels to nothing in float32 from sigma 1.7e7) are refused by name.
"""
import numpy as np
import pytest
import torch

import edmrt
from edmrt.precond import FlowPrecond
from edmrt.schedules import FLOW_T_MAX, flow_sigma, flow_time, make_sigmas

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")
from edmrt.adapters.diffusers import from_diffusers, initial_noise, sampler_args, scheduler_sigmas  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

RTOL = 1e-5
TOKENS, DIM, POOLED = 7, 16, 12


def rel(x, ref) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def test_flow_precond_turns_a_velocity_into_the_denoised_image():
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    t = rng.uniform(0.01, 0.99, size=(5, 1))
    sigma = flow_sigma(t)
    pre = FlowPrecond(num_train_timesteps=1000.0)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    x = x0 + sigma * eps                            # edmrt's state: x_t / (1 - t)
    x_t = (1 - t) * x0 + t * eps
    np.testing.assert_allclose(c_in * x, x_t, rtol=1e-12)    # the network sees the flow state
    np.testing.assert_allclose(c_noise, 1000.0 * t, rtol=1e-12)
    np.testing.assert_allclose(c_skip * x + c_out * (eps - x0), x0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flow_time(sigma), t, rtol=1e-12)
    assert flow_sigma(1.0) == FLOW_T_MAX / (1 - FLOW_T_MAX) == 2.0 ** 24 - 1
    assert edmrt.plan("euler", [3.0, 1.0, 0.0], pre).precond == pre.to_dict()
    with pytest.raises(ValueError, match="num_train_timesteps must be a finite number > 0"):
        FlowPrecond(num_train_timesteps=0)
    with pytest.raises(ValueError, match=r"flow time t must lie in \[0, 1\]"):
        flow_sigma(-0.1)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_the_flow_schedule_is_diffusers_set_timesteps(shift, steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    theirs = scheduler_sigmas(sched)
    lo, hi = float(flow_sigma(float(sched.sigma_min))), float(flow_sigma(float(sched.sigma_max)))
    ours = make_sigmas("flow", steps, lo, hi, shift=shift)
    assert ours.shape == theirs.shape and ours[-1] == theirs[-1] == 0.0 and ours[0] == theirs[0] == 2.0 ** 24 - 1
    np.testing.assert_allclose(flow_time(ours), flow_time(theirs), rtol=0, atol=1e-7)   # float32 t


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=DIM, caption_projection_dim=DIM, pooled_projection_dim=POOLED, out_channels=4,
        pos_embed_max_size=16).eval()


def _inputs(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    emb, pooled = torch.randn(n, TOKENS, DIM, generator=g), torch.randn(n, POOLED, generator=g)
    neg, npooled = torch.randn(n, TOKENS, DIM, generator=g), torch.randn(n, POOLED, generator=g)
    return emb, pooled, neg, npooled, torch.randn(n, 4, 8, 8, generator=g)


def _pipe(sd3, shift):
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=sd3, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_sd3_pipeline_parity(sd3, shift, w):
    pipe = _pipe(sd3, shift)
    emb, pooled, neg, npooled, L = _inputs()
    theirs = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                  negative_pooled_prompt_embeds=npooled, latents=L.clone(), num_inference_steps=5, guidance_scale=w,
                  output_type="latent", height=64, width=64).images
    model = from_diffusers(sd3, pipe.scheduler, cond_shapes={"encoder_hidden_states": (TOKENS, DIM)})
    guided = w != 1.0
    kw = dict(cond={"encoder_hidden_states": emb, "pooled_projections": pooled},
              uncond={"encoder_hidden_states": neg, "pooled_projections": npooled} if guided else None,
              guidance=w if guided else None, noise=initial_noise(L, pipe.scheduler), output="latent")
    ours = edmrt.Sampler(model, backend="torch", **sampler_args(pipe.scheduler)).sample([0, 1], **kw)
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)       # measured 1.6e-7 .. 3.8e-7
    # The card's default sampler (Euler on the flow schedule with the scheduler's shift) is the same run.
    card = edmrt.Sampler(model, backend="torch", steps=5)
    assert card.solver == "euler"
    np.testing.assert_allclose(flow_time(card.plan.sigmas), flow_time(scheduler_sigmas(pipe.scheduler)), atol=1e-7)
    assert rel(card.sample([0, 1], **kw), theirs) <= RTOL
    other = edmrt.Sampler(model, backend="torch", solver="dpmpp_2m", **{k: v for k, v in sampler_args(
        pipe.scheduler).items() if k != "solver"})
    assert rel(other.sample([0, 1], **kw), theirs) > 100 * RTOL     # the check can fail


def _flow_gmm(shift):
    """The exact Gaussian mixture as a velocity network: v = (x_t - D(x; sigma)) / t, x = x_t / (1 - t)."""
    gmm = edmrt.models.GaussianMixture.random(K=6, D=16, seed=5)

    def net(x_in, c_noise):
        t = c_noise.reshape(-1, 1).double() / 1000.0
        xt = x_in.double()
        return ((xt - gmm.denoise(xt / (1 - t), (t / (1 - t)).reshape(-1))) / t).float()

    hi = float(flow_sigma(1.0))
    model = edmrt.Model(net, FlowPrecond(), sample_shape=(16,), sigma_min=float(flow_sigma(0.003)), sigma_max=hi,
                        metadata={"sampling": {"solver": "euler", "steps": 10, "schedule": "flow", "shift": shift}})
    return gmm, model, hi


def test_the_data_form_solvers_converge_on_a_flow_model_and_the_others_are_refused():
    gmm, model, hi = _flow_gmm(1.0)
    noise = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    exact = gmm.ode(noise.double() * hi, hi, 0.0)      # from t = 1 (sigma 1.7e7) to the data

    def err(solver, steps):
        x = edmrt.Sampler(model, solver=solver, steps=steps, backend="torch").sample(range(48), noise=noise)
        return ((x.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()

    table = {s: [err(s, n) for n in (5, 10, 20, 40)] for s in ("euler", "dpmpp_2m", "unipc")}
    for s, row in table.items():
        assert all(b < a for a, b in zip(row, row[1:])), (s, row)     # falls with the steps
    assert table["dpmpp_2m"][-1] < 0.5 * table["euler"][-1] and table["unipc"][-1] < 0.5 * table["euler"][-1], table
    for solver in ("heun", "lms", "ipndm"):     # x + h d from sigma 1.7e7 would cancel to nothing in float32
        with pytest.raises(ValueError, match=f"solver '{solver}' steps in derivative form.*use a solver in data form"):
            edmrt.Sampler(model, solver=solver, steps=10)


def test_flow_configurations_edmrt_does_not_run_are_refused_by_name(sd3):
    with pytest.raises(ValueError, match="an SD3Transformer2DModel predicts flow velocity"):
        from_diffusers(sd3, diffusers.DDPMScheduler())
    for key, value in (("use_dynamic_shifting", True), ("stochastic_sampling", True), ("invert_sigmas", True)):
        with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
            from_diffusers(sd3, diffusers.FlowMatchEulerDiscreteScheduler(**{key: value}))


def test_an_sd3_folder_loads_and_samples(sd3, tmp_path):
    """A saved pipeline folder (its text encoders left out): edmrt.load reads the transformer and the scheduler;
    the prompt embeddings are 333 tokens (CLIP's 77 + T5's 256) unless cond_shapes says otherwise."""
    pipe = _pipe(sd3, 3.0)
    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    model = edmrt.load(str(tmp_path / "sd3"))
    assert isinstance(model.precond, FlowPrecond) and model.metadata["sampling"]["shift"] == 3.0
    assert {c.name: c.shape for c in model.cond} == {"encoder_hidden_states": (333, DIM), "pooled_projections": (POOLED,)}
    g = torch.Generator().manual_seed(0)
    x = edmrt.Sampler(model, backend="torch", steps=3).sample(
        [0], cond={"encoder_hidden_states": torch.randn(1, 333, DIM, generator=g),
                   "pooled_projections": torch.randn(1, POOLED, generator=g)}, output="latent")
    assert x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()
