"""The Stable-Diffusion-1.5-shaped GPU case: edmrt's whole-loop CUDA graph vs the diffusers pipeline, batch 1.

The network is diffusers' ``UNet2DConditionModel`` with SD 1.5's UNet config (random weights, seed 0), fp16 on
CUDA, 64x64x4 latents (512 px), random prompt and negative-prompt embeddings (77, 768).  Two cases:

- ``dpmpp_2m_cfg``: 20 steps of DPM-Solver++(2M) (``DPMSolverMultistepScheduler``, SD's scaled-linear betas) with
  classifier-free guidance 7.5: 20 UNet calls on batch 2;
- ``lcm_4``: 4 steps of ``LCMScheduler`` without guidance: 4 UNet calls on batch 1 (the same SD 1.5 UNet, as with an
  LCM-LoRA; it has no ``time_cond_proj_dim``, so there is no guidance embedding).

Contenders, timed in interleaved rounds (``torch.cuda.synchronize()`` around each run; medians reported):

- diffusers: ``StableDiffusionPipeline(vae=None, text_encoder=None, ...)`` called with ``prompt_embeds``,
  ``negative_prompt_embeds``, ``latents`` and ``output_type="latent"`` (the pipeline accepts vae=None: its
  ``vae_scale_factor`` falls back to 8 and the VAE is used only to decode).  Without transformers diffusers
  exports only a placeholder for the pipeline: the script then times the pipeline's denoising loop written out on
  diffusers' UNet and scheduler (scale_model_input, UNet, CFG, ``scheduler.step``) and says so (``fallback``).
- edmrt: ``edmrt.Sampler(from_diffusers(unet, scheduler), solver, steps, schedule=<the scheduler's sigmas>,
  backend="torch", graph=True)``: the whole sampling loop in one CUDA graph, started from the same latents
  (``initial_noise``: latents * init_noise_sigma, mapped to edmrt's variance-exploding state).
- the bare network: the same number of UNet calls on the same batch (2 with CFG), eager and graph-replayed.

Parity: the max abs difference of the final latents (fp16 network on both sides; diffusers keeps fp16 latents,
edmrt a float32 state).  LCM adds fresh noise after every step but the last; for the parity run the pipeline's
LCM noise is replaced by edmrt's (Philox stream ``stage_stream(i)`` after step i), so the two are comparable.

Without diffusers the script falls back to a diffusers-style loop in plain torch (the same DPM-Solver++(2M) and LCM
updates on SD's discrete schedule) around edmrt's own ``EDMUNet`` sized roughly like SD's UNet (320 channels x
(1, 2, 4, 4), 2 blocks a level, attention at 32x32 and 16x16, ~700M parameters, class-conditional CFG) and says so.

Goal: edmrt >= 1.5x the diffusers pipeline at batch 1.  Writes gpu_sd.json (gpu_sd_tiny.json with --tiny) to $OUT
or benchmarks/results/.  ``--device cpu --tiny``: tiny configs and 2 rounds, a smoke test for machines without a
GPU.  Exit status: 0 when every case ran and agrees within the parity tolerance, 1 otherwise, 2 without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

GOAL = 1.5
SEED = 0

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the fields that shape the network.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
    attention_head_dim=8, use_linear_projection=False, upcast_attention=False,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
# The fallback network: edmrt's EDMUNet roughly SD-sized (no cross-attention: class labels carry the condition).
SD_LIKE_EDMUNET = dict(img_resolution=64, img_channels=4, num_classes=1000, model_channels=320, channel_mult=(1, 2, 4, 4),
                       num_blocks=2, attn_resolutions=(32, 16), channels_per_head=64)
TINY_EDMUNET = dict(img_resolution=8, img_channels=4, num_classes=10, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16, emb_mult=2)
# SD's training schedule (scheduler_config.json): scaled-linear betas 0.00085 .. 0.012 over 1000 steps.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps

CASES = (
    dict(name="dpmpp_2m_cfg", scheduler="DPMSolverMultistepScheduler", solver="dpmpp_2m", steps=20, guidance=7.5),
    dict(name="lcm_4", scheduler="LCMScheduler", solver="lcm", steps=4, guidance=None),
)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns: dict, rounds: int, dev: torch.device, deadline: float) -> dict:
    """{name: [seconds per run]} over interleaved rounds (every fn warmed up by the caller); stops early past the
    deadline once 3 rounds (or all, when fewer are asked) are done."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t)
        if time.perf_counter() > deadline and r + 1 >= min(3, rounds):
            break
    return times


def graph_bare(call, n: int, dev: torch.device):
    """n replays of one CUDA-graph-captured network call (warmed up on a side stream), or None off CUDA."""
    if dev.type != "cuda":
        return None
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            call()
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        call()

    def run():
        for _ in range(n):
            g.replay()
    return run


def parity(ours: torch.Tensor, theirs: torch.Tensor, tol_rel: float) -> dict:
    a, b = ours.detach().float().cpu(), theirs.detach().float().cpu()
    diff = float((a - b).abs().max())
    ref = float(b.abs().max())
    rel = diff / max(ref, 1e-12)
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    return dict(max_abs_diff=diff, max_abs_ref=ref, rel=rel, tol_rel=tol_rel, ok=finite and rel <= tol_rel,
                rms_diff=float((a - b).pow(2).mean().sqrt()))


@contextlib.contextmanager
def edmrt_lcm_noise(diffusers, shape, dev):
    """diffusers' LCMScheduler draws its noise from edmrt's Philox streams: step i's noise is stage_stream(i)."""
    from edmrt.kernels.philox import philox_normal, stage_stream

    mod = diffusers.schedulers.scheduling_lcm
    orig, count = mod.randn_tensor, [0]

    def randn_tensor(shp, generator=None, device=None, dtype=None, **_):
        z = philox_normal([SEED], stage_stream(count[0]), tuple(shp[1:]), torch.float32, dev)
        count[0] += 1
        return z.to(device=device or dev, dtype=dtype or torch.float32)

    mod.randn_tensor = randn_tensor
    try:
        yield
    finally:
        mod.randn_tensor = orig


# ----------------------------------------------------------------------------- the diffusers contenders

def make_scheduler(diffusers, case):
    cls = getattr(diffusers, case["scheduler"])
    extra = dict(steps_offset=1, original_inference_steps=LCM_ORIGINAL_STEPS) if case["solver"] == "lcm" else \
        dict(steps_offset=1)
    return cls(**SD_BETAS, prediction_type="epsilon", **extra)


def pipeline_runner(diffusers, unet, sched, case, emb, neg, latents, px):
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    w = case["guidance"]
    kw = dict(prompt_embeds=emb, num_inference_steps=case["steps"], guidance_scale=w if w else 1.0,
              latents=latents, output_type="latent", height=px, width=px)
    if w:
        kw["negative_prompt_embeds"] = neg

    def run():
        with torch.inference_mode():
            return pipe(**kw).images
    return run


def components_runner(unet, sched, case, emb, neg, latents, dev):
    """StableDiffusionPipeline's denoising loop, written out (what it runs between encode_prompt and the VAE)."""
    w = case["guidance"]
    cond = torch.cat([neg, emb]) if w else emb

    def run():
        with torch.inference_mode():
            sched.set_timesteps(case["steps"], device=dev)
            x = latents * sched.init_noise_sigma
            for t in sched.timesteps:
                xi = torch.cat([x] * 2) if w else x
                xi = sched.scale_model_input(xi, t)
                eps = unet(xi, t, encoder_hidden_states=cond, return_dict=False)[0]
                if w:
                    u, c = eps.chunk(2)
                    eps = u + w * (c - u)
                x = sched.step(eps, t, x, return_dict=False)[0]
            return x
    return run


def diffusers_case(diffusers, use_pipeline, case, unet, dtype, emb, neg, latents, dev, rounds, deadline, tol):
    import edmrt
    from edmrt.adapters.diffusers import initial_noise, scheduler_sigmas

    w, steps = case["guidance"], case["steps"]
    px = latents.shape[-1] * 8
    sched = make_scheduler(diffusers, case)
    ref = make_scheduler(diffusers, case)  # set_timesteps here, for the sigmas and the start (the pipeline's is reset)
    ref.set_timesteps(steps)
    sigmas = scheduler_sigmas(ref)
    noise = initial_noise(latents.float(), ref).to(dev)
    theirs = (pipeline_runner(diffusers, unet, sched, case, emb, neg, latents, px) if use_pipeline
              else components_runner(unet, sched, case, emb, neg, latents, dev))

    model = edmrt.from_diffusers(unet, ref)
    sampler = edmrt.Sampler(model, case["solver"], steps, backend="torch", schedule=sigmas, graph=True, device=dev)
    if not np.allclose(sampler.plan.sigmas, sigmas, rtol=0, atol=0):
        raise AssertionError(f"edmrt's plan does not use the scheduler's sigmas: {sampler.plan.sigmas} vs {sigmas}")
    kw = dict(cond={"encoder_hidden_states": emb.float()}, noise=noise, output="latent")
    if w:
        kw.update(uncond={"encoder_hidden_states": neg.float()}, guidance=w)

    def ours():
        return sampler.sample([SEED], **kw)

    nb = 2 if w else 1
    x2 = torch.randn((nb,) + tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    t2 = torch.full((nb,), 999.0, device=dev)
    e2 = torch.cat([neg, emb]) if w else emb

    def call():
        return unet(x2, t2, encoder_hidden_states=e2, return_dict=False)[0]

    def bare_eager():
        with torch.inference_mode():
            for _ in range(steps):
                call()
    return run_case(case, theirs, ours, bare_eager, graph_bare(call, steps, dev), nb, dev, rounds, deadline, tol,
                    parity_noise=(lambda: edmrt_lcm_noise(diffusers, latents.shape, dev)) if case["solver"] == "lcm"
                    else contextlib.nullcontext)


# ----------------------------------------------------------------------------- the fallback (no diffusers)

def sd_alphas_cumprod() -> torch.Tensor:
    """diffusers' scaled-linear alphas_cumprod (float32), as its schedulers compute it."""
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, SD_BETAS["num_train_timesteps"],
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def fallback_timesteps(case) -> np.ndarray:
    n, T = case["steps"], SD_BETAS["num_train_timesteps"]
    if case["solver"] == "lcm":  # LCMScheduler.set_timesteps
        k = T // LCM_ORIGINAL_STEPS
        origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
        return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    # DPMSolverMultistepScheduler, timestep_spacing="linspace"
    return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)


def plain_torch_loop(net, case, acp, ts, labels, null, latents, dev, noise_fn):
    """A diffusers-style loop in plain torch on the VP state (init_noise_sigma = 1): the network, CFG, then
    DPMSolverMultistepScheduler's DPM-Solver++(2M) (midpoint, first order at the start and at the final sigma = 0)
    or LCMScheduler's step (boundary-condition scalings, fresh noise after every step but the last)."""
    w = case["guidance"]
    a = acp.double().to(dev)
    x = latents.float().clone()
    m_prev = h_prev = None
    with torch.inference_mode():
        for i, t in enumerate(ts):
            t = int(t)
            xi = torch.cat([x, x]) if w else x
            lab = torch.cat([torch.full_like(labels, null), labels]) if w else labels
            eps = net(xi, torch.full((xi.shape[0],), float(t), device=dev), lab).float()
            if w:
                u, c = eps.chunk(2)
                eps = u + w * (c - u)
            at = a[t]
            x0 = ((x - (1 - at).sqrt() * eps) / at.sqrt()).float()
            nxt = int(ts[i + 1]) if i + 1 < len(ts) else None
            if case["solver"] == "lcm":
                u_ = 10.0 * t
                c_skip, c_out = 0.25 / (u_ ** 2 + 0.25), u_ / (u_ ** 2 + 0.25) ** 0.5
                den = c_out * x0 + c_skip * x
                x = (a[nxt].sqrt() * den + (1 - a[nxt]).sqrt() * noise_fn(i)).float() if nxt is not None else den
                continue
            alpha, sig = at.sqrt(), (1 - at).sqrt()
            if nxt is None:  # final sigma 0: x = x0
                x = x0
                continue
            alpha_n, sig_n = a[nxt].sqrt(), (1 - a[nxt]).sqrt()
            h = torch.log(alpha_n / sig_n) - torch.log(alpha / sig)
            x_new = (sig_n / sig) * x - alpha_n * torch.expm1(-h) * x0
            if m_prev is not None:
                d1 = (x0 - m_prev) / (h_prev / h)
                x_new = x_new - 0.5 * alpha_n * torch.expm1(-h) * d1
            x, m_prev, h_prev = x_new.float(), x0, h
    return x


def fallback_case(case, net, latents, dev, rounds, deadline, tol):
    import edmrt
    from edmrt.kernels.philox import philox_normal, stage_stream
    from edmrt.precond import sigmas_from_alphas_cumprod

    w, steps = case["guidance"], case["steps"]
    K = net.config.num_classes
    acp = sd_alphas_cumprod()
    ts = fallback_timesteps(case)
    levels = sigmas_from_alphas_cumprod(acp.double().numpy())
    sigmas = np.concatenate([levels[ts], [0.0]])
    pre = (edmrt.LCMPrecond(alphas_cumprod=acp.double().numpy(), timestep="nearest", prediction="epsilon",
                            timestep_scaling=10.0) if case["solver"] == "lcm"
           else edmrt.EpsilonPrecond(alphas_cumprod=acp.double().numpy(), timestep="nearest"))
    model = edmrt.Model(net, pre, num_classes=K, sample_shape=tuple(latents.shape[1:]),
                        sigma_min=float(levels.min()), sigma_max=float(levels.max()))
    sampler = edmrt.Sampler(model, case["solver"], steps, backend="torch", schedule=sigmas, graph=True, device=dev)
    labels = torch.tensor([1], device=dev)
    noise = (latents.float() * float(np.sqrt(sigmas[0] ** 2 + 1.0)) / float(sigmas[0])).to(dev)  # VP start -> VE
    kw = dict(cond=labels, noise=noise, output="latent", guidance=w)

    def ours():
        return sampler.sample([SEED], **kw)

    shape = tuple(latents.shape[1:])

    def theirs(noise_fn=lambda i: torch.randn((1,) + shape, device=dev)):
        return plain_torch_loop(net, case, acp, ts, labels, K, latents, dev, noise_fn)

    nb = 2 if w else 1
    x2 = torch.randn((nb,) + shape, generator=torch.Generator().manual_seed(1)).to(dev)
    t2 = torch.full((nb,), 999.0, device=dev)
    l2 = torch.tensor([K, 1][-nb:], device=dev)

    def call():
        return net(x2, t2, l2)

    def bare_eager():
        with torch.inference_mode():
            for _ in range(steps):
                call()
    def same_noise(i):
        return philox_normal([SEED], stage_stream(i), shape, torch.float32, dev)
    return run_case(case, theirs, ours, bare_eager, graph_bare(call, steps, dev), nb, dev, rounds, deadline, tol,
                    parity_theirs=lambda: theirs(same_noise))


# ----------------------------------------------------------------------------- one case

def run_case(case, theirs, ours, bare_eager, bare_graph, nb, dev, rounds, deadline, tol,
             parity_noise=contextlib.nullcontext, parity_theirs=None) -> dict:
    t0 = time.perf_counter()
    fns = {"diffusers": theirs, "edmrt": ours, "bare_eager": bare_eager}
    if bare_graph is not None:
        fns["bare_graph"] = bare_graph
    for fn in fns.values():  # warm-up: cuDNN / SDPA selection, edmrt's graph capture (2 eager loops + capture)
        fn()
    sync(dev)
    warm_s = time.perf_counter() - t0
    # Parity first: one run each (with the same LCM noise on both sides).
    with parity_noise():
        ref = parity_theirs() if parity_theirs is not None else theirs()
    par = parity(ours(), ref, tol)
    times = interleaved(fns, rounds, dev, deadline)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    res = dict(case=case["name"], scheduler=case["scheduler"], solver=case["solver"], steps=case["steps"],
               guidance=case["guidance"], unet_calls=case["steps"], unet_batch=nb, batch=1, rounds=len(times["edmrt"]),
               ms=med, ms_all={k: [round(x * 1e3, 3) for x in v] for k, v in times.items()},
               speedup=med["diffusers"] / med["edmrt"], goal=GOAL, meets_goal=med["diffusers"] / med["edmrt"] >= GOAL,
               diffusers_over_bare_eager=med["diffusers"] / med["bare_eager"], parity=par,
               warmup_s=round(warm_s, 2))
    if "bare_graph" in med:
        res["edmrt_over_bare_graph"] = med["edmrt"] / med["bare_graph"]
    print(f"{case['name']:13s} diffusers {med['diffusers']:9.2f} ms  edmrt {med['edmrt']:9.2f} ms  "
          f"speed-up {res['speedup']:.2f}x (goal >= {GOAL}x: {'met' if res['meets_goal'] else 'NOT met'})  "
          f"bare eager {med['bare_eager']:.2f} ms" + (f", bare graph {med['bare_graph']:.2f} ms" if "bare_graph" in med
                                                       else "")
          + f"  | parity max|diff| {par['max_abs_diff']:.3g} (rel {par['rel']:.2e}, tol {tol:g}: "
          f"{'ok' if par['ok'] else 'FAILED'})  [{res['rounds']} rounds, warm-up {warm_s:.1f} s]", flush=True)
    return res


# ----------------------------------------------------------------------------- main

def device_args(ap: argparse.ArgumentParser, full_rounds: int, budget_s: float) -> None:
    """The options both GPU cases take: --device, --tiny, --rounds, --budget-s."""
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny configs and 2 rounds (a CPU smoke test)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"interleaved timing rounds (default {full_rounds}; 2 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=budget_s, help="stop adding rounds past this many seconds")


def device_setup(name: str, args, full_rounds: int):
    """(device, rounds, dtype, tolerance, device name) for --device / --tiny / --rounds; None (said) without CUDA.
    fp16 on CUDA (relative tolerance 0.05), fp32 on the CPU (1e-3)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: no CUDA device (use --device cpu --tiny for a smoke test)", file=sys.stderr)
        return None
    dev = torch.device(args.device)
    rounds = args.rounds or (2 if args.tiny else full_rounds)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    tol = 0.05 if dtype == torch.float16 else 1e-3
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return dev, rounds, dtype, tol, gpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    device_args(ap, 7, 150.0)
    ap.add_argument("--no-pipeline", action="store_true", help="time the written-out pipeline loop (as without "
                    "transformers)")
    ap.add_argument("--fallback", action="store_true", help="run the no-diffusers fallback even if diffusers is there")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    setup = device_setup("gpu_sd", args, 7)
    if setup is None:
        return 2
    dev, rounds, dtype, tol, gpu = setup

    import edmrt

    diffusers, fallback = None, None
    if args.fallback:
        fallback = "forced by --fallback"
    else:
        try:
            import diffusers

            for name in ("UNet2DConditionModel", "DPMSolverMultistepScheduler", "LCMScheduler"):
                getattr(diffusers, name)  # diffusers imports lazily: a broken install shows here, not mid-case
        except Exception as exc:  # ImportError, or a broken install
            diffusers, fallback = None, f"diffusers cannot be imported ({type(exc).__name__}: {exc})"
    use_pipeline, why = False, None
    if diffusers is not None:
        from diffusers.utils import is_transformers_available
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # e.g. the fp16 cast notice of ModelMixin.to
        if args.no_pipeline:
            why = "--no-pipeline"
        elif not is_transformers_available():
            why = "transformers is not installed, so diffusers offers no StableDiffusionPipeline"
        else:
            try:
                diffusers.StableDiffusionPipeline.__init__  # imports the pipeline module (and transformers' CLIP)
                use_pipeline = True
            except Exception as exc:
                why = f"StableDiffusionPipeline cannot be imported ({type(exc).__name__}: {exc})"
        if use_pipeline:
            contender = f"diffusers {diffusers.__version__} StableDiffusionPipeline (vae=None, output_type='latent')"
        else:
            fallback = (f"{why}: timing StableDiffusionPipeline's denoising loop written out on diffusers' "
                        "UNet2DConditionModel and scheduler instead of the pipeline object")
            contender = f"diffusers {diffusers.__version__} components loop (the pipeline's denoising loop)"
    else:
        fallback += ("; timing a diffusers-style loop in plain torch (DPM-Solver++(2M) / LCM steps on SD's discrete "
                     "schedule, CFG) on edmrt's EDMUNet sized roughly like SD 1.5's UNet, not diffusers")
        contender = "diffusers-style plain-torch loop on edmrt.models.unet.EDMUNet (NOT diffusers)"
    if fallback:
        print(f"gpu_sd: FALLBACK: {fallback}", flush=True)
    print(f"gpu_sd: {gpu}, torch {torch.__version__}, {dtype}, contender: {contender}", flush=True)
    print(f"gpu_sd: goal: edmrt (whole-loop CUDA graph) >= {GOAL}x the diffusers pipeline at batch 1", flush=True)

    H = 8 if args.tiny else 64
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(1, 4, H, H, generator=g).to(dev, dtype)
    result = dict(gpu=gpu, device=str(dev), torch=torch.__version__, python=platform.python_version(),
                  edmrt=getattr(edmrt, "__version__", None), diffusers=getattr(diffusers, "__version__", None),
                  contender=contender, fallback=fallback, mode="tiny" if args.tiny else "full",
                  dtype=str(dtype).removeprefix("torch."), latent_shape=list(latents.shape),
                  goal=f"edmrt (whole-loop CUDA graph) >= {GOAL}x the diffusers pipeline at batch 1",
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), cases={})
    torch.manual_seed(SEED)
    t = time.perf_counter()
    with torch.device(dev):  # initialise on the device: SD's ~860M parameters in seconds, not minutes on CPU
        if diffusers is not None:
            net = diffusers.UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET))
        else:
            from edmrt.models.unet import EDMUNet

            net = EDMUNet(**(TINY_EDMUNET if args.tiny else SD_LIKE_EDMUNET))
    net = net.eval().requires_grad_(False)
    if diffusers is not None:
        net = net.to(dtype)
    elif dtype == torch.float16:
        net = net.to_fp16()
    result["network"] = dict(cls=type(net).__name__, parameters=sum(p.numel() for p in net.parameters()),
                             init_s=round(time.perf_counter() - t, 1))
    if diffusers is not None:
        dim = net.config.cross_attention_dim
        emb = torch.randn(1, 77, dim, generator=g).to(dev, dtype)
        neg = torch.randn(1, 77, dim, generator=g).to(dev, dtype)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_sd_tiny.json" if args.tiny else "gpu_sd.json")
    deadline_total = t_start + args.budget_s
    ok = True
    for i, case in enumerate(CASES):
        # Split what is left of the budget between the cases still to run (the CFG case has 10x the UNet work).
        share = 0.85 if i == 0 else 1.0
        deadline = time.perf_counter() + max(0.0, deadline_total - time.perf_counter()) * share
        try:
            if diffusers is not None:
                res = diffusers_case(diffusers, use_pipeline, case, net, dtype, emb, neg, latents, dev, rounds,
                                     deadline, tol)
            else:
                res = fallback_case(case, net, latents, dev, rounds, deadline, tol)
            ok &= res["parity"]["ok"]
        except Exception as exc:  # report, do not hide: the other case still runs
            res = dict(case=case["name"], error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            print(f"{case['name']}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            ok = False
        result["cases"][case["name"]] = res
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["ok"] = bool(ok) and len(result["cases"]) == len(CASES)
        path.write_text(json.dumps(result, indent=1))  # after every case: a run cut short keeps what it measured
    print(f"gpu_sd: {'ok' if ok else 'FAILED'} in {result['seconds']} s; wrote {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
