"""The SD-1.5-shaped GPU edit case: LEDITS++ (invert + edit) by edmrt's whole-loop CUDA graph vs diffusers'
``LEditsPPPipelineStableDiffusion``, batch 1.

The network is ``UNet2DConditionModel`` with SD 1.5's config (``gpu_sd.SD15_UNET``: random weights, seed 0), fp16 on
CUDA, 64x64x4 latents, random (77, 768) embeddings for the empty prompt and two edit concepts (one reversed, noise
mask, threshold 0.9), 20 steps of ``DPMSolverMultistepScheduler`` (sde-dpmsolver++, order 2, final_sigmas_type
"sigma_min", lower_order_final False: the configuration whose inversion and sampling agree; tests/test_edit.py).
The pipeline's text and VAE encoders are replaced by the given embeddings and latents (its ``encode_prompt`` and
``encode_image`` patched) and its VAE is a tiny random one (``invert`` decodes a reconstruction with it).

Checks: (1) the edit from the pipeline's own noise maps and initial latents equals the pipeline's edited latents
(fp16 network on both sides; relative tolerance 0.05); (2) edmrt's edit loop is one CUDA graph (``EditEngine``:
one captured graph after the runs).  Timing: interleaved rounds of invert + edit on each side
(``torch.cuda.synchronize`` around each), medians, and the bare network floor (20 UNet calls on 1 row + 20 on 3).

Writes gpu_edit.json (gpu_edit_tiny.json with --tiny) to $OUT or benchmarks/results/.  ``--device cpu --tiny``: a
smoke test without a GPU.  Exit status 0 when both checks pass, 1 otherwise, 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd import SD15_UNET, TINY_UNET, device_args, device_setup, sync  # noqa: E402

STEPS = 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    device_args(ap, 5, 100.0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    setup = device_setup("gpu_edit", args, 5)
    if setup is None:
        return 2
    dev, rounds, dtype, tol, gpu = setup
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_edit_tiny.json" if args.tiny else "gpu_edit.json")
    result = dict(gpu=gpu, device=str(dev), torch=torch.__version__, dtype=str(dtype), steps=STEPS,
                  mode="tiny" if args.tiny else "full", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        result.update(run(args, dev, dtype, rounds, tol, t_start))
    except Exception as exc:   # report, do not hide
        traceback.print_exc()
        result.update(error=f"{type(exc).__name__}: {exc}", ok=False)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    path.write_text(json.dumps(result, indent=1))
    print(f"gpu_edit: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s; wrote {path}", flush=True)
    return 0 if result.get("ok") else 1


def run(args, dev, dtype, rounds: int, tol: float, t_start: float) -> dict:
    import diffusers

    import edmrt
    from edmrt.adapters.diffusers import from_diffusers, scheduler_sigmas
    from edmrt.pipelines.edit import EditEngine
    from edmrt.pipelines.inversion import Inversion

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    with torch.device(dev):
        unet = diffusers.UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET)).eval().requires_grad_(False)
        vae = diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                      down_block_types=["DownEncoderBlock2D"] * 2,
                                      up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=2).eval()
    unet, vae = unet.to(dtype), vae.to(dtype)
    H, dim = (8 if args.tiny else 64), unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, H, H, generator=g).to(dev, dtype)
    U, E = torch.randn(1, 77, dim, generator=g).to(dev, dtype), torch.randn(2, 77, dim, generator=g).to(dev, dtype)
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                  final_sigmas_type="sigma_min", lower_order_final=False,
                                                  steps_offset=1, timestep_spacing="leading",
                                                  beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = diffusers.LEditsPPPipelineStableDiffusion(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                     scheduler=sched, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.encode_prompt = lambda **kw: (U, U, None) if kw.get("editing_prompt") == "" else (E, U, None)
    pipe.encode_image = lambda image, **kw: (x0, None)
    pipe.text_encoder = types.SimpleNamespace(dtype=dtype)
    edit_kw = dict(editing_prompt=["a", "b"], edit_guidance_scale=[5.0, 3.0], edit_threshold=[0.9, 0.9],
                   reverse_editing_direction=[False, True], use_cross_attn_mask=False, use_intersect_mask=False,
                   output_type="latent")

    def theirs():
        pipe.invert(image=torch.zeros(1, 3, 4 * H, 4 * H, device=dev, dtype=dtype), num_inversion_steps=STEPS,
                    skip=0.0, generator=torch.Generator(dev).manual_seed(5))
        return pipe(**edit_kw).images

    model = from_diffusers(unet, sched, cond_shapes={"encoder_hidden_states": (77, dim)})
    s2 = diffusers.DPMSolverMultistepScheduler.from_config(sched.config)
    s2.set_timesteps(STEPS)
    sig = scheduler_sigmas(s2)
    alpha_end = 1.0 / math.sqrt(1.0 + sig[-1] ** 2)
    edits = [{"cond": {"encoder_hidden_states": E[:1].float()}, "scale": 5.0},
             {"cond": {"encoder_hidden_states": E[1:].float()}, "scale": 3.0, "reverse": True}]
    uncond = {"encoder_hidden_states": U.float()}
    plan = edmrt.plan("dpmpp_2m_sde", sig, model.precond)
    sampler = edmrt.Sampler(model, plan=plan, backend="torch", device=dev)
    engine = EditEngine(sampler.backend, plan, 1, model.sample_shape, dev, concepts=2, cond_inputs=model.cond)

    def ours():
        inv = edmrt.invert(model, x0.float(), kind="ddpm", steps=STEPS, schedule=sig.tolist(), latents=True,
                           cond=uncond, backend="torch", device=dev)
        return edmrt.edit(model, inv, edits, uncond=uncond, backend="torch", device=dev, output="latent",
                          engine=engine) * alpha_end

    out = {}
    with torch.inference_mode():
        ref = theirs()
        inv = Inversion(latents=(pipe.init_latents.float() * math.sqrt(1 + sig[0] ** 2)), sigma_end=float(sig[0]),
                        kind="ddpm", solver="dpmpp_2m_sde", sigmas=sig, nfe=plan.nfe,
                        noise_maps=pipe.zs.float(), plan=plan)
        mine = edmrt.edit(model, inv, edits, uncond=uncond, backend="torch", device=dev, output="latent",
                          engine=engine) * alpha_end
        rel = float((mine - ref.float()).abs().max() / ref.float().abs().max())
        out["parity"] = dict(rel=rel, tol_rel=tol, ok=bool(torch.isfinite(mine).all()) and rel <= tol)
        print(f"gpu_edit: parity from the pipeline's noise maps: rel {rel:.2e} (tol {tol})", flush=True)
        ours()
        times = {"diffusers": [], "edmrt": []}
        deadline = t_start + args.budget_s
        for r in range(rounds):
            for name, fn in (("diffusers", theirs), ("edmrt", ours)):
                sync(dev)
                t = time.perf_counter()
                fn()
                sync(dev)
                times[name].append(time.perf_counter() - t)
            if time.perf_counter() > deadline and r + 1 >= 2:
                break
        floor = []
        t_emb = torch.cat([U, E])
        for _ in range(2):
            sync(dev)
            t = time.perf_counter()
            for _ in range(STEPS):
                unet(x0, 500, encoder_hidden_states=U)
                unet(x0.expand(3, -1, -1, -1), 500, encoder_hidden_states=t_emb)
            sync(dev)
            floor.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    graphs = len(engine._graphs)
    out.update(rounds=len(times["edmrt"]), diffusers_s=med["diffusers"], edmrt_s=med["edmrt"],
               speedup=med["diffusers"] / med["edmrt"], network_floor_eager_s=min(floor),
               edit_engine_cuda_graphs=graphs, edit_engine_uses_graph=engine.use_graph,
               one_graph=(graphs == 1) if dev.type == "cuda" else None)
    out["ok"] = out["parity"]["ok"] and (dev.type != "cuda" or out["one_graph"])
    print(f"gpu_edit: diffusers {med['diffusers']:.3f} s, edmrt {med['edmrt']:.3f} s ({out['speedup']:.2f}x), "
          f"network floor {min(floor):.3f} s; edit graphs {graphs}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
