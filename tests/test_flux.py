"""Flux (``FluxTransformer2DModel`` with ``FlowMatchEulerDiscreteScheduler`` and dynamic shifting).

- ``FluxPipeline`` on tiny random transformers built here (given prompt and pooled embeddings; the distilled
  guidance input of FLUX.1-dev, and "true" CFG with a negative prompt; two image sizes, so two dynamic shifts):
  edmrt's Sampler with ``sampler_args(scheduler)`` and ``initial_noise`` gives the pipeline's (packed) latents.
  edmrt keeps the VAE's (C, H, W) layout; the pipeline's packing of 2 x 2 patches is a permutation, applied here to
  compare.
- The card's default schedule (``"flux"``, with the dynamic shift of the model's sample shape) is the pipeline's.
"""
import numpy as np
import pytest
import torch

import edmrt
from edmrt.precond import FlowPrecond

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from edmrt.adapters.diffusers import from_diffusers, initial_noise, sampler_args, scheduler_sigmas  # noqa: E402
from edmrt.adapters.flux import dynamic_shift  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

RTOL = 1e-5
TOKENS, DIM, POOLED, C = 9, 32, 32, 4
SEEDS = [2, 7]


def rel(x, ref) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def transformer(guidance_embeds: bool):
    torch.manual_seed(int(guidance_embeds))
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=DIM, pooled_projection_dim=POOLED, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds).eval()


def scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def pipe(net):
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                                  layers_per_block=1, latent_channels=C, norm_num_groups=4, sample_size=32,
                                  shift_factor=0.0609, scaling_factor=1.5035).eval()
    p = diffusers.FluxPipeline(scheduler=scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=net)
    p.set_progress_bar_config(disable=True)
    return p, vae


def pack(x):   # FluxPipeline._pack_latents
    B, c, h, w = x.shape
    return x.view(B, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), c * 4)


def inputs(seed, hw):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(2, TOKENS, DIM), r(2, POOLED), r(2, TOKENS, DIM), r(2, POOLED), r(2, C, hw, hw)


def _their_scheduler(steps, hw):
    """The scheduler as FluxPipeline sets it: sigmas linspace(1, 1/N, N), mu of the packed sequence length."""
    sched = scheduler()
    mu = calculate_shift((hw // 2) ** 2, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched


@pytest.mark.parametrize("distilled,cfg,hw,steps", [(True, 1.0, 16, 4), (True, 4.0, 16, 3), (False, 3.0, 32, 5),
                                                    (False, 1.0, 32, 1)])
def test_flux_pipeline_parity(distilled, cfg, hw, steps):
    """FLUX.1-dev-style (the guidance scale 3.5 as the transformer's input) and schnell-style (none) transformers,
    with "true" CFG (``true_cfg_scale`` and a negative prompt: edmrt's guidance) or without."""
    net = transformer(distilled)
    p, _ = pipe(net)
    emb, pooled, neg, npooled, L = inputs(steps, hw)
    kw = dict(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=npooled, true_cfg_scale=cfg) if cfg > 1 else {}
    theirs = p(prompt_embeds=emb, pooled_prompt_embeds=pooled, latents=pack(L), height=2 * hw, width=2 * hw,
               num_inference_steps=steps, guidance_scale=3.5, output_type="latent", **kw).images
    model = from_diffusers(net, scheduler(), sample_shape=(C, hw, hw))
    assert isinstance(model.precond, FlowPrecond)
    sched = _their_scheduler(steps, hw)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    if distilled:
        cond["guidance"] = torch.tensor(3.5)
    uncond = {"encoder_hidden_states": neg, "pooled_projections": npooled} if cfg > 1 else None
    sampler = edmrt.Sampler(model, backend="torch", **sampler_args(sched))
    ours = sampler.sample(SEEDS, cond=cond, uncond=uncond, guidance=cfg if cfg > 1 else None,
                          noise=initial_noise(L, sched), output="latent")
    # Measured 2.0e-7 .. 5.8e-7.
    assert rel(pack(ours), theirs) <= RTOL, rel(pack(ours), theirs)
    # The card's default sampler at the same step count is the pipeline's schedule.
    default = edmrt.Sampler(model, backend="torch", steps=steps).plan.sigmas
    np.testing.assert_allclose(default, scheduler_sigmas(sched), rtol=2e-6, atol=0)
    if steps > 1:
        other = edmrt.Sampler(model, backend="torch", solver="dpmpp_2m", steps=steps,
                              schedule=scheduler_sigmas(sched)).sample(SEEDS, cond=cond, uncond=uncond,
                                                                        guidance=cfg if cfg > 1 else None,
                                                                        noise=initial_noise(L, sched), output="latent")
        assert rel(pack(other), theirs) > 100 * RTOL   # the check can fail


@pytest.mark.parametrize("hw", [8, 64, 128, 200])
def test_dynamic_shift_is_the_pipelines_mu(hw):
    """e^mu (exponential time shift) and mu (linear) at the packed sequence length, as calculate_shift gives mu."""
    mu = calculate_shift((hw // 2) ** 2, 256, 4096, 0.5, 1.15)
    assert dynamic_shift(scheduler().config, (C, hw, hw)) == pytest.approx(np.exp(mu), rel=1e-12)
    linear = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    if mu > 0:
        assert dynamic_shift(linear.config, (C, hw, hw)) == pytest.approx(mu, rel=1e-12)
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(linear.config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        ours = edmrt.make_sigmas("flux", 6, sigma_max=2.0 ** 24, shift=mu)
        np.testing.assert_allclose(ours, scheduler_sigmas(sched), rtol=2e-6)


def test_flux_refusals():
    net = transformer(True)
    with pytest.raises(ValueError, match="an FluxTransformer2DModel predicts flow velocity"):
        from_diffusers(net, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match=r"sample_shape must be \(C, H, W\) with even H and W"):
        from_diffusers(net, scheduler(), sample_shape=(C, 15, 16))
    model = from_diffusers(net, scheduler(), sample_shape=(C, 8, 8))
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(1, TOKENS, DIM, generator=g),
            "pooled_projections": torch.randn(1, POOLED, generator=g)}
    with pytest.raises(ValueError, match="cond must give 'guidance'"):
        edmrt.Sampler(model, backend="torch", steps=2).sample([0], cond=cond)
    # A 512-token default (FluxPipeline's max_sequence_length); other lengths run on the torch backends.
    assert model.cond[0].shape == (512, DIM) and model.metadata["sampling"]["schedule"] == "flux"
    x = edmrt.Sampler(model, backend="torch", steps=2).sample([0], cond=dict(cond, guidance=torch.tensor(3.5)),
                                                              output="latent")
    assert x.shape == (1, C, 8, 8) and torch.isfinite(x).all()


def test_a_flux_folder_loads_with_the_shift_of_its_sample_shape(tmp_path):
    """A saved FluxPipeline folder (text encoders left out): edmrt.load reads the transformer, the scheduler and the
    VAE; the card's shift is the dynamic shift of the sample shape asked for (1024 px by default)."""
    p, vae = pipe(transformer(True))
    p.save_pretrained(tmp_path / "flux", safe_serialization=True)
    model = edmrt.load(str(tmp_path / "flux"))
    assert model.sample_shape == (C, 128, 128)
    assert model.metadata["sampling"]["shift"] == pytest.approx(np.exp(1.15), rel=1e-12)   # 4096 tokens: max_shift
    from edmrt.adapters.diffusers import load_diffusers
    small = load_diffusers(tmp_path / "flux", sample_shape=(C, 16, 16))
    assert small.metadata["sampling"]["shift"] == pytest.approx(np.exp(calculate_shift(64, 256, 4096, 0.5, 1.15)))
    emb, pooled, _, _, L = inputs(0, 16)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled, "guidance": torch.tensor(3.5)}
    images = edmrt.Sampler(small, backend="torch", steps=3).sample(SEEDS, cond=cond)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    theirs = p(prompt_embeds=emb, pooled_prompt_embeds=pooled, latents=pack(L), height=32, width=32,
               num_inference_steps=3, guidance_scale=3.5, output_type="pt").images
    ours = edmrt.Sampler(small, backend="torch", steps=3).sample(SEEDS, cond=cond, noise=initial_noise(
        L, _their_scheduler(3, 16)))
    assert (ours.float() - (theirs * 255).round()).abs().max().item() <= 1.0   # the VAE decode as the pipeline's
