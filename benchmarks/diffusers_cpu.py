"""edmrt against the diffusers pipeline loop on the CPU, on the SD 1.5 and SDXL UNets (random weights, float32).

Networks: diffusers ``UNet2DConditionModel`` with the real SD 1.5 config (859.5 M parameters) at 32x32 latents
(256x256 pixels; prompt embeddings (77, 768); 3.2 GiB in float32) and the real SDXL base config (2.57 G parameters,
9.6 GiB = 10.3 GB in float32) at 16x16 latents (128x128 pixels; prompt embeddings (77, 2048), pooled text_embeds
(1280,), time_ids (6,)).
Weights from ``torch.manual_seed(0)``, so the ONNX cache (keyed by the weights) is hit on a rerun.

Cases, at batch 1 and 4:
  lcm4   4 steps of ``LCMScheduler`` on the plain UNet (no time_cond_proj_dim, so no timestep_cond: LCM-LoRA's
         setting), no CFG (guidance_scale 1.0); edmrt solver "lcm".
  dpm20  20 steps of ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M)) with CFG 7.5 (random negative embeddings):
         the UNet runs on 2B rows per step; edmrt solver "dpmpp_2m".
  edmrt samples on the diffusers scheduler's own sigmas (``edmrt.adapters.diffusers.scheduler_sigmas``) from the
  same initial latents (``initial_noise``); the DPM case's outputs are compared (LCM's steps draw fresh noise, from
  different streams in the two libraries, so its outputs are not).

Contenders, interleaved in every round (one call of each, in this order), medians over the rounds:
  diffusers pipeline     ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` built from the UNet and the
                         scheduler with vae, text encoders, tokenizers and safety checker None, called with prompt
                         embeddings and ``output_type="latent"`` (progress bar off): the real ``__call__``.
  edmrt (torch)          ``Sampler(from_diffusers(unet, scheduler), solver, steps, schedule=sigmas, backend="torch")``
  edmrt (onnxruntime)    the same on the ONNX export of the UNet (``edmrt.backends.onnx_cache``: exported once,
                         external data above 2 GB) in an ORT session with ``intra_op_num_threads`` = the thread count,
                         passed to the Sampler as the backend object (one session shared by both schedulers).
  bare network (torch)   NFE calls ``unet(x, t, ...)`` on the same batch (2B under CFG) under inference_mode: the floor.
  bare network (ORT)     NFE ``session.run_with_iobinding`` on static buffers: the ORT floor.
  The bare floors run k = min(NFE, --bare-evals) evaluations per round, scaled by NFE / k (exact for lcm4).

Time budget (``--budget`` minutes, default 25; 0 = none): on 2 cores one SD 1.5 forward at 32x32 takes seconds, so a
20-step CFG run at batch 4 costs minutes per contender.  Each case's cost per round is estimated from warm-up
forwards; it gets min(--rounds, what its share of the remaining budget affords) rounds, at least one, and is
skipped (the estimate recorded) when even one round does not fit.  Cheapest cases first (NFE x UNet batch); SD 1.5
may use 60% of the budget when SDXL follows.  ``--budget 0`` runs every case (about 75 min on a 2-core Xeon).

Writes DIR/diffusers_cpu.{json,md} (``--out DIR``, default benchmarks/results; ``--quick`` and ``--tiny`` write only
with an explicit ``--out``).

    python benchmarks/diffusers_cpu.py [--quick] [--skip-sdxl] [--skip-onnx] [--out DIR] [--budget 25] [--rounds 3]
                                       [--threads N] [--sdxl-onnx] [--tiny]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------- networks and schedulers

# runwayml/stable-diffusion-v1-5 unet/config.json (the values that differ from UNet2DConditionModel's defaults
# are the same as the defaults except where written).
from edmrt.backends.auto import cpu_name  # noqa: E402
from edmrt.lab.bench import SD15_UNET  # noqa: E402  (runwayml/stable-diffusion-v1-5 unet/config.json)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (ldm transformer_depth [0, 2, 10]: the first level has
# no attention; attention_head_dim is the number of heads per level, 64 channels each).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, upcast_attention=False)
# Debugging only (--tiny): the same block structure, small.
TINY_SD = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
TINY_XL = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32)

# The training schedule of both (SD 1.5's scheduler_config.json is PNDM's, SDXL's Euler's; the cases' schedulers
# are built from it with from_config, as ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` does).
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", trained_betas=None, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, clip_sample=False, prediction_type="epsilon")
SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085,
                      beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None, set_alpha_to_one=False,
                      skip_prk_steps=True, steps_offset=1, clip_sample=False, sample_max_value=1.0,
                      interpolation_type="linear", prediction_type="epsilon", timestep_spacing="leading",
                      use_karras_sigmas=False)

NETS = {  # name -> (unet config, scheduler config, latent H = W, pooled text_embeds dim or None)
    "sd15": (SD15_UNET, SD15_SCHEDULER, 32, None),
    "sdxl": (SDXL_UNET, SDXL_SCHEDULER, 16, 1280),
    "tiny-sd": (TINY_SD, SD15_SCHEDULER, 16, None),
    "tiny-xl": (TINY_XL, SDXL_SCHEDULER, 16, 32),
}
CASES = {  # name -> (diffusers scheduler class, edmrt solver, steps, CFG weight or None)
    "lcm4": ("LCMScheduler", "lcm", 4, None),
    "dpm20": ("DPMSolverMultistepScheduler", "dpmpp_2m", 20, 7.5),
}
# Peak RSS of the process exporting the SD 1.5 UNet (torch network included), measured with /usr/bin/time -v on the
# 2-core Xeon (torch 2.13, onnxscript 0.7.2): the scale of an export's memory when this run hit the ONNX cache.
SD15_EXPORT_PEAK_GB = 8.6
CONTENDERS = ("diffusers pipeline", "edmrt (torch)", "edmrt (onnxruntime)", "bare network (torch)",
              "bare network (onnxruntime)")


def _mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _error(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb[-3:])
    return f"{type(exc).__name__}: {str(exc).strip()[:1500]}\n--- traceback tail ---\n{tail[-1500:]}"


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_unet(name: str):
    import diffusers

    config = NETS[name][0]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config).eval().requires_grad_(False)
    return unet


def scheduler(case: str, net: str, steps_set: bool = False):
    import diffusers

    cls = getattr(diffusers, CASES[case][0])
    base = {k: v for k, v in NETS[net][1].items() if k != "_class_name"}
    s = cls.from_config(base)
    if steps_set:
        s.set_timesteps(CASES[case][2])
    return s


def inputs(net: str, unet, B: int, seed: int):
    """Prompt embeddings (and SDXL's pooled embeddings and time ids), negative ones, initial latents; random."""
    _, _, hw, pooled = NETS[net]
    g = torch.Generator().manual_seed(seed)
    dim = int(unet.config.cross_attention_dim)
    d = dict(emb=torch.randn(B, 77, dim, generator=g), neg=torch.randn(B, 77, dim, generator=g),
             latents=torch.randn(B, 4, hw, hw, generator=g))
    if pooled is not None:
        d["pooled"] = torch.randn(B, pooled, generator=g)
        d["neg_pooled"] = torch.randn(B, pooled, generator=g)
        px = float(hw * 8)  # the pipeline's add_time_ids: original size, crop corner (0, 0), target size
        d["time_ids"] = torch.tensor([px, px, 0.0, 0.0, px, px])
    return d


# ----------------------------------------------------------------------------- contenders

def diffusers_pipeline(net: str, unet, sched):
    import diffusers

    if NETS[net][3] is None:
        pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(net: str, pipe, d: dict, steps: int, w: float | None):
    hw = NETS[net][2]
    kw = dict(prompt_embeds=d["emb"], num_inference_steps=steps, guidance_scale=1.0 if w is None else w,
              height=hw * 8, width=hw * 8, latents=d["latents"].clone(), output_type="latent", return_dict=False)
    if w is not None:
        kw["negative_prompt_embeds"] = d["neg"]
    if NETS[net][3] is not None:
        kw["pooled_prompt_embeds"] = d["pooled"]
        if w is not None:
            kw["negative_pooled_prompt_embeds"] = d["neg_pooled"]
    return lambda: pipe(**kw)[0]


def edmrt_call(net: str, smp, d: dict, sched_set, w: float | None):
    from edmrt.adapters.diffusers import initial_noise

    B = d["latents"].shape[0]
    cond = {"encoder_hidden_states": d["emb"]}
    uncond = {"encoder_hidden_states": d["neg"]} if w is not None else None
    if NETS[net][3] is not None:
        cond.update(text_embeds=d["pooled"], time_ids=d["time_ids"])
        if w is not None:
            uncond["text_embeds"] = d["neg_pooled"]
    noise = initial_noise(d["latents"], sched_set)
    seeds = list(range(B))
    return lambda: smp.sample(seeds, cond=cond, guidance=w, uncond=uncond, noise=noise, output="latent")


def net_inputs(net: str, d: dict, w: float | None):
    """The UNet's batch for one evaluation: 2B rows [uncond; cond] under CFG, B rows otherwise."""
    x, e = d["latents"], d["emb"]
    if w is not None:
        x, e = torch.cat([x, x]), torch.cat([d["neg"], e])
    n = x.shape[0]
    out = dict(x_in=x.contiguous(), c_noise=torch.full((n,), 500.0), encoder_hidden_states=e.contiguous())
    if NETS[net][3] is not None:
        p = d["pooled"] if w is None else torch.cat([d["neg_pooled"], d["pooled"]])
        out["text_embeds"] = p.contiguous()
        out["time_ids"] = d["time_ids"].expand(n, -1).contiguous()
    return out


def bare_torch(net: str, unet, d: dict, w: float | None, k: int):
    a = net_inputs(net, d, w)
    added = {"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]} if "text_embeds" in a else None

    def run():
        with torch.inference_mode():
            for _ in range(k):
                unet(a["x_in"], a["c_noise"], encoder_hidden_states=a["encoder_hidden_states"],
                     added_cond_kwargs=added, return_dict=False)
    return run


def bare_ort(net: str, session, d: dict, w: float | None, k: int):
    import numpy as np

    a = net_inputs(net, d, w)
    out = torch.empty_like(a["x_in"])
    b = session.io_binding()
    for inp in session.get_inputs():
        t = a[inp.name]
        b.bind_input(inp.name, "cpu", 0, np.float32, list(t.shape), t.data_ptr())
    b.bind_output(session.get_outputs()[0].name, "cpu", 0, np.float32, list(out.shape), out.data_ptr())

    def run():
        for _ in range(k):
            session.run_with_iobinding(b)
    run.buffers = (a, out)  # keep the bound buffers alive
    return run


def ort_backend(model, threads: int) -> tuple:
    """(OnnxRuntimeBackend on a session with ``threads`` intra-op threads, info dict): export through edmrt's ONNX
    cache (once), then a session of our own (the cache's has ORT's default thread count)."""
    import onnxruntime as ort
    from edmrt.backends.onnx_cache import cached_onnx
    from edmrt.backends.ort import OnnxRuntimeBackend
    from edmrt.onnx_contract import load_onnx_session

    t0 = time.perf_counter()
    path, session = cached_onnx(model, torch.device("cpu"))  # session None: exported now (else a cache hit)
    t_export = time.perf_counter() - t0
    exported = session is None
    del session
    gc.collect()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    session = load_onnx_session(path, providers=["CPUExecutionProvider"], sess_options=so, cond_inputs=model.cond)
    t_load = time.perf_counter() - t0
    files = sorted(p.name for p in Path(path).parent.iterdir() if p.name.startswith(Path(path).stem))
    size = sum((Path(path).parent / f).stat().st_size for f in files)
    info = dict(path=str(path), exported=exported, export_or_cache_s=round(t_export, 1),
                session_load_s=round(t_load, 1), files_gb=round(size / 2 ** 30, 2), peak_rss_gb=round(_peak_rss_gb(), 1))
    return OnnxRuntimeBackend(session, cond_inputs=model.cond), info


# ----------------------------------------------------------------------------- one network

class Budget:
    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.total = minutes * 60 if minutes > 0 else math.inf

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)


def run_net(net: str, batches, case_names, args, budget: Budget, net_deadline: float, result: dict) -> None:
    """Build the network, the models and backends; measure every (case, batch); append rows / notes to result."""
    from edmrt import Sampler
    from edmrt.adapters.diffusers import from_diffusers, scheduler_sigmas

    cfg, _, hw, _ = NETS[net]
    t0 = time.perf_counter()
    unet = build_unet(net)
    n_params = sum(p.numel() for p in unet.parameters())
    info = dict(network=net, params_M=round(n_params / 1e6, 1), weights_gb=round(n_params * 4 / 2 ** 30, 2),
                latent=[4, hw, hw], pixels=hw * 8, build_s=round(time.perf_counter() - t0, 1),
                unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    result["networks"].append(info)
    _log(f"[{net}] built: {info['params_M']} M params in {info['build_s']} s; MemAvailable {_mem_available_gb():.1f} GB")

    models = {c: from_diffusers(unet, scheduler(c, net), sample_shape=(4, hw, hw)) for c in case_names}
    ort_be, ort_error = None, None
    if args.skip_onnx:
        ort_error = "skipped (--skip-onnx)"
    elif net == "sdxl" and not args.sdxl_onnx:
        # The SD 1.5 export's peak RSS (torch network included) scaled to SDXL's weights: from this run when it
        # exported, else the value measured on the 2-core Xeon (8.6 GB peak RSS for 3.2 GB of weights).
        sd = next((n for n in result["networks"] if n["network"] == "sd15" and n.get("onnx", {}).get("exported")), None)
        peak, w_gb, where = ((sd["onnx"]["peak_rss_gb"], sd["weights_gb"], "in this run") if sd
                             else (SD15_EXPORT_PEAK_GB, 3.2, "measured on a 2-core Xeon, torch 2.13"))
        ratio = peak / w_gb
        need = f"~{ratio * info['weights_gb']:.0f} GB"
        why = (f" (the SD 1.5 export peaked at {peak} GB RSS, {ratio:.1f}x its {w_gb} GB of weights, torch network "
               f"included, {where})")
        ort_error = (f"skipped: memory. Exporting the SDXL UNet ({info['weights_gb']} GB of float32 weights) to ONNX "
                     f"would need {need} at its peak{why}, and the ORT session then holds another copy beside the "
                     f"torch network; this machine has {result['mem_total_gb']} GB in all, "
                     f"{_mem_available_gb():.0f} GB available. --sdxl-onnx tries it anyway")
    else:
        try:
            ort_be, oinfo = ort_backend(models[case_names[0]], args.threads)
            info["onnx"] = oinfo
            _log(f"[{net}] ONNX: {oinfo}")
        except BaseException as exc:  # recorded in the result; the torch contenders still run
            if isinstance(exc, KeyboardInterrupt):
                raise
            ort_error = _error(exc)
            _log(f"[{net}] ONNX export / session failed:\n{ort_error}")
        gc.collect()
    if ort_error is not None:
        info["onnx_error"] = ort_error

    # Cheapest first (NFE x UNet batch: lcm4 B1, lcm4 B4, dpm20 B1, dpm20 B4), so a tight budget covers most cases.
    plans = sorted(((c, B) for B in batches for c in case_names),
                   key=lambda cb: CASES[cb[0]][2] * cb[1] * (2 if CASES[cb[0]][3] is not None else 1))
    for i, (case, B) in enumerate(plans):
        sched_name, solver, steps, w = CASES[case]
        row_base = dict(network=net, latent=f"{hw}x{hw}", case=case, scheduler=sched_name, solver=solver, steps=steps,
                        guidance=w, batch=B, unet_batch=2 * B if w is not None else B)
        d = inputs(net, unet, B, seed=1000 + B)
        sched_set = scheduler(case, net, steps_set=True)
        sigmas = scheduler_sigmas(sched_set)
        try:
            smp_t = Sampler(models[case], solver=solver, steps=steps, schedule=sigmas, backend="torch", device="cpu")
            smp_o = (Sampler(models[case], solver=solver, steps=steps, schedule=sigmas, backend=ort_be, device="cpu")
                     if ort_be is not None else None)
        except BaseException as exc:  # recorded in the result
            if isinstance(exc, KeyboardInterrupt):
                raise
            result["rows"].append(dict(row_base, contender="edmrt", error=_error(exc)))
            continue
        nfe = smp_t.plan.stages
        k = min(nfe, args.bare_evals)
        fns = {"diffusers pipeline": pipeline_call(net, diffusers_pipeline(net, unet, scheduler(case, net)), d, steps, w),
               "edmrt (torch)": edmrt_call(net, smp_t, d, sched_set, w),
               "bare network (torch)": bare_torch(net, unet, d, w, k)}
        if smp_o is not None:
            fns["edmrt (onnxruntime)"] = edmrt_call(net, smp_o, d, sched_set, w)
            fns["bare network (onnxruntime)"] = bare_ort(net, ort_be.session, d, w, k)
        fns = {c: fns[c] for c in CONTENDERS if c in fns}
        scale = {c: (nfe / k if c.startswith("bare") else 1.0) for c in fns}

        # Warm-up: one evaluation of each backend at this batch (kernels and buffers for the shape; the engines are
        # built), which also prices a round.
        per_eval = {}
        for c in ("bare network (torch)", "bare network (onnxruntime)"):
            if c in fns:
                one = (bare_torch(net, unet, d, w, 1) if "torch" in c else bare_ort(net, ort_be.session, d, w, 1))
                one()
                t1 = time.perf_counter()
                one()
                per_eval[c] = time.perf_counter() - t1
        smp_t.engine(B, w is not None)
        if smp_o is not None:
            smp_o.engine(B, w is not None)
        tt, to = per_eval["bare network (torch)"], per_eval.get("bare network (onnxruntime)", 0.0)
        est = nfe * (2 * tt + to) + k * (tt + to)
        left_net = net_deadline - (time.perf_counter() - budget.t0)
        share = left_net / (len(plans) - i)
        if math.isinf(share):
            rounds = args.rounds
        else:
            rounds = min(args.rounds, max(1, int(share // est))) if est <= left_net else 0
        row_base.update(nfe=nfe, est_round_s=round(est, 1))
        _log(f"[{net}] {case} B={B}: NFE {nfe}, one eval torch {tt:.2f} s / ORT {to:.2f} s, est. {est:.0f} s a round, "
             f"{left_net:.0f} s left for this network -> {rounds} round(s)")
        if rounds == 0:
            result["rows"].append(dict(row_base, contender="(all)", skipped=(
                f"over the time budget: one round estimated at {est:.0f} s, {max(left_net, 0):.0f} s left for {net}")))
            continue

        times = {c: [] for c in fns}
        outs = {}
        for r in range(rounds):
            for c, fn in fns.items():
                t1 = time.perf_counter()
                o = fn()
                times[c].append((time.perf_counter() - t1) * scale[c])
                if r == 0 and not c.startswith("bare"):
                    outs[c] = o
        ref = outs["diffusers pipeline"]
        med = {c: statistics.median(v) for c, v in times.items()}
        for c in CONTENDERS:
            row = dict(row_base, contender=c, rounds=rounds)
            if c not in fns:
                row["error"] = ort_error
                result["rows"].append(row)
                continue
            row.update(seconds=med[c], images_per_s=B / med[c], times=[round(t, 4) for t in times[c]])
            if c.startswith("bare"):
                row["bare_evals_timed"] = k
            if c.startswith("edmrt"):
                backend = c.split("(")[1].rstrip(")")
                row["speedup_vs_diffusers"] = med["diffusers pipeline"] / med[c]
                row["overhead_vs_bare"] = med[c] / med[f"bare network ({backend})"]
                row["max_abs_diff_vs_diffusers"] = (float((outs[c] - ref).abs().max()) if w is not None else None)
            if c == "diffusers pipeline":
                row["overhead_vs_bare"] = med[c] / med["bare network (torch)"]
            result["rows"].append(row)
        _log("\n".join(table_rows([r for r in result["rows"] if r["network"] == net and r["case"] == case
                                   and r["batch"] == B])))
        del fns, outs, smp_t, smp_o
        gc.collect()
    info["peak_rss_gb"] = round(_peak_rss_gb(), 1)
    del models, ort_be, unet
    gc.collect()


# ----------------------------------------------------------------------------- report

def table_rows(rows) -> list[str]:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['network']} | {r['case']} | {r['batch']} | (all) | skipped: {r['skipped']} ||||||")
            continue
        if "seconds" not in r:
            err = (r.get("error") or "").splitlines()[0] if r.get("error") else ""
            err = err.split(". ")[0][:120] if err.startswith("skipped") else f"failed: {err[:160]}"
            out.append(f"| {r['network']} | {r['case']} | {r['batch']} | {r['contender']} | {err} (below) ||||||")
            continue
        sp = f"{r['speedup_vs_diffusers']:.3f}" if "speedup_vs_diffusers" in r else ""
        ov = f"{r['overhead_vs_bare']:.3f}" if "overhead_vs_bare" in r else ""
        ag = "" if r.get("max_abs_diff_vs_diffusers") is None else f"{r['max_abs_diff_vs_diffusers']:.1e}"
        out.append(f"| {r['network']} | {r['case']} | {r['batch']} | {r['contender']} | {r['seconds']:.2f} | "
                   f"{r['images_per_s']:.3f} | {sp} | {ov} | {ag} | {r['rounds']} |")
    return out


def gains(rows) -> list[dict]:
    """Per (network, case, batch): total gain of edmrt (ORT) over diffusers = loop gain (edmrt torch vs diffusers,
    the same torch network) x backend gain (edmrt ORT vs edmrt torch); the backend's share of the log gain."""
    out = []
    keys = dict.fromkeys((r["network"], r["case"], r["batch"]) for r in rows)  # in the table's order
    for key in keys:
        m = {r["contender"]: r["seconds"] for r in rows if (r["network"], r["case"], r["batch"]) == key and "seconds" in r}
        if "diffusers pipeline" not in m or "edmrt (torch)" not in m:
            continue
        g = dict(network=key[0], case=key[1], batch=key[2], loop_gain=m["diffusers pipeline"] / m["edmrt (torch)"])
        if "edmrt (onnxruntime)" in m:
            g["backend_gain"] = m["edmrt (torch)"] / m["edmrt (onnxruntime)"]
            g["total_gain"] = m["diffusers pipeline"] / m["edmrt (onnxruntime)"]
            if "bare network (onnxruntime)" in m:
                g["bare_backend_gain"] = m["bare network (torch)"] / m["bare network (onnxruntime)"]
            if abs(math.log(g["total_gain"])) > 1e-3:
                g["backend_share_of_log_gain"] = math.log(g["backend_gain"]) / math.log(g["total_gain"])
        out.append(g)
    return out


def markdown(result: dict) -> list[str]:
    md = [(f"# edmrt vs the diffusers pipeline on the CPU ({result['cpu']}, {result['threads']} threads for torch "
           f"and ONNX Runtime; torch {result['torch']}, diffusers {result['diffusers']}, onnxruntime "
           f"{result['onnxruntime']}; {result['date']})"), "",
          ("Random-weight float32 UNets with the real configs: SD 1.5 at 32x32 latents, SDXL base at 16x16. "
          "lcm4 = 4 LCMScheduler steps on the plain UNet (no timestep_cond), no CFG; dpm20 = 20 DPM-Solver++(2M) "
          "steps with CFG 7.5 (UNet batch 2B). diffusers = the real StableDiffusion(XL)Pipeline.__call__ (vae / text "
          "encoders None, prompt embeddings, output_type='latent'). Contenders interleaved per round, medians; "
          "bare network = NFE evaluations of the UNet (torch) or the ORT session, no sampler (the floor). "
          "speed-up = diffusers time / this; overhead = this / the bare network of the same backend "
          "(diffusers: over bare torch). " + result.get("note", "")), "",
          ("| net | case | batch | contender | s | images/s | speed-up vs diffusers | overhead vs bare | "
           "max abs diff vs diffusers | rounds |"), "|---|---|---|---|---|---|---|---|---|---|"]
    md += table_rows(result["rows"])
    if result.get("gains"):
        md += ["", ("Where the gain comes from (loop = diffusers / edmrt torch, same network; backend = edmrt torch / "
                    "edmrt ORT; total = their product; bare backend = bare torch / bare ORT):"), "",
               "| net | case | batch | loop gain | backend gain | total | bare backend gain | backend share of log gain |",
               "|---|---|---|---|---|---|---|---|"]
        for g in result["gains"]:
            def f(k, fmt=".3f", g=g):
                return format(g[k], fmt) if k in g else ""
            md.append(f"| {g['network']} | {g['case']} | {g['batch']} | {f('loop_gain')} | {f('backend_gain')} | "
                      f"{f('total_gain')} | {f('bare_backend_gain')} | {f('backend_share_of_log_gain', '.2f')} |")
    for n in result["networks"]:
        line = f"- {n['network']}: {n['params_M']} M params ({n['weights_gb']} GB fp32), built in {n['build_s']} s"
        if "onnx" in n:
            o = n["onnx"]
            how = "export" if o["exported"] else "cache hit (checks)"
            line += (f"; ONNX {how} {o['export_or_cache_s']} s, files {o['files_gb']} GB, session load "
                     f"{o['session_load_s']} s, process peak RSS after it {o['peak_rss_gb']} GB")
        if "onnx_error" in n:
            line += f"; ONNX Runtime: {n['onnx_error'].splitlines()[0][:600]}"
        md.append(line)
    for s in result.get("skipped_networks", []):
        md.append(f"- {s}")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: SD 1.5, batch 1, 1 round")
    ap.add_argument("--tiny", action="store_true", help="debugging only: tiny UNets of the same structure")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--sdxl-onnx", action="store_true", help="try the ORT export of the SDXL UNet (needs far more "
                    "memory than 24 GB)")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per case at most (default 3)")
    ap.add_argument("--budget", type=float, default=25.0, help="minutes for the whole run, 0 = none (default 25)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads and ORT intra_op_num_threads (default: the CPUs available)")
    ap.add_argument("--bare-evals", type=int, default=4, help="bare-network evaluations timed per round (scaled to NFE)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    ap.add_argument("--batch", action="append", type=int, help="only these batch sizes")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    import diffusers
    import edmrt  # noqa: F401

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version, args.skip_onnx = None, True

    nets = ["tiny-sd", "tiny-xl"] if args.tiny else ["sd15", "sdxl"]
    batches = args.batch or [1, 4]
    cases = args.case or ["lcm4", "dpm20"]
    if args.quick:
        nets, batches, args.rounds = nets[:1], [1], 1
    if args.skip_sdxl:
        nets = nets[:1]
    budget = Budget(args.budget)
    result = dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                  diffusers=diffusers.__version__, onnxruntime=ort_version,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=sys.argv[1:],
                  budget_min=args.budget, max_rounds=args.rounds, bare_evals=args.bare_evals,
                  mem_total_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
                  networks=[], rows=[], skipped_networks=[])
    weights_gb = {"sd15": 3.2, "sdxl": 9.6, "tiny-sd": 0.0, "tiny-xl": 0.0}
    for i, net in enumerate(nets):
        gc.collect()
        avail = _mem_available_gb()
        if weights_gb[net] and avail < weights_gb[net] + 3.0:
            result["skipped_networks"].append(f"{net}: skipped, {avail:.1f} GB available < {weights_gb[net]} GB of "
                                              "weights + 3 GB")
            continue
        # The first network leaves the second 40% of what is left (the budget is per run, setup included).
        frac = 0.6 if i + 1 < len(nets) else 1.0
        deadline = (time.perf_counter() - budget.t0) + budget.left() * frac
        run_net(net, batches, cases, args, budget, deadline, result)
    result["gains"] = gains(result["rows"])
    result["wall_s"] = round(time.perf_counter() - budget.t0, 1)
    result["note"] = (f"Whole run {result['wall_s'] / 60:.1f} min, budget {args.budget:g} min.")
    md = markdown(result)
    if args.out is not None or not (args.quick or args.tiny):
        out = args.out or RESULTS
        out.mkdir(parents=True, exist_ok=True)
        (out / "diffusers_cpu.json").write_text(json.dumps(result, indent=1))
        (out / "diffusers_cpu.md").write_text("\n".join(md) + "\n")
        _log(f"wrote {out / 'diffusers_cpu.json'} and .md")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
