"""LoRA adapters on the CPU: what a fused adapter costs per network evaluation, and what a swap costs against a rebuild.

Network: a diffusers UNet2DConditionModel (block_out_channels (64, 128, 256), 1 layer per block, cross-attention
dim 128, 16x16x4 latents, 16 text tokens, batch 1); three peft LoRA adapters (rank 8, alpha 16, attention + conv
layers, random non-zero A and B: ``init_lora_weights=False``) saved with ``save_pretrained`` to a temp dir and
loaded with ``edmrt.adapters.lora.load_adapter``.

1. Per network evaluation (interleaved rounds, medians): the base UNet; the same UNet with edmrt's fused weights
   in its parameters (``AdapterSet.apply``: plain layers); peft's unmerged model (LoRA layers active, not merged).
2. Swap vs rebuild, torch and ONNX Runtime backends: ``Sampler.set_adapters(weights)`` (fuse + in-place copy;
   ONNX Runtime: the adapter targets are graph inputs bound to the live parameters) against a rebuild that gives
   the same weights: a fresh copy of the network with the fused weights loaded, a new ``Sampler`` and its first
   1-step sample (ONNX Runtime: that includes the export and the new session, ``EDMRT_CACHE`` pointed at an empty
   temp dir before each rebuild, so every rebuild is a cache miss).  The fused-weight computation is inside both.
3. Unfuse error: max |param - base| over every parameter after ``set_adapters(None)`` (expected 0), and the
   output after a swap against the torch-fused reference.

Writes benchmarks/results/adapters_cpu.{json,md}.

    python benchmarks/adapters_cpu.py [--rounds 7] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS, DIM = 16, 128
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]
RANK, ALPHA = 8, 16
SWAPS = [("a=1", {"a": 1.0}), ("a=0.6+c=0.4 (linear)", {"a": 0.6, "c": 0.4})]


def make_unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=DIM, attention_head_dim=8, norm_num_groups=32).eval().requires_grad_(False)


def peft_adapter(base, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    return pm.eval()


def wrap(unet):
    from edmrt.adapters.diffusers import from_diffusers

    return from_diffusers(unet, {"_class_name": "EulerDiscreteScheduler"},
                          cond_shapes={"encoder_hidden_states": (TOKENS, DIM)})


def loaded_model(base, folders):
    from edmrt.adapters.lora import load_adapter

    model = wrap(copy.deepcopy(base))
    for name, folder in folders.items():
        aset = load_adapter(model, folder, name)
    return model, aset


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def per_nfe(base, model, aset, pm, rounds, reps):
    """Base vs edmrt-fused vs peft-unfused network evaluations, interleaved rounds."""
    torch.manual_seed(5)
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, TOKENS, DIM)
    aset.apply({"a": 1.0})
    fused_unet = model.network.unet

    def run(m):
        with torch.inference_mode():
            return m(x, t, encoder_hidden_states=e, return_dict=False)[0]

    fns = {"base": lambda: run(base), "edmrt fused (a=1)": lambda: run(fused_unet),
           "peft unfused (a=1, LoRA layers active)": lambda: run(pm)}
    outs = {k: fn() for k, fn in fns.items()}
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = outs["peft unfused (a=1, LoRA layers active)"]
    rows = []
    for k in fns:
        rows.append(dict(case=k, ms=med[k] * 1e3, min_ms=min(times[k]) * 1e3, max_ms=max(times[k]) * 1e3,
                         vs_base=med[k] / med["base"],
                         max_abs_diff_vs_peft=float((outs[k] - ref).abs().max()),
                         max_abs_out=float(ref.abs().max())))
    aset.restore()
    return rows


def swap_vs_rebuild(base, folders, backend, repeats, cache_root):
    """set_adapters on a warm Sampler vs (fused copy + new Sampler + first 1-step sample), ``repeats`` each."""
    from edmrt import Sampler

    torch.manual_seed(7)
    cond = {"encoder_hidden_states": torch.randn(TOKENS, DIM)}
    seeds = [0]

    def fresh_cache():
        os.environ["EDMRT_CACHE"] = tempfile.mkdtemp(dir=cache_root)

    fresh_cache()
    model, aset = loaded_model(base, folders)
    t_build, smp = timed(lambda: Sampler(model, solver="euler", steps=1, backend=backend))
    t_first, _ = timed(lambda: smp.sample(seeds, cond))
    base_params = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    warm = []
    for _ in range(3):
        warm.append(timed(lambda: smp.sample(seeds, cond))[0])
    warm_sample = statistics.median(warm)

    # torch-fused references (plain copies, torch eager) for the output check
    refs = {}
    for label, w in SWAPS:
        fused = aset.fused_weights(w)
        ref_model = wrap(copy.deepcopy(base))
        params = dict(ref_model.network.named_parameters())
        with torch.no_grad():
            for n, v in fused.items():
                params[n].copy_(v)
        refs[label] = Sampler(ref_model, solver="euler", steps=1, backend="torch").sample(seeds, cond)

    rows = []
    for label, w in SWAPS:
        swaps, rebuilds, out_err, swap_vs_rebuild_err = [], [], [], []
        for _ in range(repeats):
            # swap: in place, then the next sample sees it
            smp.set_adapters(None)
            dt, _ = timed(lambda: smp.set_adapters(w))
            swaps.append(dt)
            out = smp.sample(seeds, cond)
            out_err.append(float((out - refs[label]).abs().max()))
            # rebuild: a fresh network with the fused weights, a new Sampler, its first sample (copy not timed)
            fresh_net = copy.deepcopy(base)
            fresh_cache()

            def rebuild():
                fused = aset.fused_weights(w)
                m = wrap(fresh_net)
                params = dict(m.network.named_parameters())
                with torch.no_grad():
                    for n, v in fused.items():
                        params[n].copy_(v)
                s = Sampler(m, solver="euler", steps=1, backend=backend)
                return s.sample(seeds, cond)
            dt, out_r = timed(rebuild)
            rebuilds.append(dt)
            out_err.append(float((out_r - refs[label]).abs().max()))
            swap_vs_rebuild_err.append(float((out - out_r).abs().max()))  # the same backend, swapped vs rebuilt
        sw, rb = statistics.median(swaps), statistics.median(rebuilds)
        rows.append(dict(backend=backend, weights=label, repeats=repeats, swap_s=sw, swap_all_s=swaps,
                         rebuild_s=rb, rebuild_all_s=rebuilds, rebuild_minus_warm_sample_s=rb - warm_sample,
                         warm_1step_sample_s=warm_sample, swap_over_rebuild=sw / rb,
                         max_abs_out_diff_vs_torch_fused=max(out_err),
                         max_abs_out_diff_swap_vs_rebuild=max(swap_vs_rebuild_err),
                         max_abs_out=float(refs[label].abs().max())))
    smp.set_adapters(None)
    unfuse = max(float((p - base_params[n]).abs().max()) for n, p in model.network.named_parameters())
    bit = all(torch.equal(p, base_params[n]) for n, p in model.network.named_parameters())
    orig = dict(base.named_parameters())
    unfuse_vs_orig = max(float((p - orig[n.removeprefix("unet.")]).abs().max())
                         for n, p in model.network.named_parameters())
    base_out = Sampler(wrap(copy.deepcopy(base)), solver="euler", steps=1, backend="torch").sample(seeds, cond)
    out_after = smp.sample(seeds, cond)
    unf = dict(backend=backend, max_abs_param_diff=max(unfuse, unfuse_vs_orig), bit_for_bit=bit,
               targets=len(aset.targets), params=len(base_params),
               max_abs_out_diff_vs_base=float((out_after - base_out).abs().max()),
               initial_build_s=t_build, initial_first_sample_s=t_first)
    return rows, unf


def markdown(r: dict) -> list[str]:
    md = [f"# LoRA adapters on the CPU ({r['machine']}, torch {r['torch']}, peft {r['peft']}, diffusers "
          f"{r['diffusers']}, onnxruntime {r['onnxruntime']}, {r['date']})", "",
          f"UNet2DConditionModel {r['network']['block_out_channels']}, {r['network']['params_M']:.1f}M params, "
          f"latents {r['network']['latent']}, {TOKENS} tokens, batch 1; {len(r['adapters'])} LoRA adapters rank "
          f"{RANK} on {', '.join(TARGETS)} ({r['network']['lora_targets']} target weights).", "",
          f"## Per network evaluation ({r['rounds']} interleaved rounds x {r['reps']} evaluations, medians)", "",
          "| network | ms | min-max ms | vs base | max abs diff vs peft (max abs out) |", "|---|---|---|---|---|"]
    for x in r["per_nfe"]:
        md.append(f"| {x['case']} | {x['ms']:.2f} | {x['min_ms']:.2f}-{x['max_ms']:.2f} | {x['vs_base']:.3f} | "
                  f"{x['max_abs_diff_vs_peft']:.1e} ({x['max_abs_out']:.2f}) |")
    md += ["", f"## Swap (`Sampler.set_adapters`) vs rebuild (fused copy + new Sampler + first 1-step sample; "
               f"ONNX Runtime: export + session on an empty EDMRT_CACHE), medians of {r['repeats']}", "",
           "| backend | weights | swap ms | rebuild ms | swap / rebuild | warm 1-step sample ms | "
           "max abs out diff vs torch-fused (max abs out) | swapped vs rebuilt, same backend |",
           "|---|---|---|---|---|---|---|---|"]
    for x in r["swap"]:
        md.append(f"| {x['backend']} | {x['weights']} | {x['swap_s'] * 1e3:.1f} | {x['rebuild_s'] * 1e3:.1f} | "
                  f"{x['swap_over_rebuild'] * 100:.1f}% | {x['warm_1step_sample_s'] * 1e3:.1f} | "
                  f"{x['max_abs_out_diff_vs_torch_fused']:.1e} ({x['max_abs_out']:.1f}) | "
                  f"{x['max_abs_out_diff_swap_vs_rebuild']:.1e} |")
    md += ["", "## Unfuse (`set_adapters(None)` after the swaps)", "",
           "| backend | max abs param diff vs base | bit for bit | max abs out diff vs base network |",
           "|---|---|---|---|"]
    for x in r["unfuse"]:
        md.append(f"| {x['backend']} | {x['max_abs_param_diff']:.1e} | {x['bit_for_bit']} | "
                  f"{x['max_abs_out_diff_vs_base']:.1e} |")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps, args.repeats = 2, 2, 1
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("edmrt").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    import diffusers
    import onnxruntime
    import peft

    from edmrt.lab.common import machine_name

    tmp = Path(tempfile.mkdtemp(prefix="edmrt-adapters-bench-"))
    old_cache = os.environ.get("EDMRT_CACHE")
    try:
        base = make_unet()
        pms = {k: peft_adapter(base, s) for k, s in (("a", 1), ("b", 2), ("c", 3))}
        folders = {}
        for k, pm in pms.items():
            pm.save_pretrained(str(tmp / k))
            folders[k] = tmp / k
        model, aset = loaded_model(base, folders)
        result = dict(machine=machine_name(), platform=platform.platform(), python=platform.python_version(),
                      torch=torch.__version__, peft=peft.__version__, diffusers=diffusers.__version__,
                      onnxruntime=onnxruntime.__version__, threads=torch.get_num_threads(),
                      date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rounds=args.rounds, reps=args.reps,
                      repeats=args.repeats, adapters=list(folders),
                      network=dict(block_out_channels=[64, 128, 256], layers_per_block=1, cross_attention_dim=DIM,
                                   latent=[4, 16, 16], tokens=TOKENS, batch=1,
                                   params_M=sum(p.numel() for p in base.parameters()) / 1e6,
                                   lora_targets=len(aset.targets), lora_rank=RANK, lora_alpha=ALPHA,
                                   target_modules=TARGETS),
                      load_average_at_start=list(os.getloadavg()), cpus=os.cpu_count(),
                      cache_note="EDMRT_CACHE set to a fresh empty temp dir before every build: every ONNX "
                                 "rebuild is a cache miss (export + session)")
        result["per_nfe"] = per_nfe(base, model, aset, pms["a"], args.rounds, args.reps)
        print("\n".join(markdown({**result, "swap": [], "unfuse": []})[4:]), file=sys.stderr, flush=True)
        result["swap"], result["unfuse"] = [], []
        for backend in ("torch", "onnxruntime"):
            rows, unf = swap_vs_rebuild(base, folders, backend, args.repeats, tmp)
            result["swap"] += rows
            result["unfuse"].append(unf)
            print(f"{backend}: " + "; ".join(f"{x['weights']} swap {x['swap_s']*1e3:.1f} ms rebuild "
                                              f"{x['rebuild_s']*1e3:.1f} ms" for x in rows)
                  + f"; unfuse {unf['max_abs_param_diff']}", file=sys.stderr, flush=True)
    finally:
        if old_cache is None:
            os.environ.pop("EDMRT_CACHE", None)
        else:
            os.environ["EDMRT_CACHE"] = old_cache
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_at_end"] = list(os.getloadavg())
    md = markdown(result)
    md += ["", f"Load average at start / end: {result['load_average_at_start'][0]:.2f} / "
               f"{result['load_average_at_end'][0]:.2f} on {result['cpus']} CPUs (another process shared the "
               "machine: absolute torch times are inflated and noisy)."]
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "adapters_cpu.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "adapters_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
