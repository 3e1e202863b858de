"""IP-Adapters installed the usual way, with the pipeline's own ``load_ip_adapter``, ``set_ip_adapter_scale`` and
``unload_ip_adapter``: edmrt sees what diffusers installed and matches the pipeline, or refuses by name.

``load_ip_adapter`` changes the UNet's config by attribute (``unet.config.encoder_hid_dim_type = "ip_image_proj"``),
which diffusers' ``FrozenDict`` keeps beside an unchanged item; edmrt read the item and dropped the image embeddings
without a word (the images came out as without the adapter).  The adapters here are random state dicts in the
IP-Adapter file format (``image_proj``: a plain ``ImageProjection``; ``ip_adapter``: ``to_k_ip`` / ``to_v_ip`` of
every cross-attention layer, numbered 1, 3, 5, ... as the loader reads them).  Tolerance: tests/test_diffusers.py's.
"""
import pytest
import torch

import edmrt

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")

from edmrt.adapters.diffusers import from_diffusers, initial_noise, live_config  # noqa: E402
from test_diffusers import RTOL, SD_LEADING, SEEDS, TOKENS, sd_inputs, rel, scheduler_sampler, sd_pipe, tiny_unet, tiny_vae  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

EMBED = 16   # the image encoder's embedding size


def _ip_state_dict(unet, seed: int) -> dict:
    """A random plain IP-Adapter (4 image tokens) for ``unet``, in the file layout ``load_ip_adapter`` reads."""
    g = torch.Generator().manual_seed(seed)
    cross = int(unet.config.cross_attention_dim)
    image_proj = {"proj.weight": torch.randn(4 * cross, EMBED, generator=g) * 0.2,
                  "proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
                  "norm.weight": 1 + 0.1 * torch.randn(cross, generator=g), "norm.bias": torch.randn(cross, generator=g)}
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[:-len(".processor")]).to_q.out_features
            ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


def _pipe(adapters: int, scales=None):
    unet, vae = tiny_unet(), tiny_vae()
    pipe = sd_pipe(unet, vae, diffusers.EulerDiscreteScheduler(**SD_LEADING))
    dicts = [_ip_state_dict(unet, 10 + i) for i in range(adapters)]
    pipe.load_ip_adapter(dicts if adapters > 1 else dicts[0], subfolder="", weight_name=[f"ip{i}.bin" for i in
                         range(adapters)] if adapters > 1 else "ip.bin", image_encoder_folder=None)
    if scales is not None:
        pipe.set_ip_adapter_scale(scales)
    return pipe


def _images(n: int):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(1, 1, EMBED, generator=g) for _ in range(n)]


CASES = [(1, None, 7.5), (1, None, 1.0), (2, [0.5, 0.8], 7.5)]


@pytest.mark.parametrize("adapters,scales,w", CASES, ids=["guidance-7.5", "guidance-off", "two-adapters-scaled"])
def test_an_ip_adapter_loaded_by_the_pipeline_conditions_edmrt_as_it_conditions_the_pipeline(adapters, scales, w):
    pipe = _pipe(adapters, scales)
    sched = pipe.scheduler
    assert pipe.unet.config.get("encoder_hid_dim_type") is None   # the item load_ip_adapter leaves as it was
    assert live_config(pipe.unet)["encoder_hid_dim_type"] == "ip_image_proj"
    L, emb, neg = sd_inputs(32)
    images = _images(adapters)
    guided = w != 1.0
    embeds = [torch.cat([torch.zeros_like(im), im]) if guided else im for im in images]
    theirs = pipe(prompt_embeds=emb, negative_prompt_embeds=neg if guided else None, latents=L.clone(),
                  num_inference_steps=5, guidance_scale=w, output_type="latent", height=16, width=16,
                  ip_adapter_image_embeds=embeds).images
    model = from_diffusers(pipe.unet, sched, pipe.vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    names = ["image_embeds"] if adapters == 1 else [f"image_embeds_{i}" for i in range(adapters)]
    assert [c.name for c in model.cond] == ["encoder_hidden_states", *names]
    cond = {"encoder_hidden_states": emb, **{n: im[0] for n, im in zip(names, images)}}
    ours = scheduler_sampler(model, sched, "euler").sample(
        SEEDS, cond=cond, uncond={"encoder_hidden_states": neg} if guided else None, guidance=w if guided else None,
        noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)  # measured 1.5e-6, 1.6e-7, 9.6e-7
    # The adapter matters: without the image tokens the result is far away.
    plain = pipe(prompt_embeds=emb, negative_prompt_embeds=neg if guided else None, latents=L.clone(),
                 num_inference_steps=5, guidance_scale=w, output_type="latent", height=16, width=16,
                 ip_adapter_image_embeds=[torch.zeros_like(e) for e in embeds]).images
    assert rel(plain, theirs) > 100 * RTOL


def test_unload_ip_adapter_gives_back_the_plain_unet():
    pipe = _pipe(1)
    pipe.unload_ip_adapter()
    sched = pipe.scheduler
    model = from_diffusers(pipe.unet, sched, pipe.vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    assert [c.name for c in model.cond] == ["encoder_hidden_states"]
    L, emb, neg = sd_inputs(32)
    theirs = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(), num_inference_steps=5,
                  guidance_scale=7.5, output_type="latent", height=16, width=16).images
    ours = scheduler_sampler(model, sched, "euler").sample(SEEDS, cond={"encoder_hidden_states": emb},
                                                  uncond={"encoder_hidden_states": neg}, guidance=7.5,
                                                  noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)


def test_a_half_installed_ip_adapter_is_refused_by_name():
    """Image-token attention without the projection that feeds it, or the projection without the attention: edmrt
    cannot give the network what it would read, so it says so."""
    pipe = _pipe(1)
    proj = pipe.unet.encoder_hid_proj
    pipe.unet.encoder_hid_proj = None
    pipe.unet.config.encoder_hid_dim_type = None
    with pytest.raises(ValueError, match="IP-Adapter attention processors"):
        from_diffusers(pipe.unet, pipe.scheduler, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    fresh = tiny_unet()
    fresh.encoder_hid_proj = proj
    fresh.config.encoder_hid_dim_type = "ip_image_proj"   # as the loader writes it
    with pytest.raises(ValueError, match="no IP-Adapter attention processors"):
        from_diffusers(fresh, pipe.scheduler, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})


def test_edmrt_sampler_matches_with_the_scale_changed_after_building():
    """set_ip_adapter_scale changes the attention processors in place: a Sampler built before it samples with the
    new scale, as the pipeline does (the network is the pipeline's UNet)."""
    pipe = _pipe(1)
    sched = pipe.scheduler
    sched.set_timesteps(5)   # the schedule the pipeline call below sets again
    model = from_diffusers(pipe.unet, sched, pipe.vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32)})
    s = scheduler_sampler(model, sched, "euler")
    L, emb, neg = sd_inputs(32)
    (image,) = _images(1)
    pipe.set_ip_adapter_scale(0.3)
    theirs = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=L.clone(), num_inference_steps=5,
                  guidance_scale=7.5, output_type="latent", height=16, width=16,
                  ip_adapter_image_embeds=[torch.cat([torch.zeros_like(image), image])]).images
    ours = s.sample(SEEDS, cond={"encoder_hidden_states": emb, "image_embeds": image[0]},
                    uncond={"encoder_hidden_states": neg}, guidance=7.5, noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)


@pytest.mark.parametrize("adapters,w", [(1, 7.5), (2, 1.0)], ids=["one-adapter-guided", "two-adapters"])
def test_ip_adapter_masks_condition_edmrt_as_they_condition_the_pipeline(adapters, w):
    """Masks as ``IPAdapterMaskProcessor.preprocess`` makes them, passed to the pipeline by cross_attention_kwargs
    and to edmrt as conditioning inputs (static buffers, one per adapter), the same for every sample."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe = _pipe(adapters, [0.7, 0.9] if adapters > 1 else None)
    sched = pipe.scheduler
    L, emb, neg = sd_inputs(32)
    images = _images(adapters)
    guided = w != 1.0
    embeds = [torch.cat([torch.zeros_like(im), im]) if guided else im for im in images]
    raw = torch.zeros(adapters, 1, 16, 16)
    raw[0, :, :, :9] = 1.0           # adapter 0 conditions the left part, adapter 1 the right
    if adapters > 1:
        raw[1, :, :, 7:] = 1.0
    masks = IPAdapterMaskProcessor().preprocess(raw, height=16, width=16)      # (adapters, 1, 16, 16)
    per = [masks[i:i + 1] for i in range(adapters)]                             # each (1, num_images = 1, 16, 16)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg if guided else None, latents=L.clone(),
              num_inference_steps=5, guidance_scale=w, output_type="latent", height=16, width=16,
              ip_adapter_image_embeds=embeds)
    theirs = pipe(**kw, cross_attention_kwargs={"ip_adapter_masks": per}).images
    names = ["ip_adapter_masks"] if adapters == 1 else [f"ip_adapter_masks_{i}" for i in range(adapters)]
    model = from_diffusers(pipe.unet, sched, pipe.vae, cond_shapes={"encoder_hidden_states": (TOKENS, 32),
                                                                    **{n: (1, 16, 16) for n in names}})
    inames = ["image_embeds"] if adapters == 1 else [f"image_embeds_{i}" for i in range(adapters)]
    cond = {"encoder_hidden_states": emb, **{n: im[0] for n, im in zip(inames, images)},
            **{n: m[0] for n, m in zip(names, per)}}
    ours = scheduler_sampler(model, sched, "euler").sample(
        SEEDS, cond=cond, uncond={"encoder_hidden_states": neg} if guided else None, guidance=w if guided else None,
        noise=initial_noise(L, sched), output="latent")
    assert rel(ours, theirs) <= RTOL, rel(ours, theirs)   # measured 1.2e-6 (one, guided), 2.1e-7 (two)
    unmasked = pipe(**kw).images   # the masks matter
    assert rel(unmasked, theirs) > 100 * RTOL
    with pytest.raises(ValueError, match="IP-Adapter masks are"):
        from_diffusers(pipe.unet, sched, cond_shapes={"encoder_hidden_states": (TOKENS, 32),
                                                      "ip_adapter_masks_7": (1, 16, 16)})
