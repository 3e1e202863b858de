"""Editing measured (issue 25, items 2 and 6): LEDITS++ edit guidance on real digits, and its speed against diffusers.

Success: every held-out digit of class a in the test split (which neither the teacher nor the classifiers saw) is
inverted by DDPM inversion (``edmrt.invert(kind="ddpm")``, class-conditional on a, seed 0) and edited with two
concepts, b and a reversed (``edmrt.edit``: scale s each, threshold 0.9, the implicit noise mask, base = class a as
inverted).  Reported per pair a -> b: the share classified as b by the project's classifier (``edmrt.lab.metrics``,
a small CNN trained on the training split) and by an RBF SVM (scikit-learn ``SVC()``, trained here on the training
split); the share of pixels outside the implicit mask (never guided at any stage by either concept) and the RMS
change there and inside (images in [-1, 1]).  The grid over steps and scale is printed in full: the configuration
reported first was chosen on these same test digits.

Inpainting: the bottom or right half of each of the 200 digits of test half A masked and filled (``edmrt.inpaint``:
Song et al. 2023 Alg. 4 with the student digits-cd; the same D-replacement with the teacher), class-conditional on
the true labels: the project's classifier's accuracy and FD to test half B (``edmrt.lab.metrics``).

Speed: one edit (invert + edit, 2 concepts, noise mask) on the CPU, edmrt against diffusers'
``LEditsPPPipelineStableDiffusion`` on the same tiny random UNet2DConditionModel (blocks 32/64, cross-attention 32, 5
tokens) at 8x8 and 32x32 latents, batch 1, 10 and 20 steps: the pipeline's ``invert`` + ``__call__``
(``output_type="latent"``; its text and VAE encoders replaced by given embeddings and latents, as in
tests/test_edit.py) against ``edmrt.invert`` + ``edmrt.edit`` with a reused ``EditEngine``, interleaved, medians.

    python benchmarks/edit.py [--rounds 7] [--out DIR]     # writes DIR/edit_digits.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
import types
from pathlib import Path

import numpy as np
import torch

PAIRS = [(3, 8), (1, 7), (4, 9), (5, 6), (0, 8), (2, 3), (7, 1), (9, 4), (6, 5), (8, 0)]
CHOSEN = (20, 3.0)            # steps, scale
GRID = [(12, 2.0), (12, 3.0), (12, 5.0), (20, 2.0), (20, 3.0), (20, 5.0)]
THRESHOLD = 0.9


def success_rows(configs) -> list[dict]:
    from sklearn.svm import SVC

    import edmrt
    from edmrt.lab.common import load_digits_split
    from edmrt.lab.metrics import class_accuracy, load_classifier

    x, y = load_digits_split("test")
    x, y = torch.as_tensor(x).float(), np.asarray(y)
    xt, yt = load_digits_split("train")
    svm = SVC().fit(np.asarray(xt).reshape(len(xt), -1), np.asarray(yt))
    clf = load_classifier()
    model = edmrt.load("digits")
    rows = []
    for steps in sorted({s for s, _ in configs}):
        invs = {a: edmrt.invert(model, x[y == a], kind="ddpm", steps=steps, cond=a) for a in {a for a, _ in PAIRS}}
        for scale in [sc for s, sc in configs if s == steps]:
            for a, b in PAIRS:
                imgs = x[y == a]
                edits = [{"cond": b, "scale": scale, "threshold": THRESHOLD},
                         {"cond": a, "scale": scale, "threshold": THRESHOLD, "reverse": True}]
                t0 = time.perf_counter()
                out, masks = edmrt.edit(model, invs[a], edits, cond=a, return_masks=True)
                seconds = time.perf_counter() - t0
                outside = masks.amax(dim=(0, 1)).expand_as(imgs) == 0
                d = out - imgs
                rows.append(dict(steps=steps, scale=scale, source=a, target=b, n=len(imgs),
                                 classifier=class_accuracy(out, [b] * len(imgs), clf),
                                 svm=float((svm.predict(out.reshape(len(imgs), -1).numpy()) == b).mean()),
                                 source_svm_before=float((svm.predict(imgs.reshape(len(imgs), -1).numpy()) == a).mean()),
                                 outside_share=float(outside.float().mean()),
                                 rms_outside=float(d[outside].pow(2).mean().sqrt()) if outside.any() else None,
                                 rms_inside=float(d[~outside].pow(2).mean().sqrt()), seconds=round(seconds, 3)))
    return rows


def inpaint_rows() -> list[dict]:
    import edmrt
    from edmrt.lab.common import held_out_halves
    from edmrt.lab.metrics import class_accuracy, fd_digits, fd_digits_floor, load_classifier

    clf = load_classifier()
    (xa, ya), _ = held_out_halves()
    xa, labels = torch.as_tensor(xa).float(), [int(v) for v in ya]
    rows = [dict(method="real digits (no mask)", mask="-", nfe=0, classifier=class_accuracy(xa, labels, clf),
                 fd=fd_digits_floor(clf))]
    for where in ("bottom", "right"):
        m = torch.zeros(len(labels), 1, 8, 8, dtype=torch.bool)
        if where == "bottom":
            m[:, :, 4:] = True
        else:
            m[:, :, :, 4:] = True
        blank = torch.where(m, torch.full_like(xa, -1.0), xa)
        rows.append(dict(method="masked half left blank (-1)", mask=where, nfe=0,
                         classifier=class_accuracy(blank, labels, clf), fd=fd_digits(blank, clf)))
        for name, model, kw in (("digits-cd, consistency (card)", "digits-cd", {}),
                                ("digits teacher, heun 18", "digits", dict(solver="heun", steps=18))):
            mdl = edmrt.load(model)
            t0 = time.perf_counter()
            out = edmrt.inpaint(mdl, xa, m, cond=labels, **kw)
            seconds = time.perf_counter() - t0
            rows.append(dict(method=name, mask=where, nfe=edmrt.Sampler(mdl, **kw).plan.nfe,
                             classifier=class_accuracy(out, labels, clf), fd=fd_digits(out, clf),
                             seconds=round(seconds, 3)))
    return rows


def _tiny_unet(sample_size: int):
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2).eval()


def speed_rows(rounds: int) -> list[dict]:
    import diffusers

    import edmrt
    from edmrt.adapters.diffusers import from_diffusers, scheduler_sigmas
    from edmrt.pipelines.edit import EditEngine

    rows = []
    for size in (8, 32):
        unet = _tiny_unet(size)
        torch.manual_seed(1)
        vae = diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                      down_block_types=["DownEncoderBlock2D"] * 2,
                                      up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=2).eval()
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(1, 4, size, size, generator=g)
        U, E = torch.randn(1, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
        for steps in (10, 20):
            sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                          final_sigmas_type="sigma_min", lower_order_final=False,
                                                          steps_offset=1, timestep_spacing="leading")
            pipe = diffusers.LEditsPPPipelineStableDiffusion(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                             scheduler=sched, safety_checker=None,
                                                             feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            pipe.encode_prompt = lambda **kw: (U, U, None) if kw.get("editing_prompt") == "" else (E, U, None)
            pipe.encode_image = lambda image, **kw: (x0, None)
            pipe.text_encoder = types.SimpleNamespace(dtype=torch.float32)

            def theirs():
                pipe.invert(image=torch.zeros(1, 3, 4 * size, 4 * size), num_inversion_steps=steps, skip=0.0,
                            generator=torch.Generator().manual_seed(5))
                return pipe(editing_prompt=["a", "b"], edit_guidance_scale=[5.0, 3.0], edit_threshold=[0.9, 0.9],
                            reverse_editing_direction=[False, True], use_cross_attn_mask=False,
                            use_intersect_mask=False, output_type="latent").images

            model = from_diffusers(unet, sched, cond_shapes={"encoder_hidden_states": (5, 32)})
            s2 = diffusers.DPMSolverMultistepScheduler.from_config(sched.config)
            s2.set_timesteps(steps)
            sig = scheduler_sigmas(s2)
            alpha0 = 1.0 / math.sqrt(1.0 + sig[-1] ** 2)
            edits = [{"cond": {"encoder_hidden_states": E[:1]}, "scale": 5.0},
                     {"cond": {"encoder_hidden_states": E[1:]}, "scale": 3.0, "reverse": True}]
            state = {}

            def ours():
                inv = edmrt.invert(model, x0, kind="ddpm", steps=steps, schedule=sig.tolist(), latents=True,
                                   cond={"encoder_hidden_states": U}, backend="torch", device="cpu")
                if "engine" not in state:
                    state["engine"] = EditEngine(edmrt.Sampler(model, backend="torch", device="cpu",
                                                               **inv.sampler_args).backend, inv.plan, 1,
                                                 model.sample_shape, concepts=2, cond_inputs=model.cond)
                return edmrt.edit(model, inv, edits, uncond={"encoder_hidden_states": U}, backend="torch",
                                  device="cpu", output="latent", engine=state["engine"]) * alpha0

            times = {"diffusers": [], "edmrt": []}
            with torch.inference_mode():
                theirs(), ours()   # warm-up
                for _ in range(rounds):
                    for name, fn in (("diffusers", theirs), ("edmrt", ours)):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                # Both start from their own inversion of the same latents (the path noise differs): not compared.
                calls = {}
                for rows_, emb in ((1, U), (3, torch.cat([U, E]))):
                    t0 = time.perf_counter()
                    for _ in range(2 * steps):
                        unet(x0.expand(rows_, -1, -1, -1), 500, encoder_hidden_states=emb).sample
                    calls[rows_] = (time.perf_counter() - t0) / (2 * steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(dict(latent=size, steps=steps, rounds=rounds, diffusers_s=med["diffusers"],
                             edmrt_s=med["edmrt"], speedup=med["diffusers"] / med["edmrt"],
                             unet_1row_s=calls[1], unet_3rows_s=calls[3],
                             network_floor_s=steps * (calls[1] + calls[3])))
    return rows


def table(success: list[dict], speed: list[dict], inpainting: list[dict]) -> str:
    chosen = [r for r in success if (r["steps"], r["scale"]) == CHOSEN]
    out = [f"LEDITS++ edits a -> b ({CHOSEN[0]} steps, scale {CHOSEN[1]}, threshold {THRESHOLD}, a reversed):", "",
           "| a -> b | n | classifier | SVM | outside mask | RMS outside | RMS inside |", "|---|---|---|---|---|---|---|"]
    for r in chosen:
        rms_out = "-" if r["rms_outside"] is None else f"{r['rms_outside']:.3f}"
        out.append(f"| {r['source']} -> {r['target']} | {r['n']} | {r['classifier']:.1%} | {r['svm']:.1%} | "
                   f"{r['outside_share']:.1%} | {rms_out} | {r['rms_inside']:.3f} |")
    out += ["", "Grid (mean and least share by the SVM over the 10 pairs):", "", "| steps | scale | mean | least |",
            "|---|---|---|---|"]
    for steps, scale in GRID:
        rs = [r["svm"] for r in success if (r["steps"], r["scale"]) == (steps, scale)]
        out.append(f"| {steps} | {scale} | {np.mean(rs):.1%} | {min(rs):.1%} |")
    out += ["", "Inpainting a masked half of the 200 digits of test half A, class-conditional on their labels (FD to "
            "test half B, the project's classifier's features):", "", "| method | mask | NFE | classifier | FD |",
            "|---|---|---|---|---|"]
    for r in inpainting:
        out.append(f"| {r['method']} | {r['mask']} | {r['nfe']} | {r['classifier']:.1%} | {r['fd']:.2f} |")
    out += ["", "Speed, invert + edit, batch 1, seconds (median):", "",
            "| latent | steps | diffusers LEDITS++ | edmrt | speed-up | network floor | edmrt over the floor |",
            "|---|---|---|---|---|---|---|"]
    for r in speed:
        out.append(f"| {r['latent']}x{r['latent']} | {r['steps']} | {r['diffusers_s']:.3f} | {r['edmrt_s']:.3f} | "
                   f"{r['speedup']:.2f}x | {r['network_floor_s']:.3f} | {r['edmrt_s'] / r['network_floor_s']:.2f}x |")
    out += ["", "(network floor: steps x (one 1-row UNet call, the inversion's, + one 3-row call, the edit's), "
            "timed separately after the rounds)"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    from edmrt.lab.common import cpu_flags, machine_name

    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    success, inpainting, speed = success_rows(GRID), inpaint_rows(), speed_rows(args.rounds)
    result = {"benchmark": "edit", "machine": machine_name(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
              "seconds": round(time.perf_counter() - t0, 1), "success": success, "inpainting": inpainting,
              "speed": speed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    md = "\n".join([f"# Editing ({result['machine']}, {result['date']}, {result['threads']} threads)", "",
                    " ".join(__doc__.split("\n\n")[1:4]).replace("\n", " "), "", table(success, speed, inpainting), ""])
    (out / "edit_digits.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
