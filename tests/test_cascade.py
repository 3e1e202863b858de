"""Stable Cascade (``StableCascadeUNet`` prior and decoder, ``DDPMWuerstchenScheduler``, the ``PaellaVQModel`` VQGAN).

- ``WuerstchenPrecond``: epsilon prediction at the cosine schedule's continuous time; its D is x_0 and its c_noise
  inverts the schedule (float64, fresh random cases, both ``scaler`` branches and the clamp's ends).
- The ``cosine`` schedule is ``set_timesteps`` + ``_alpha_cumprod`` (diffusers computes in float32).
- ``StableCascadePriorPipeline`` and ``StableCascadeDecoderPipeline`` on tiny random UNets built here (given prompt
  embeddings, with and without guidance, with an image embedding): edmrt's Sampler with ``sampler_args(scheduler)``
  and ``initial_noise(latents, scheduler)``, the pipelines' per-step noise being edmrt's Philox draws (monkeypatched
  ``randn_tensor``), gives the pipelines' latents; ``edmrt.cascade`` gives both pipelines run in sequence, latents
  and images.  The one difference in method: diffusers' last step draws noise and multiplies it by 0, ours draws none.
"""
import functools

import pytest
import torch

import edmrt
from edmrt.precond import WuerstchenPrecond
from edmrt.schedules import COSINE_CLAMP, cosine_sigma, cosine_time, make_sigmas

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (the 'test' extra) is not installed")
from diffusers.schedulers import scheduling_ddpm_wuerstchen  # noqa: E402

from edmrt.adapters.diffusers import from_diffusers, initial_noise, sampler_args  # noqa: E402
from edmrt.pipelines.cascade import decoder_seeds  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

RTOL = 1e-5
SEEDS = [5, 9]
TOKENS, DIM, IMG_DIM = 7, 16, 24
C_PRIOR, C_DEC = 8, 4
SIZE = 256          # pixels: the prior's latents ceil(256 / 42.67) = 6, the decoder's 6 * 4 = 24, the images 96
LATENT_SCALE = 4.0  # the decoder pipeline's latent_dim_scale (10.67 in the released model)


def rel(x, ref) -> float:
    return (x.float() - ref.float()).abs().max().item() / ref.abs().max().item()


@functools.lru_cache(maxsize=None)
def parts():
    """(prior, decoder, vqgan, text_encoder): diffusers' test-sized Stable Cascade stages, random weights."""
    torch.manual_seed(0)
    prior = diffusers.StableCascadeUNet(
        in_channels=C_PRIOR, out_channels=C_PRIOR, conditioning_dim=32, block_out_channels=(32, 32),
        num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
        switch_level=(False,), clip_image_in_channels=IMG_DIM, clip_text_in_channels=DIM,
        clip_text_pooled_in_channels=DIM, dropout=(0.0, 0.0), timestep_ratio_embedding_dim=16, clip_seq=2).eval()
    blocks = [["SDCascadeResBlock", "SDCascadeTimestepBlock"]] * 2 + \
        [["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2
    decoder = diffusers.StableCascadeUNet(
        in_channels=C_DEC, out_channels=C_DEC, conditioning_dim=32, block_out_channels=[8, 16, 32, 32],
        num_attention_heads=[-1, -1, 1, 2], down_num_layers_per_block=[1] * 4, up_num_layers_per_block=[1] * 4,
        down_blocks_repeat_mappers=[1] * 4, up_blocks_repeat_mappers=[3, 3, 2, 2], block_types_per_layer=blocks,
        switch_level=None, clip_text_pooled_in_channels=DIM, dropout=[0.0] * 4, effnet_in_channels=C_PRIOR,
        pixel_mapper_in_channels=3, timestep_ratio_embedding_dim=16, clip_seq=2).eval()
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    vqgan = PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2, latent_channels=C_DEC, embed_dim=8,
                          levels=2).eval()
    text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=DIM, projection_dim=DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=100, max_position_embeddings=77)).eval()
    return prior, decoder, vqgan, text


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(len(SEEDS), *s, generator=g)  # noqa: E731
    return dict(clip_text=r(TOKENS, DIM), clip_text_pooled=r(1, DIM)), dict(clip_text=r(TOKENS, DIM),
                                                                           clip_text_pooled=r(1, DIM))


def pipe_kw(cond, uncond, w):
    """The pipelines' embedding arguments; the negative ones only with guidance (without, the prior pipeline would
    stack them beside the prompt's anyway)."""
    kw = dict(prompt_embeds=cond["clip_text"], prompt_embeds_pooled=cond["clip_text_pooled"], guidance_scale=w)
    if w > 1.0:
        kw.update(negative_prompt_embeds=uncond["clip_text"], negative_prompt_embeds_pooled=uncond["clip_text_pooled"])
    return kw


def _philox(monkeypatch, seeds, shape):
    """The scheduler's ``randn_tensor`` returns edmrt's Philox noise for ``seeds``: draw k is stream k + 1 (its last
    draw, which the step multiplies by 0, too)."""
    src, calls = edmrt.SeededNoise(seeds, shape, torch.float32), []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(shape)
        return src(len(calls)).to(dtype)

    monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor", randn_tensor)
    return calls


def _guided(w):
    """The pipelines' guidance_scale as edmrt's guidance: CFG only above 1 (their do_classifier_free_guidance)."""
    return w if w > 1.0 else None


def prior_model(**kw):
    prior, _, _, _ = parts()
    return from_diffusers(prior, diffusers.DDPMWuerstchenScheduler(), sample_shape=(C_PRIOR, 6, 6), **kw)


def decoder_model():
    _, decoder, vqgan, _ = parts()
    return from_diffusers(decoder, diffusers.DDPMWuerstchenScheduler(), vqgan, sample_shape=(C_DEC, 24, 24),
                          cond_shapes={"effnet": (C_PRIOR, 6, 6)})


def prior_pipe():
    prior, _, _, text = parts()
    return diffusers.StableCascadePriorPipeline(tokenizer=None, text_encoder=text, prior=prior,
                                                scheduler=diffusers.DDPMWuerstchenScheduler())


def decoder_pipe():
    _, decoder, vqgan, text = parts()
    return diffusers.StableCascadeDecoderPipeline(decoder=decoder, tokenizer=None, text_encoder=text,
                                                  scheduler=diffusers.DDPMWuerstchenScheduler(), vqgan=vqgan,
                                                  latent_dim_scale=LATENT_SCALE)


def _sampler(model, steps, **options):
    sched = diffusers.DDPMWuerstchenScheduler()
    sched.set_timesteps(steps)
    args = {**sampler_args(sched), **options}
    return edmrt.Sampler(model, backend="torch", device="cpu", **args), sched


def _vp(sampler):   # edmrt's final state at sigma_N as the pipelines' variance-preserving latents
    end = float(sampler.plan.sigmas[-1])
    return 1.0 / (1.0 + end * end) ** 0.5


# ----------------------------------------------------------------------------- the parameterisation

@pytest.mark.parametrize("scaler", [1.0, 0.7, 1.6])
def test_wuerstchen_precond_is_the_schedulers_parameterisation(scaler):
    g = torch.Generator().manual_seed(int(scaler * 10))
    t = torch.rand(9, generator=g, dtype=torch.float64) * 0.98 + 0.01
    sched = diffusers.DDPMWuerstchenScheduler(scaler=scaler)
    a = sched._alpha_cumprod(t.float(), "cpu").double()     # diffusers' alpha_bar(t), float32
    sigma = cosine_sigma(t.numpy(), scaler=scaler)
    torch.testing.assert_close(torch.from_numpy(1.0 / (1.0 + sigma ** 2)), a, rtol=2e-6, atol=2e-7)
    pre = WuerstchenPrecond(scaler=scaler)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    torch.testing.assert_close(torch.from_numpy(c_noise), t, rtol=1e-12, atol=1e-12)   # the inverse of sigma(t)
    x0, eps = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    x = x0 + torch.from_numpy(sigma)[:, None] * eps
    x_vp = a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * eps
    torch.testing.assert_close(torch.from_numpy(c_in)[:, None] * x, x_vp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(c_skip)[:, None] * x + torch.from_numpy(c_out)[:, None] * eps, x0)
    # The clamp's ends: t = 1 at the top (the pipelines' first timestep), 0 at the bottom.
    lo, hi = cosine_sigma([0.0, 1.0], scaler=scaler)
    assert (1 / (1 + hi ** 2), 1 / (1 + lo ** 2)) == pytest.approx(COSINE_CLAMP, rel=1e-12)
    assert cosine_time([hi, lo], scaler=scaler).tolist() == [1.0, 0.0]
    assert edmrt.plan("euler_ancestral", [hi, 1.0, lo], pre).precond == pre.to_dict()
    with pytest.raises(ValueError, match="scaler must be a finite number > 0"):
        WuerstchenPrecond(scaler=0.0)
    with pytest.raises(ValueError, match=r"cosine time t must lie in \[0, 1\]"):
        cosine_sigma(1.5)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_cosine_schedule_is_set_timesteps(steps):
    sched = diffusers.DDPMWuerstchenScheduler()
    sched.set_timesteps(steps)
    a = sched._alpha_cumprod(sched.timesteps, "cpu").double()
    model = prior_model()
    ours = edmrt.Sampler(model, backend="torch").plan.sigmas if steps == 20 else make_sigmas(
        "cosine", steps, model.sigma_min, model.sigma_max)
    torch.testing.assert_close(torch.from_numpy(1.0 / (1.0 + ours ** 2)), a, rtol=2e-6, atol=2e-7)
    assert ours.size == steps + 1 and ours[-1] == pytest.approx(0.0100005, rel=1e-6)   # stops at t = 0


# ----------------------------------------------------------------------------- parity with the pipelines

@pytest.mark.parametrize("w,steps,image", [(4.0, 5, False), (1.0, 3, False), (4.0, 4, True), (2.0, 1, False)])
def test_prior_pipeline_parity(monkeypatch, w, steps, image):
    """``StableCascadePriorPipeline`` = the prior with ``euler_ancestral`` on its cosine schedule.  With an image
    prompt (``image_embeds``) its clip_img rows are the embedding, the unconditional ones zeros (edmrt's null)."""
    cond, uncond = prompts()
    calls = _philox(monkeypatch, SEEDS, (C_PRIOR, 6, 6))
    L = torch.randn(len(SEEDS), C_PRIOR, 6, 6, generator=torch.Generator().manual_seed(3))
    img = torch.randn(1, 1, IMG_DIM, generator=torch.Generator().manual_seed(4)) if image else None
    theirs = prior_pipe()(**pipe_kw(cond, uncond, w), latents=L.clone(), height=SIZE, width=SIZE,
                          num_inference_steps=steps, image_embeds=img, output_type="pt").image_embeddings
    assert len(calls) == steps
    model = prior_model()
    sampler, sched = _sampler(model, steps)
    if image:
        cond = dict(cond, clip_img=img[0].expand(len(SEEDS), 1, IMG_DIM))
    g = _guided(w)
    ours = sampler.sample(SEEDS, cond=cond, uncond=uncond if g else None, guidance=g,
                          noise=initial_noise(L, sched), output="latent") * _vp(sampler)
    # Measured 1.7e-7 .. 6.4e-7.
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)
    other, _ = _sampler(model, steps, solver="euler")
    far = other.sample(SEEDS, cond=cond, uncond=uncond if g else None, guidance=g, noise=initial_noise(L, sched),
                       output="latent")
    assert steps == 1 or rel(far, theirs) > 100 * RTOL   # the check can fail (one step is the same mean)


@pytest.mark.parametrize("w,steps", [(0.0, 4), (2.5, 6)])
def test_decoder_pipeline_parity(monkeypatch, w, steps):
    """``StableCascadeDecoderPipeline`` (guidance off at its default 0: one conditional pass) = the decoder with
    the prior's embedding as ``effnet`` (zeros in the unconditional rows)."""
    cond, uncond = prompts(2)
    emb = torch.randn(len(SEEDS), C_PRIOR, 6, 6, generator=torch.Generator().manual_seed(5))
    dseeds = decoder_seeds(SEEDS)
    _philox(monkeypatch, dseeds, (C_DEC, 24, 24))
    L = torch.randn(len(SEEDS), C_DEC, 24, 24, generator=torch.Generator().manual_seed(6))
    theirs = decoder_pipe()(image_embeddings=emb, latents=L.clone(), num_inference_steps=steps, output_type="latent",
                            **pipe_kw(cond, uncond, w)).images
    sampler, sched = _sampler(decoder_model(), steps)
    g = _guided(w)
    ours = sampler.sample(dseeds, cond={"clip_text_pooled": cond["clip_text_pooled"], "effnet": emb},
                          uncond={"clip_text_pooled": uncond["clip_text_pooled"]} if g else None, guidance=g,
                          noise=initial_noise(L, sched), output="latent") * _vp(sampler)
    # Measured 4.2e-7 / 4.7e-7.
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)


def test_cascade_is_both_pipelines_in_sequence(monkeypatch):
    """``edmrt.cascade``: prior -> image embeddings -> decoder -> VQGAN, against the two pipelines chained as
    diffusers' combined pipeline chains them (the prior's image_embeddings into the decoder)."""
    cond, uncond = prompts(3)
    Lp = torch.randn(len(SEEDS), C_PRIOR, 6, 6, generator=torch.Generator().manual_seed(7))
    Ld = torch.randn(len(SEEDS), C_DEC, 24, 24, generator=torch.Generator().manual_seed(8))
    _philox(monkeypatch, SEEDS, (C_PRIOR, 6, 6))
    emb = prior_pipe()(**pipe_kw(cond, uncond, 4.0), latents=Lp.clone(), height=SIZE, width=SIZE,
                       num_inference_steps=6, output_type="pt").image_embeddings
    _philox(monkeypatch, decoder_seeds(SEEDS), (C_DEC, 24, 24))
    kw = pipe_kw(cond, uncond, 2.0)
    images = decoder_pipe()(image_embeddings=emb, latents=Ld.clone(), num_inference_steps=5, output_type="pt",
                            **kw).images
    _philox(monkeypatch, decoder_seeds(SEEDS), (C_DEC, 24, 24))
    latents = decoder_pipe()(image_embeddings=emb, latents=Ld.clone(), num_inference_steps=5, output_type="latent",
                             **kw).images
    sched = diffusers.DDPMWuerstchenScheduler()
    sched.set_timesteps(6)
    sampler = edmrt.CascadeSampler(prior_model(), decoder_model(), prior_steps=6, decoder_steps=5, backend="torch",
                                   device="cpu")
    dec_sched = diffusers.DDPMWuerstchenScheduler()
    dec_sched.set_timesteps(5)
    kw = dict(cond=cond, uncond=uncond, guidance=4.0, decoder_guidance=2.0, noise=initial_noise(Lp, sched),
              decoder_noise=initial_noise(Ld, dec_sched))
    ours_emb = sampler.sample(SEEDS, output="embeddings", **kw)
    ours_latents = sampler.sample(SEEDS, output="latent", **kw)
    ours = sampler.sample(SEEDS, **kw)
    # Measured 7.3e-7 (embeddings), 5.8e-7 (latents); the images at most 1 level of 255 apart (rounding).
    assert rel(ours_emb, emb) <= RTOL and rel(ours_latents, latents) <= RTOL, (rel(ours_emb, emb),
                                                                                rel(ours_latents, latents))
    assert ours.dtype == torch.uint8 and ours.shape == (len(SEEDS), 3, 96, 96)
    assert (ours.float() - (images * 255).round()).abs().max().item() <= 1.0
    one_call = edmrt.cascade(prior_model(), decoder_model(), SEEDS, prior_steps=6, decoder_steps=5, backend="torch",
                             device="cpu", **kw)
    assert torch.equal(one_call, ours)


# ----------------------------------------------------------------------------- bad input

def test_the_cascade_refuses_what_it_cannot_run():
    prior, decoder, vqgan, _ = parts()
    with pytest.raises(ValueError, match="a StableCascadeUNet takes the continuous time of DDPMWuerstchenScheduler"):
        from_diffusers(prior, diffusers.DDPMScheduler())
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 layers_per_block=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="that scheduler only a StableCascadeUNet"):
        from_diffusers(unet, diffusers.DDPMWuerstchenScheduler())
    small = from_diffusers(decoder, diffusers.DDPMWuerstchenScheduler(), vqgan, cond_shapes={"effnet": (C_PRIOR, 3, 3)})
    with pytest.raises(ValueError, match=r"decoder: its effnet input is \(8, 3, 3\), the prior samples \(8, 6, 6\)"):
        edmrt.CascadeSampler(prior_model(), small, backend="torch")
    with pytest.raises(ValueError, match="prior must be an edmrt Model of Stable Cascade's prior"):
        edmrt.CascadeSampler(decoder_model(), decoder_model(), backend="torch")
    sampler = edmrt.CascadeSampler(prior_model(), decoder_model(), prior_steps=2, decoder_steps=2, backend="torch")
    cond, uncond = prompts()
    with pytest.raises(ValueError, match="output must be one of"):
        sampler.sample(SEEDS, cond, uncond, output="png")
    with pytest.raises(ValueError, match="decoder_guidance needs the negative prompt's clip_text_pooled"):
        sampler.sample(SEEDS, cond, None, guidance=None, decoder_guidance=2.0)
    sched = diffusers.DDPMWuerstchenScheduler()
    sched.set_timesteps(timesteps=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="timesteps must run down to 0"):
        sampler_args(sched)
    with pytest.raises(ValueError, match="eta must be"):
        edmrt.plan("euler_ancestral", [5.0, 1.0, 0.0], eta=-1.0)


# ----------------------------------------------------------------------------- local folders

def test_folders_load_as_the_stages(tmp_path):
    """A prior pipeline's and a decoder pipeline's folders (``save_pretrained``, safetensors), and the combined
    pipeline's, load as the same stages (``edmrt.load`` for one stage, ``load_cascade`` for both, shaped for the
    image size) and sample what the in-memory models sample."""
    from edmrt.adapters.diffusers import load_cascade
    prior_pipe().save_pretrained(tmp_path / "prior")
    decoder_pipe().save_pretrained(tmp_path / "decoder")
    prior, decoder, vqgan, text = parts()
    diffusers.StableCascadeCombinedPipeline(
        tokenizer=None, text_encoder=text, decoder=decoder, scheduler=diffusers.DDPMWuerstchenScheduler(),
        vqgan=vqgan, prior_prior=prior, prior_text_encoder=text, prior_tokenizer=None,
        prior_scheduler=diffusers.DDPMWuerstchenScheduler()).save_pretrained(tmp_path / "combined")
    one = edmrt.load(str(tmp_path / "prior"))
    assert one.sample_shape == (C_PRIOR, 24, 24) and one.metadata["sampling"]["steps"] == 20   # 1024 px
    cond, uncond = prompts()
    kw = dict(cond=cond, uncond=uncond, guidance=4.0, decoder_guidance=2.0, output="latent")
    want = edmrt.CascadeSampler(prior_model(), decoder_model(), prior_steps=3, decoder_steps=2,
                                backend="torch").sample(SEEDS, **kw)
    pair = load_cascade(tmp_path / "prior", tmp_path / "decoder", height=SIZE, width=SIZE)
    assert pair[1].sample_shape == (C_DEC, 24, 24) and pair[1].cond[1].shape == (C_PRIOR, 6, 6)
    got = edmrt.CascadeSampler(*pair, prior_steps=3, decoder_steps=2, backend="torch").sample(SEEDS, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    combined = load_cascade(tmp_path / "combined", height=SIZE, width=SIZE)   # its latent_dim_scale: 10.67
    assert combined[1].sample_shape == (C_DEC, 64, 64) and combined[1].cond[1].shape == (C_PRIOR, 6, 6)
    emb = edmrt.CascadeSampler(*combined, prior_steps=3, decoder_steps=2, backend="torch").sample(
        SEEDS, **dict(kw, output="embeddings"))
    torch.testing.assert_close(emb, edmrt.CascadeSampler(prior_model(), decoder_model(), prior_steps=3,
                                                         backend="torch").sample(SEEDS, **dict(kw, output="embeddings")))
    with pytest.raises(ValueError, match="is not a combined Stable Cascade folder"):
        load_cascade(tmp_path / "prior")
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        load_cascade(tmp_path / "combined", height=0)


def test_the_decoder_runs_on_onnx_runtime():
    """The decoder exported to ONNX (verified against torch at export) samples what the torch backend samples.
    (The tiny prior's export misses its verification tolerance by 1.2x, 1.9e-4 against 1.6e-4 on these random
    weights, and is refused there: not asserted here.)"""
    pytest.importorskip("onnxruntime", reason="onnxruntime (the 'test' extra) is not installed")
    model, (cond, _) = decoder_model(), prompts()
    emb = torch.randn(len(SEEDS), C_PRIOR, 6, 6, generator=torch.Generator().manual_seed(9))
    kw = dict(cond={"clip_text_pooled": cond["clip_text_pooled"], "effnet": emb}, output="latent")
    want = edmrt.Sampler(model, steps=3, backend="torch").sample(SEEDS, **kw)
    got = edmrt.Sampler(model, steps=3, backend="onnxruntime").sample(SEEDS, **kw)
    assert rel(got, want) <= 1e-4, rel(got, want)   # measured 2.8e-5
