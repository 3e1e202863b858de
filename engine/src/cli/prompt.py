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

import inspect
import logging
import time
from pathlib import Path

log = logging.getLogger("edmrt")

ALIASES = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "text_embeds", "add_time_ids": "time_ids"}
LCM_DEFAULT_GUIDANCE = 8.5  # diffusers' LatentConsistencyModelPipeline default guidance_scale


def embeds_from_file(path, names) -> tuple[dict, dict]:
    """(cond, uncond) from a safetensors file of tensors named after ``names`` or their diffusers aliases."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompt-embeds {str(p)!r} does not exist")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"--prompt-embeds {str(p)!r} is not a safetensors file: {exc}") from None
    cond, uncond = {}, {}
    for key, t in tensors.items():
        neg = key.startswith("negative_")
        name = key.removeprefix("negative_")
        name = ALIASES.get(name, name)
        if name not in names:
            raise ValueError(f"--prompt-embeds: tensor {key!r} is none of the model's inputs {list(names)} "
                             f"(or their diffusers names {sorted(ALIASES)}, with negative_ for the unconditional half)")
        (uncond if neg else cond)[name] = t.float() if t.is_floating_point() else t
    return cond, uncond


def embeds_from_prompt(folder, prompt: str, negative: str | None, guided: bool) -> tuple[dict, dict]:
    """(cond, uncond) from the folder's text encoder(s), by the diffusers pipeline's own ``encode_prompt``."""
    import torch
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), unet=None, vae=None, use_safetensors=True,
                                                 local_files_only=True)
    except Exception as exc:  # missing tokenizer/text encoder, transformers not installed, ...
        raise ValueError(f"--prompt needs the folder's tokenizer and text encoder (and transformers installed); "
                         f"use --prompt-embeds instead ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{str(folder)!r} has no text encoder: use --prompt-embeds")
    params = inspect.signature(pipe.encode_prompt).parameters
    kw = dict(prompt=prompt, device=torch.device("cpu"), num_images_per_prompt=1,
              do_classifier_free_guidance=guided, negative_prompt=negative)
    with torch.inference_mode():
        out = pipe.encode_prompt(**{k: v for k, v in kw.items() if k in params})
    cond, uncond = {"encoder_hidden_states": out[0]}, {}
    if guided and out[1] is not None:
        uncond["encoder_hidden_states"] = out[1]
    if len(out) == 4:  # SDXL: pooled embeddings of the second encoder
        cond["text_embeds"] = out[2]
        if guided and out[3] is not None:
            uncond["text_embeds"] = out[3]
    return cond, uncond


def default_inputs(model, cond: dict, guidance: float | None) -> tuple[dict, float | None]:
    """SDXL's time_ids and LCM's timestep_cond when not given; returns (cond, the guidance to sample with)."""
    import torch

    from edmrt.adapters.diffusers import guidance_embedding

    names = {c.name: c for c in model.cond}
    if "time_ids" in names and "time_ids" not in cond:
        vae = getattr(model.decoder, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8  # diffusers' vae_scale_factor
        h, w = (d * scale for d in model.sample_shape[-2:])
        cond["time_ids"] = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
    if "timestep_cond" in names and "timestep_cond" not in cond:
        w = LCM_DEFAULT_GUIDANCE if guidance is None else guidance
        cond["timestep_cond"] = guidance_embedding(w - 1.0, names["timestep_cond"].shape[0])[0]
        guidance = None  # the guidance is embedded: one conditional half
    return cond, guidance


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
    from .sample import adapter_weights

    adapters = adapter_weights(args)
    model = edmrt.load(args.model, adapters=adapters, combination=args.combination) if adapters else \
        edmrt.load(args.model)
    if model.decoder is None:
        raise ValueError(f"--model {args.model!r} has no VAE (no vae in model_index.json): there would be only latents")
    names = [c.name for c in model.cond]
    guided = args.guidance is not None
    cond, uncond = (embeds_from_prompt(args.model, args.prompt, args.negative_prompt, guided) if args.prompt is not None
                    else embeds_from_file(args.prompt_embeds, names))
    cond, guidance = default_inputs(model, cond, args.guidance)
    steps = args.steps if args.steps is not None else 20
    sampler = edmrt.Sampler(model, solver=args.solver or "dpmpp_2m", steps=steps, backend=args.backend,
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
