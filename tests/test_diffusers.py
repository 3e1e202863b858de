"""Real diffusers models through edmrt: parity with diffusers 0.42.1 pipelines on tiny random networks.

Each case runs a diffusers pipeline with ``latents=L``, ``output_type="latent"`` and given prompt embeddings, and
``edmrt.Sampler(from_diffusers(...), backend="torch")`` with the same network, noise and noise levels:

- Schedule: ``schedule=scheduler_sigmas(sched)``, the scheduler's own sigmas after ``set_timesteps`` (float32
  values, ending in 0; LCM and TCD: sigma_t of their integer timesteps, then 0).
- Start: the pipeline's state begins at L * init_noise_sigma (``prepare_latents``): the VE state x itself for
  Euler and the EDM schedulers, x_vp = x / sqrt(sigma_0^2 + 1) for DPM-Solver, UniPC, LCM, TCD and DDIM
  (init_noise_sigma = 1).  edmrt starts at sigma_0 * noise, so ``noise = initial_noise(L, sched)``.
- Guidance: the pipelines' F_u + w (F_c - F_u) on the UNet output is edmrt's ``guidance=w`` with
  ``uncond`` = the negative embeddings; w = 1 in a pipeline turns guidance off, which is ``guidance=None`` here.
- Fresh noise (LCM's multistep sampling, TCD with gamma > 0): diffusers draws it with ``randn_tensor`` inside
  ``step()``; the tests make it draw edmrt's own Philox noise instead (``SeededNoise(seeds)(k + 1)`` for the k-th
  draw: the noise the engine adds after stage k, stream k + 1), so both sides add the same noise per sample.

Tolerance.  Both sides evaluate the float32 network on inputs that differ by rounding only: edmrt computes c_in,
c_skip, c_out and the solver's coefficients in float64 and rounds them to float32 once, diffusers computes them
in float32 (sqrt(sigma^2 + 1), alpha_bar products); and the timestep edmrt gives the network is found from the
float32 sigma in a float64 table (for Euler's interpolated timesteps, off by ~1e-5 from diffusers' own).  The
random tiny networks produce latents of size 1-750; measured max abs differences are 1.8e-7 .. 2.3e-6 of the
largest |latent| over the cases below (stated at each), so each asserts RTOL = 1e-5 (relative to the largest
|latent|).  A wrong method is far away: another solver on the same inputs is 2.5e-2 .. 6e-2 relative away (checked
against 100 RTOL).
"""
import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edmrt

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")
from diffusers.schedulers import scheduling_lcm, scheduling_tcd  # noqa: E402

from edmrt.adapters.diffusers import (VAEDecoder, from_diffusers, guidance_embedding, initial_noise,  # noqa: E402
                                      load_diffusers, precond_from_scheduler, scheduler_sigmas)

# diffusers 0.42.1 with numpy 2 warns in its own set_timesteps (np.array on a torch tensor): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RTOL = 1e-5
B, TOKENS = 2, 7
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, steps_offset=1)
SD_LEADING = dict(SD, timestep_spacing="leading")  # SD 1.5 / SDXL's Euler config: integer timesteps
EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
SEEDS = [11, 12]


def rel(x, ref) -> float:
    """max |x - ref| relative to the largest |ref|."""
    return (x.float() - ref.float()).abs().max().item() / ref.abs().max().item()


def tiny_unet(seed=0, sdxl=False, **kw):
    """diffusers' tiny test UNets (tests/pipelines/stable_diffusion*), at sample_size 8."""
    torch.manual_seed(seed)
    extra = dict(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1) if sdxl \
        else dict(cross_attention_dim=32, norm_num_groups=2)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **extra, **kw).eval()


def tiny_vae(**kw):
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                   norm_num_groups=2, **kw).eval()


@pytest.fixture(scope="module")
def sd():
    return tiny_unet(), tiny_vae()


@pytest.fixture(scope="module")
def sdxl():
    # Playground v2.5's VAE config carries latents_mean / latents_std (and scaling_factor 0.5).
    return tiny_unet(sdxl=True), tiny_vae(scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3, 0.0],
                                  latents_std=[0.9, 1.1, 0.8, 1.2])


def sd_pipe(unet, vae, sched):
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_pipe(unet, vae, sched):
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_inputs(dim, seed=1, tokens=TOKENS):
    """Initial latents L and (prompt, negative prompt) embeddings, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, tokens, dim, generator=g), \
        torch.randn(B, tokens, dim, generator=g)


def scheduler_sampler(model, sched, solver, **options):
    sig = scheduler_sigmas(sched)
    # On the CPU, where the pipelines run: a Sampler on a GPU would move the shared network there.
    return edmrt.Sampler(model, solver=solver, steps=sig.size - 1, schedule=sig, backend="torch", device="cpu",
                         **options)


def _guided(w):
    """The pipeline's guidance_scale w as edmrt's guidance (w = 1: no guidance, one conditional pass)."""
    return None if w == 1.0 else w


def _philox_draws(monkeypatch, module, shape):
    """Make ``module``'s ``randn_tensor`` return edmrt's Philox noise for SEEDS: draw k is stream k + 1."""
    src, calls = edmrt.SeededNoise(SEEDS, shape, torch.float32), []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(shape)
        return src(len(calls)).to(dtype)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


# ----------------------------------------------------------------------------- Stable Diffusion 1.x / 2.x

SD_CASES = [("EulerDiscreteScheduler", SD_LEADING, "euler", {}, "dpmpp_2m"),
            ("DPMSolverMultistepScheduler", SD, "dpmpp_2m", {}, "euler"),
            ("UniPCMultistepScheduler", SD, "unipc", dict(order=2, variant="bh2"), "euler")]


@pytest.mark.parametrize("w", [7.5, 1.0])
@pytest.mark.parametrize("cls,config,solver,options,other", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_stable_diffusion_pipeline_parity(sd, cls, config, solver, options, other, w):
    """Euler = ``euler``; DPM-Solver++(2M) (midpoint, lower_order_final, final sigma 0) = ``dpmpp_2m``; UniPC
    (bh2, order 2, corrector on) = ``unipc``: as tests/test_parity_diffusers.py and test_unipc.py show on exact
    denoisers, here on the UNet with text conditioning and CFG."""
    unet, vae = sd
    sched = getattr(diffusers, cls)(**config)
    L, emb, neg = sd_inputs(32)
    theirs = sd_pipe(unet, vae, sched)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(),
                                        num_inference_steps=6, guidance_scale=w, output_type="latent",
                                        height=16, width=16).images
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    args = dict(cond={"encoder_hidden_states": emb}, guidance=_guided(w), noise=initial_noise(L, sched),
                output="latent", uncond={"encoder_hidden_states": neg} if w != 1.0 else None)
    ours = scheduler_sampler(model, sched, solver, **options).sample(SEEDS, **args)
    # Measured (w = 7.5 / w = 1): Euler 8.8e-7 / 1.8e-7, DPM-Solver++(2M) 1.1e-6 / 2.2e-7, UniPC 9.9e-7 / 4.4e-7.
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)
    assert rel(scheduler_sampler(model, sched, other).sample(SEEDS, **args), theirs) > 100 * RTOL  # the check can fail


def test_stable_diffusion_euler_float64_reference(sd):
    """The same Euler case through ``edmrt.execute``, the float64 reference loop (the network in float32)."""
    unet, vae = sd
    sched, w = diffusers.EulerDiscreteScheduler(**SD_LEADING), 7.5
    L, emb, neg = sd_inputs(32)
    theirs = sd_pipe(unet, vae, sched)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(),
                                        num_inference_steps=6, guidance_scale=w, output_type="latent",
                                        height=16, width=16).images
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    sig = scheduler_sigmas(sched)

    @torch.no_grad()
    def net(x_in, c_noise):  # F = F_u + w (F_c - F_u), as the Sampler's fused step applies it
        x2, c2 = torch.cat([x_in, x_in]).float(), torch.cat([c_noise.reshape(-1)] * 2).float()
        F_u, F_c = model.network(x2, c2, encoder_hidden_states=torch.cat([neg, emb])).double().chunk(2)
        return F_u + w * (F_c - F_u)

    x = edmrt.execute(edmrt.plan("euler", sig, model.precond), net, sig[0] * initial_noise(L, sched).double())
    assert rel(x, theirs) <= RTOL, rel(x, theirs)  # measured 8.5e-7


# ----------------------------------------------------------------------------- LCM and TCD (few-step, stochastic)

def _last_x0(sched, monkeypatch):
    """Record the inputs of the scheduler's last ``step`` (TCD's final state stops at timestep 0, not at x0)."""
    last, step = {}, sched.step

    @functools.wraps(step)  # the pipeline passes eta and generator only to a step() whose signature takes them
    def recording(model_output, timestep, sample, *args, **kw):
        last.update(eps=model_output, t=timestep, x=sample)
        return step(model_output, timestep, sample, *args, **kw)

    monkeypatch.setattr(sched, "step", recording)
    return last


@pytest.mark.parametrize("w", [7.5, 1.0])
@pytest.mark.parametrize("cls,solver,gamma", [("LCMScheduler", "lcm", None), ("TCDScheduler", "tcd", 0.3),
                                              ("TCDScheduler", "tcd", 0.0)])
def test_lcm_and_tcd_parity_with_the_same_noise(sd, monkeypatch, cls, solver, gamma, w):
    """LCM: ``LCMPrecond`` (the boundary-condition scalings in the model's D) with the ``lcm`` solver; its last
    step returns the denoised sample, as ours.  TCD (eta = gamma): the ``tcd`` solver on the plain epsilon
    parameterisation.  TCD's pipeline output stops at timestep 0 (sigma_0 = 0.029: sqrt(alpha_bar_0) (x0 +
    sigma_0 eps)) while ours goes to sigma = 0 (x0): we compare x0 of its last step, recomputed from that step's
    inputs with the scheduler's own rule x0 = (x_vp - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    unet, vae = sd
    sched = getattr(diffusers, cls)(**SD)
    calls = _philox_draws(monkeypatch, scheduling_lcm if cls == "LCMScheduler" else scheduling_tcd, (4, 8, 8))
    last = _last_x0(sched, monkeypatch)
    L, emb, neg = sd_inputs(32)
    out = sd_pipe(unet, vae, sched)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(),
                                     num_inference_steps=4, guidance_scale=w, output_type="latent", height=16,
                                     width=16, eta=gamma or 0.0).images
    assert len(calls) == (3 if gamma != 0.0 else 0)  # one draw per step but the last (none for gamma = 0)
    if cls == "TCDScheduler":
        a = sched.alphas_cumprod[last["t"]]
        out = (last["x"] - (1 - a).sqrt() * last["eps"]) / a.sqrt()
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    options = {} if gamma is None else dict(gamma=gamma)
    ours = scheduler_sampler(model, sched, solver, **options).sample(
        SEEDS, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg} if w != 1.0 else None,
        guidance=_guided(w), noise=initial_noise(L, sched), output="latent")
    # Measured (w = 7.5 / w = 1): LCM 2.1e-6 / 3.5e-7, TCD gamma 0.3 1.8e-6 / 3.2e-7, gamma 0 1.5e-6 / 3.0e-7.
    assert rel(ours, out) <= RTOL, rel(ours, out)


def test_lcm_with_guidance_embedding_parity(monkeypatch):
    """An LCM-distilled UNet (``time_cond_proj_dim``): no CFG in the pipeline; the guidance scale enters as
    ``timestep_cond`` = the embedding of w - 1 (``guidance_embedding``), an input whose unconditional row repeats
    the conditional one (null="cond")."""
    unet, vae = tiny_unet(time_cond_proj_dim=32), tiny_vae()
    sched, w = diffusers.LCMScheduler(**SD), 7.5
    _philox_draws(monkeypatch, scheduling_lcm, (4, 8, 8))
    L, emb, _ = sd_inputs(32)
    theirs = sd_pipe(unet, vae, sched)(prompt_embeds=emb, latents=L.clone(), num_inference_steps=4,
                                        guidance_scale=w, output_type="latent", height=16, width=16).images
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    assert [(c.name, c.shape, c.null) for c in model.cond][1] == ("timestep_cond", (32,), "cond")
    cond = {"encoder_hidden_states": emb, "timestep_cond": guidance_embedding(w - 1.0, 32)[0]}
    ours = scheduler_sampler(model, sched, "lcm").sample(SEEDS, cond=cond, noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 2.6e-7


def test_guidance_embedding_matches_diffusers():
    w = torch.tensor([0.0, 1.5, 6.5, 11.0])
    for dim in (32, 33, 256):
        theirs = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), theirs)
    assert torch.equal(guidance_embedding(6.5, 32)[0], guidance_embedding([6.5], 32)[0])
    for bad, match in [(dict(w=1.0, dim=2), "dim"), (dict(w=float("nan"), dim=32), "w must be finite")]:
        with pytest.raises(ValueError, match=match):
            guidance_embedding(**bad)


# ----------------------------------------------------------------------------- SDXL, Playground v2.5 (EDM), IP-Adapter

def _sdxl_case(sdxl, sched, w=5.0):
    """SDXL pipeline latents and edmrt's, with pooled text_embeds (uncond: the negative pooled embedding) and
    time_ids (original size, crop corner, target size: (16, 16, 0, 0, 16, 16); unconditional row = the same)."""
    unet, vae = sdxl
    L, emb, neg = sd_inputs(64)
    g = torch.Generator().manual_seed(2)
    pooled, npooled = torch.randn(B, 32, generator=g), torch.randn(B, 32, generator=g)
    theirs = _sdxl_pipe(unet, vae, sched)(
        prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=npooled, latents=L.clone(), num_inference_steps=6, guidance_scale=w,
        output_type="latent", height=16, width=16).images
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 64)})
    assert [(c.name, c.shape, c.null) for c in model.cond] == [
        ("encoder_hidden_states", (TOKENS, 64), None), ("text_embeds", (32,), None), ("time_ids", (6,), "cond")]
    cond = {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": torch.tensor([16.0, 16, 0, 0, 16, 16])}
    uncond = {"encoder_hidden_states": neg, "text_embeds": npooled}
    return model, theirs, dict(cond=cond, uncond=uncond, guidance=w, noise=initial_noise(L, sched))


def test_sdxl_pipeline_euler_parity(sdxl):
    sched = diffusers.EulerDiscreteScheduler(**SD_LEADING)
    model, theirs, args = _sdxl_case(sdxl, sched)
    ours = scheduler_sampler(model, sched, "euler").sample(SEEDS, output="latent", **args)
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 6.8e-7


@pytest.mark.parametrize("cls,solver,extra", [
    ("EDMDPMSolverMultistepScheduler", "dpmpp_2m", {}),
    ("EDMEulerScheduler", "euler", {}),
    ("EDMEulerScheduler", "euler", dict(prediction_type="v_prediction", sigma_schedule="exponential"))])
def test_playground_style_edm_pipeline_parity(sdxl, cls, solver, extra):
    """Playground v2.5: SDXL's UNet trained in EDM's parameterisation, sampled with diffusers' EDM schedulers
    (c_in x, c_noise = ln(sigma) / 4 as the timestep, D = c_skip x + c_out F, c_out negated for v), and a VAE
    with latents_mean / latents_std.  The EDM schedulers' state is EDM's x, starting at
    L * sqrt(sigma_max^2 + 1); their sigmas are float32 (DPM: its Karras ramp in float32)."""
    sched = getattr(diffusers, cls)(**EDM, **extra)
    model, theirs, args = _sdxl_case(sdxl, sched)
    assert model.precond == edmrt.EDMPrecond(0.5, prediction=extra.get("prediction_type", "epsilon"))
    ours = scheduler_sampler(model, sched, solver).sample(SEEDS, output="latent", **args)
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 2.3e-6 (DPM), 1.7e-6 (Euler), 1.5e-6 (v)


def _ip_adapter_unet():
    """A tiny UNet with one plain IP-Adapter (ImageProjection, 4 image tokens) and its decoupled cross-attention
    (what ``load_ip_adapter`` installs), random weights."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = tiny_unet()
    torch.manual_seed(3)
    procs = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[:-len(".processor")])
        procs[name] = IPAdapterAttnProcessor2_0(attn.to_q.out_features, 32, num_tokens=(4,), scale=1.0) \
            if name.endswith("attn2.processor") else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(16, 32, 4)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return unet.eval()


def test_ip_adapter_image_embeds_parity(sd):
    """``image_embeds`` (one image embedding for all samples) goes to ``added_cond_kwargs`` as a one-adapter list;
    its unconditional row is zeros, as the pipelines' ``prepare_ip_adapter_image_embeds`` makes it."""
    unet, vae = _ip_adapter_unet(), sd[1]
    sched, w = diffusers.EulerDiscreteScheduler(**SD_LEADING), 7.5
    L, emb, neg = sd_inputs(32)
    image = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(4))
    theirs = sd_pipe(unet, vae, sched)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(),
                                        num_inference_steps=5, guidance_scale=w, output_type="latent", height=16,
                                        width=16, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(image), image])]
                                        ).images
    model = from_diffusers(unet, sched, vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    assert model.cond[1] == edmrt.CondInput("image_embeds", (1, 16), null=0.0)
    ours = scheduler_sampler(model, sched, "euler").sample(
        SEEDS, cond={"encoder_hidden_states": emb, "image_embeds": image[0]}, uncond={"encoder_hidden_states": neg},
        guidance=w, noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 9.3e-7


# ----------------------------------------------------------------------------- DiT, UNet2DModel

def test_dit_pipeline_dpm_parity(monkeypatch):
    """DiT (class labels, learned sigma: 8 output channels of which the first 4 are epsilon) with DPM-Solver++(2M).
    DiTPipeline draws its latents from the generator (no ``latents=``), runs a doubled batch [cond; null label
    1000] and decodes at once: its latents are recorded at ``vae.decode`` (times scaling_factor)."""
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                         num_attention_heads=2, in_channels=4, out_channels=8,
                                         num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                                         norm_elementwise_affine=False).eval()
    vae = tiny_vae()
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    seen, decode = [], vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k))
    labels, w = [3, 7], 4.0
    images = pipe(class_labels=labels, guidance_scale=w, generator=torch.Generator().manual_seed(5),
                  num_inference_steps=6, output_type="pt").images
    theirs = seen[0] * vae.config.scaling_factor
    L = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # the pipeline's draw
    model = from_diffusers(tr, sched, vae)
    assert model.num_classes == 1000 and model.cond[0].null == 1000
    ours = scheduler_sampler(model, sched, "dpmpp_2m").sample(SEEDS, cond=labels, guidance=w, noise=initial_noise(L, sched),
                                                     output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 4.9e-7
    assert (model.decoder(ours) / 2 + 0.5 - images).abs().max().item() <= 1e-5


def test_unet2d_ddim_pipeline_parity(monkeypatch):
    """An unconditional ``UNet2DModel`` with DDIM (eta = 0, no x0 clipping), which is Euler on the VE
    probability-flow ODE: x + (sigma_prev - sigma)(x - x0) / sigma = x0 + sigma_prev eps.  DDIM's last step goes to
    alpha_bar = 1 (set_alpha_to_one), i.e. sigma = 0.  Its final state is recorded at the last ``step``."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=3,
                                 out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    sched = pipe.scheduler  # DDIMPipeline makes its own DDIMScheduler from the config
    outs, step = [], sched.step
    monkeypatch.setattr(sched, "step", functools.wraps(step)(lambda *a, **k: outs.append(step(*a, **k)) or outs[-1]))
    pipe(batch_size=B, generator=torch.Generator().manual_seed(6), num_inference_steps=5, output_type="np")
    theirs = outs[-1].prev_sample
    L = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model = from_diffusers(unet, sched)
    assert model.cond == () and model.precond.timestep == "nearest" and model.sample_shape == (3, 8, 8)
    ours = scheduler_sampler(model, sched, "euler").sample(SEEDS, noise=initial_noise(L, sched))
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 3.9e-7


def test_class_labelled_unet2d_and_dit_networks():
    """The wrappers call the diffusers model as its pipelines do; a UNet2DModel's class embedding has no null row,
    so its labels have no null value (CFG takes the caller's ``uncond``)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=3,
                                 out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 num_class_embeds=5).eval()
    model = from_diffusers(unet, {"_class_name": "DDPMScheduler"})
    assert model.cond == (edmrt.CondInput("class_labels", (), torch.int64, null=None, num_classes=5),)
    x, t, y = torch.randn(B, 3, 8, 8), torch.tensor([981.0, 12.0]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(model.network(x, t.view(B, 1, 1, 1), class_labels=y), unet(x, t, class_labels=y).sample)
    assert model.sigma_max == pytest.approx(157.4, rel=1e-3) and model.sigma_min == pytest.approx(0.01, rel=1e-3)


# ----------------------------------------------------------------------------- VAE, folders, errors

@pytest.mark.parametrize("kind", ["sd", "playground"])
def test_vae_decoder_matches_the_pipelines_images(sd, sdxl, kind):
    """``VAEDecoder``: latents / scaling_factor (SD), latents * std / scaling_factor + mean (SDXL pipeline with a
    Playground VAE); pipeline images are (x / 2 + 0.5).clamp(0, 1) of the same decode."""
    L, emb, neg = sd_inputs(32 if kind == "sd" else 64)
    g = torch.Generator().manual_seed(2)
    if kind == "sd":
        unet, vae = sd
        pipe, extra = sd_pipe(unet, vae, diffusers.EulerDiscreteScheduler(**SD_LEADING)), {}
    else:
        unet, vae = sdxl
        pipe = _sdxl_pipe(unet, vae, diffusers.EDMEulerScheduler(**EDM))
        pooled = torch.randn(2, B, 32, generator=g)
        extra = dict(pooled_prompt_embeds=pooled[0], negative_pooled_prompt_embeds=pooled[1])

    def run(output_type):
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(), num_inference_steps=3,
                    guidance_scale=3.0, output_type=output_type, height=16, width=16, **extra).images

    latents, images = run("latent"), run("pt")
    ours = VAEDecoder(vae, batch=1)(latents)
    assert ours.shape == (B, 3, 16, 16) and float(ours.abs().max()) <= 1.0
    assert (ours / 2 + 0.5 - images).abs().max().item() <= 1e-6
    model = from_diffusers(unet, pipe.scheduler, vae, cond_shapes={"encoder_hidden_states": (TOKENS, emb.shape[-1])})
    uint8 = edmrt.Sampler(model, solver="euler", steps=2, backend="torch", device="cpu").decode(latents)
    assert uint8.dtype == torch.uint8 and (uint8.float() - images * 255).abs().max().item() <= 0.51


def test_load_diffusers_folder_samples_the_same_latents(sd, tmp_path):
    """``pipe.save_pretrained`` writes safetensors; ``edmrt.load(folder)`` reads them back (local files only) and
    samples bit for bit what the in-memory model samples."""
    unet, vae = sd
    sched = diffusers.DPMSolverMultistepScheduler(**SD)
    sd_pipe(unet, vae, sched).save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = edmrt.load(tmp_path)
    assert loaded.metadata["diffusers"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert loaded.metadata["sampling"] == {"solver": "dpmpp_2m", "steps": 25}
    assert loaded.cond[0].shape == (77, 32) and loaded.decoder is not None  # no text encoder saved: 77 tokens
    L, emb, neg = sd_inputs(32, tokens=77)
    args = dict(cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg}, guidance=7.5,
                noise=L, output="latent")
    sched.set_timesteps(4)
    x_mem = scheduler_sampler(from_diffusers(unet, sched, vae), sched, "dpmpp_2m").sample(SEEDS, **args)
    x_disk = scheduler_sampler(loaded, sched, "dpmpp_2m").sample(SEEDS, **args)
    assert torch.equal(x_mem, x_disk)
    short = load_diffusers(str(tmp_path), cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    assert short.cond[0].shape == (TOKENS, 32)


def test_load_diffusers_refuses_what_it_cannot_read(sd, tmp_path):
    with pytest.raises(ValueError, match="local diffusers folders only.*no network"):
        load_diffusers("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(ValueError, match="not an existing folder"):
        load_diffusers(tmp_path / "missing")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="single-file"):
        load_diffusers(tmp_path / "file.safetensors")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_diffusers(tmp_path)
    with pytest.raises(ValueError, match="local diffusers folders only"):  # edmrt.load: a Hub id is not fetched
        edmrt.load("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(ValueError, match="unknown model"):  # neither bundled nor a path
        edmrt.load("sdxl")
    unet, vae = sd
    bins = tmp_path / "bins"
    sd_pipe(unet, vae, diffusers.EulerDiscreteScheduler(**SD)).save_pretrained(bins, safe_serialization=False)
    with pytest.raises(ValueError, match="only pickled PyTorch weights.*safetensors only"):
        load_diffusers(bins)
    index = json.loads((bins / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (bins / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="UNet3DConditionModel"):
        load_diffusers(bins)


@pytest.mark.parametrize("call,match", [
    (lambda u: from_diffusers(u, {"_class_name": "FlowMatchHeunDiscreteScheduler"}),
     "FlowMatchHeunDiscreteScheduler"),
    (lambda u: from_diffusers(u, dict(diffusers.EulerDiscreteScheduler().config)), "_class_name"),
    (lambda u: from_diffusers(u, {"_class_name": "DDPMScheduler", "prediction_type": "flow_prediction"}),
     "prediction_type 'flow_prediction'"),
    (lambda u: from_diffusers(u, {"_class_name": "EDMDPMSolverMultistepScheduler", "prediction_type": "sample"}),
     "prediction_type 'sample'"),
    (lambda u: from_diffusers(u, "EulerDiscreteScheduler"), "scheduler_config must be"),
    (lambda u: from_diffusers(u, None, steps=4), "unknown keyword"),
    (lambda u: from_diffusers(u, None, cond_shapes={"text_embeds": (4,)}), "not inputs of this network"),
    (lambda u: from_diffusers(torch.nn.Linear(2, 2)), "UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, StableCascadeUNet, got Linear"),
    (lambda u: from_diffusers(u, None, timestep="round"), "timestep"),
    (lambda u: VAEDecoder(u), "vae must be a diffusers autoencoder"),
])
def test_bad_inputs_raise_naming_them(sd, call, match):
    with pytest.raises(ValueError, match=match):
        call(sd[0])


def test_import_edmrt_does_not_import_diffusers():
    code = "import sys, edmrt; assert edmrt.from_diffusers and 'diffusers' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- preconditioning

def test_sigma_to_t_interpolate_and_nearest():
    """``timestep="interpolate"`` is diffusers' ``_sigma_to_t`` (k-diffusion's ``sigma_to_t``: linear in ln sigma
    between the two neighbouring levels); ``"nearest"`` is its rounding, which DPM-Solver gives the network."""
    sched = diffusers.EulerDiscreteScheduler(**SD)
    acp = sched.alphas_cumprod.double().numpy()
    levels = np.sqrt((1 - acp) / acp)
    rng = np.random.default_rng(0)
    sig = np.concatenate([np.exp(rng.uniform(np.log(levels[0]), np.log(levels[-1]), 300)), levels[[0, 1, 500, 999]]])
    theirs = sched._sigma_to_t(sig, np.log(levels))
    interp = edmrt.EpsilonPrecond(alphas_cumprod=acp).coefficients(sig)[3]
    np.testing.assert_allclose(interp, theirs, rtol=0, atol=1e-9)
    nearest = edmrt.EpsilonPrecond(alphas_cumprod=acp, timestep="nearest").coefficients(sig)[3]
    np.testing.assert_array_equal(nearest, np.round(theirs))
    assert np.any(nearest != interp)
    # As the schedulers use them: Karras sigmas (float32) with Euler's float timesteps (its table is float32: t
    # differs by up to 1.5e-5, measured) and DPM-Solver's rounded ones (equal).
    for cls, mode, atol in [("EulerDiscreteScheduler", "interpolate", 1e-4),
                            ("DPMSolverMultistepScheduler", "nearest", 0)]:
        s = getattr(diffusers, cls)(**SD, use_karras_sigmas=True)
        s.set_timesteps(12)
        pre = precond_from_scheduler(s)[0]
        assert pre.timestep == mode
        t = pre.coefficients(scheduler_sigmas(s)[:-1])[3]
        np.testing.assert_allclose(t, s.timesteps.double().numpy(), rtol=0, atol=atol)
    # float32 rounding of the table's ends is accepted (diffusers' sigma_max = 14.614643 > 14.6146413 in float64).
    assert pre.coefficients([np.float32(levels[-1]) * (1 + 3e-7)])[3][0] == 999.0
    with pytest.raises(ValueError, match="discrete levels"):
        pre.coefficients([levels[-1] * 1.001])


def test_edm_precond_prediction_and_noise_conventions():
    """diffusers' EDM schedulers: c_in, c_noise = ln(sigma) / 4 whatever the sigma_schedule, c_out negated for
    v_prediction; ``CosineDPMSolverMultistepScheduler``'s c_noise = atan(sigma) * 2 / pi."""
    sig = torch.tensor([0.002, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    x, F = torch.randn(2, 5, dtype=torch.float64)
    for pred in ("epsilon", "v_prediction"):
        for schedule in ("karras", "exponential"):
            s = diffusers.EDMEulerScheduler(**EDM, prediction_type=pred, sigma_schedule=schedule)
            pre = precond_from_scheduler(s)[0]
            c_skip, c_out, c_in, c_noise = (torch.from_numpy(c) for c in pre.coefficients(sig.numpy()))
            torch.testing.assert_close(c_skip * x + c_out * F, s.precondition_outputs(x, F, sig), rtol=1e-14, atol=0)
            torch.testing.assert_close(c_in * x, s.precondition_inputs(x, sig), rtol=1e-14, atol=0)
            torch.testing.assert_close(c_noise, s.precondition_noise(sig), rtol=1e-14, atol=0)
    cosine = diffusers.CosineDPMSolverMultistepScheduler()
    pre = precond_from_scheduler(cosine)[0]
    assert pre == edmrt.EDMPrecond(1.0, prediction="v_prediction", noise="atan")
    torch.testing.assert_close(torch.from_numpy(pre.coefficients(sig.numpy())[3]), cosine.precondition_noise(sig),
                               rtol=1e-14, atol=0)
    # Defaults are left out of the plan JSON (old plans and cards read the same); the others round trip.
    from edmrt.precond import precond_from_dict
    assert edmrt.EDMPrecond().to_dict() == {"name": "edm", "sigma_data": 0.5}
    assert precond_from_dict(pre.to_dict()) == pre
    for bad, match in [(dict(prediction="sample"), "prediction"), (dict(noise="linear"), "noise")]:
        with pytest.raises(ValueError, match=match):
            edmrt.EDMPrecond(**bad)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_lcm_precond_is_the_lcm_schedulers_denoised(prediction):
    """D = c_skip x + c_out F of ``LCMPrecond`` equals ``LCMScheduler.step``'s ``denoised`` (boundary condition on
    the x0 of the network's prediction type) for x_vp = c_in x, at every timestep of a schedule."""
    sched = diffusers.LCMScheduler(**SD, prediction_type=prediction)
    sched.set_timesteps(6)
    pre = precond_from_scheduler(sched)[0]
    assert isinstance(pre, edmrt.LCMPrecond) and pre.prediction == prediction and pre.timestep == "nearest"
    sig = scheduler_sigmas(sched)[:-1]
    c_skip, c_out, c_in, c_noise = pre.coefficients(sig)
    np.testing.assert_array_equal(c_noise, sched.timesteps.numpy())
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x, F = torch.randn(2, 4, 8, 8, generator=g) * (1 + sig[i]), torch.randn(2, 4, 8, 8, generator=g)
        theirs = sched.step(F, t, (c_in[i] * x).float(), generator=g).denoised
        ours = c_skip[i] * x.double() + c_out[i] * F.double()
        assert (ours - theirs.double()).abs().max().item() <= 1e-5 * (1 + ours.abs().max().item())
    from edmrt.precond import precond_from_dict
    back = precond_from_dict(pre.to_dict())
    np.testing.assert_array_equal(back.coefficients(sig)[0], c_skip)
    with pytest.raises(ValueError, match="alphas_cumprod is required"):
        edmrt.LCMPrecond()


# ----------------------------------------------------------------------------- text length

def test_a_long_prompt_samples_without_cond_shapes(sd):
    """A model built with no cond_shapes (77 tokens by default) samples 154-token embeddings (a long prompt in two
    CLIP chunks) as the pipeline does, on the same Sampler as 77-token ones; the rows of guidance must agree."""
    unet, vae = sd
    sched = diffusers.DPMSolverMultistepScheduler(**SD)
    model = from_diffusers(unet, scheduler=sched)
    assert model.cond[0].shape == (77, 32) and model.cond[0].free == (0,)
    sampler = scheduler_sampler(model, (sched.set_timesteps(6), sched)[1], "dpmpp_2m")
    for tokens in (154, 77, 154):
        L, emb, neg = sd_inputs(32, seed=tokens, tokens=tokens)
        theirs = sd_pipe(unet, vae, sched)(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(),
                                            num_inference_steps=6, guidance_scale=5.0, output_type="latent",
                                            height=16, width=16).images
        ours = sampler.sample(SEEDS, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg},
                              guidance=5.0, noise=initial_noise(L, sched), output="latent")
        assert rel(ours, theirs) <= RTOL, (tokens, rel(ours, theirs))   # measured 9.2e-7 (154), 6.1e-7 (77)
    _, emb, neg = sd_inputs(32, tokens=154)
    with pytest.raises(ValueError, match=r"share one buffer; give both the same length"):
        sampler.sample(SEEDS, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg[:, :77]},
                       guidance=5.0)
    with pytest.raises(ValueError, match=r"must be finite real numbers of shape \(2, 77, 32\)"):   # the width is not free
        sampler.sample(SEEDS, cond={"encoder_hidden_states": torch.randn(2, 77, 16)})
    with pytest.raises(ValueError, match="pass the scheduler once"):
        from_diffusers(unet, sched, scheduler=sched)


def test_a_backend_built_for_one_length_names_cond_shapes_for_another(sd):
    pytest.importorskip("onnxruntime")
    unet, _ = sd
    model = from_diffusers(unet, diffusers.DPMSolverMultistepScheduler(**SD), cond_shapes={"encoder_hidden_states":
                                                                                          (TOKENS, 32)})
    sampler = edmrt.Sampler(model, solver="dpmpp_2m", steps=2, backend="onnxruntime", device="cpu")
    _, emb, _ = sd_inputs(32, tokens=TOKENS + 3)
    with pytest.raises(ValueError, match=r"backend 'onnxruntime' was built for \{'encoder_hidden_states': \(7, 32\)\}: "
                                         r"build the model with cond_shapes=\{'encoder_hidden_states': \(10, 32\)\}"):
        sampler.sample(SEEDS, cond={"encoder_hidden_states": emb})
