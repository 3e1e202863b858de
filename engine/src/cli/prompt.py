"""``edmrt sample --model DIR``: a local diffusers folder, text in, PNGs out.

The conditioning comes from ``--prompt`` (the folder's own tokenizer(s) and text encoder(s), run by the diffusers
pipeline's ``encode_prompt``; needs ``transformers``) or from ``--prompt-embeds FILE.safetensors`` (no text encoder
needed).  The file holds the Model's conditioning inputs by name (``encoder_hidden_states``, ``text_embeds``,
``time_ids``, ...) or by diffusers' pipeline names (``prompt_embeds``, ``pooled_prompt_embeds``); ``negative_``
before a name gives the unconditional half (``negative_prompt_embeds``).  Each tensor is one value for all seeds
((L, D)), one row ((1, L, D)) or one row per seed.  SDXL's ``time_ids`` default to (H, W, 0, 0, H, W) in pixels,
LCM's ``timestep_cond`` to the embedding of the guidance weight (then sampled without a second, unconditional half).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from edmrt.pipelines.prompts import default_inputs, embeds_from_file

log = logging.getLogger("edmrt")


def embeds_from_prompt(folder, prompt: str, negative: str | None, guided: bool, names=None) -> tuple[dict, dict]:
    """(cond, uncond) from the folder's text encoder(s), by the diffusers pipeline's own ``encode_prompt``
    (``edmrt.pipelines.prompts.PromptEncoder``)."""
    from edmrt.pipelines.prompts import PromptEncoder

    enc = PromptEncoder(folder, names or ("encoder_hidden_states", "text_embeds"), cache=0)
    return enc.encode(prompt, negative, guided)


def save_pngs(images, seeds, outdir: Path, stem: str) -> list[Path]:
    """One PNG per seed (``STEM_SEED.png``) from (N, 3, H, W) uint8 images."""
    from PIL import Image

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, seed in zip(images, seeds):
        path = outdir / f"{stem}_{seed:06d}.png"
        Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(path)
        paths.append(path)
    return paths


def check_args(args) -> None:
    """Every argument of a folder run, before any loading."""
    if args.prompt is None and args.prompt_embeds is None:
        raise ValueError("--model DIR (a diffusers folder) needs --prompt TEXT or --prompt-embeds FILE.safetensors")
    if args.prompt is not None and args.prompt_embeds is not None:
        raise ValueError("give --prompt or --prompt-embeds, not both")
    if args.negative_prompt is not None and args.prompt is None:
        raise ValueError("--negative-prompt goes with --prompt (put negative_prompt_embeds in the --prompt-embeds file)")
    if args.prompt_embeds is not None and not Path(args.prompt_embeds).is_file():
        raise ValueError(f"--prompt-embeds {args.prompt_embeds!r} does not exist (or is not a file)")
    if args.onnx:
        raise ValueError("--onnx runs a bundled model's exported file; a diffusers folder picks its backend with --backend")


def run_folder(args, seeds: list[int]) -> int:
    """Sample a diffusers folder to PNGs (one per seed) and print images/s."""
    from tqdm import tqdm

    import edmrt
    from edmrt.request import check_guidance

    check_args(args)
    check_guidance(args.guidance)
    outdir = Path(args.output or f"{Path(args.model).name}_samples")
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"-o {str(outdir)!r} must be a folder for a diffusers model's PNGs")
    from .common import solver_choice
    from .sample import adapter_weights

    adapters = adapter_weights(args)
    model = edmrt.load(args.model, adapters=adapters, combination=args.combination) if adapters else \
        edmrt.load(args.model)
    if model.decoder is None:
        raise ValueError(f"--model {args.model!r} has no VAE (no vae in model_index.json): there would be only latents")
    names = [c.name for c in model.cond]
    guided = args.guidance is not None
    cond, uncond = (embeds_from_prompt(args.model, args.prompt, args.negative_prompt, guided, names)
                    if args.prompt is not None else embeds_from_file(args.prompt_embeds, names))
    cond, guidance = default_inputs(model, cond, args.guidance)
    steps = args.steps if args.steps is not None else 20
    learned = solver_choice(args)
    sampler = edmrt.Sampler(model, backend=args.backend, **learned) if learned else \
        edmrt.Sampler(model, solver=args.solver or "dpmpp_2m", steps=steps, backend=args.backend,
                      **({} if args.schedule is None else {"schedule": args.schedule}))
    t0, paths, n = time.perf_counter(), [], args.max_batch

    shapes = {c.name: c.shape for c in model.cond}

    def rows(d: dict, i: int, j: int) -> dict:  # per-seed rows are cut with the seeds; one value for all stays
        return {k: v[i:j] if v.ndim == len(shapes[k]) + 1 and v.shape[0] == len(seeds) > 1 else v for k, v in d.items()}
    with tqdm(total=len(seeds), disable=len(seeds) <= n, desc="sample", unit="img", dynamic_ncols=True) as bar:
        for i in range(0, len(seeds), n):
            part = seeds[i:i + n]
            kw = dict(uncond=rows(uncond, i, i + n) or None, guidance=guidance) if guidance is not None else {}
            out = sampler.sample(part, cond=rows(cond, i, i + n), output="image", **kw)
            paths += save_pngs(out, part, outdir, "sample")
            bar.update(len(part))
    dt = time.perf_counter() - t0
    print(f"sampled {len(seeds)} images from {args.model!r} with {sampler.solver}, {sampler.steps} steps"
          f"{'' if guidance is None else f', guidance {guidance}'}, backend {sampler.backend_name}: "
          f"{len(seeds) / dt:.2f} images/s ({dt:.2f} s)")
    print(f"wrote {len(paths)} PNGs to {outdir}/")
    return 0
