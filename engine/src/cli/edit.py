"""``edmrt edit``: a real image edited towards a class or a prompt, and a before | after picture.

Without a mask: LEDITS++ (``edmrt.invert(kind="ddpm")``, then ``edmrt.edit`` with the target as the edit concept and
the source, when known, reversed).  With ``--mask`` (a PNG, white = regenerate) or ``--mask-half``: zero-shot
inpainting (``edmrt.inpaint``: Song et al. 2023, Alg. 4) of the masked region under the target.  Bundled models take
``--class``; a diffusers folder takes ``--prompt`` (its own tokenizer and text encoder) and RGB images at its pixel
size, which its VAE encodes.  The pipelines do the work; this module parses arguments and draws.
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import output_path, positive_int, read_pngs, held_out_digits

HELP = ("edit real images towards a class (bundled models) or a prompt (a diffusers folder): LEDITS++ along a DDPM "
        "inversion, or with --mask zero-shot inpainting; writes before | after")
HALVES = ("bottom", "top", "left", "right")


def register(sub) -> None:
    p = sub.add_parser("edit", help=HELP)
    p.add_argument("--model", default="digits", help="a bundled model (digits, digits-cd) or a local diffusers folder "
                                                     "(default digits)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", action="append", metavar="IN.png", help="an image of the model's size (repeatable)")
    src.add_argument("--digits", metavar="INDICES", help="bundled digits models: held-out digits of the test split by "
                                                         "index, e.g. 0-9 (default without --image)")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask", metavar="MASK.png", help="inpaint: white (>= 128) is regenerated, black kept; the "
                                                         "images' size")
    mask.add_argument("--mask-half", choices=HALVES, help="inpaint this half of every image")
    tgt = p.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--class", dest="class_", metavar="CLASS", type=int, help="bundled models: the target class")
    tgt.add_argument("--prompt", help="diffusers folder: the edit prompt (the target)")
    p.add_argument("--source-class", type=int, help="bundled models: the images' class, inverted under and reversed "
                                                    "in the edit (default: the test split's labels for --digits)")
    p.add_argument("--source-prompt", default="", help="diffusers folder: the images' prompt (default empty)")
    p.add_argument("--steps", type=positive_int, default=20, help="inversion / edit steps (default 20; inpainting: "
                                                                  "the model card's solver and steps unless given)")
    p.add_argument("--scale", type=float, default=3.0, help="edit guidance scale per concept (default 3)")
    p.add_argument("--threshold", type=float, default=0.9, help="the implicit mask's quantile (default 0.9)")
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--output", metavar="OUT.png", default="edit.png",
                   help="PNG: before (top) | after (bottom) (default edit.png)")
    p.set_defaults(fn=run)


def _mask(args, images):
    import numpy as np
    import torch
    from PIL import Image

    H, W = images.shape[-2:]
    if args.mask:
        img = Image.open(args.mask).convert("L")
        if img.size != (W, H):
            raise ValueError(f"--mask {args.mask!r} is {img.size[0]}x{img.size[1]}; the images are {W}x{H}")
        return torch.from_numpy(np.asarray(img) >= 128)
    m = torch.zeros(H, W, dtype=torch.bool)
    sl = {"bottom": (slice(H // 2, None), slice(None)), "top": (slice(None, H // 2), slice(None)),
          "left": (slice(None), slice(None, W // 2)), "right": (slice(None), slice(W // 2, None))}[args.mask_half]
    m[sl] = True
    return m


def run(args) -> int:
    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold must be a quantile in [0, 1), got {args.threshold}")
    out = output_path(args.output)
    folder = Path(args.model).is_dir()
    if folder != (args.prompt is not None):
        raise ValueError("--prompt is for a diffusers folder (--model DIR), --class for a bundled model")
    return _run_folder(args, out) if folder else _run_bundled(args, out)


def _run_bundled(args, out) -> int:
    import torch

    import edmrt

    from .sample import save_grid

    model = edmrt.load(args.model)
    C, H, W = model.sample_shape
    images, source = (read_pngs(args.image, C, H, W), None) if args.image else held_out_digits(args.digits)
    if args.source_class is not None:
        source = [args.source_class] * images.shape[0]
    target = [args.class_] * images.shape[0]
    t0 = time.perf_counter()
    if args.mask or args.mask_half:
        result = edmrt.inpaint(model, images, _mask(args, images), cond=target, backend=args.backend,
                               progress=True)
        what = f"inpainted as class {args.class_}"
    else:
        inv = edmrt.invert(model, images, kind="ddpm", steps=args.steps, cond=source, backend=args.backend,
                           progress=True)
        edits = [{"cond": args.class_, "scale": args.scale, "threshold": args.threshold}]
        if source is not None:
            edits.append({"cond": source, "scale": args.scale, "threshold": args.threshold, "reverse": True})
        result = edmrt.edit(model, inv, edits, cond=source, backend=args.backend, progress=True)
        what = f"edited towards class {args.class_} (LEDITS++, {args.steps} steps, scale {args.scale})"
    seconds = time.perf_counter() - t0
    shown = source if source is not None else [-1] * images.shape[0]
    save_grid(torch.cat([images, result]), shown + target, out,
              title=f"{args.model}: original (top) | {what} (bottom)")
    print(f"{images.shape[0]} images {what} in {seconds:.2f} s; wrote {out}")
    return 0


def _run_folder(args, out) -> int:
    import numpy as np
    import torch
    from PIL import Image

    import edmrt

    from .prompt import embeds_from_prompt

    if args.image is None:
        raise ValueError("a diffusers folder edits --image files (RGB, the model's pixel size)")
    model = edmrt.load(args.model)
    if model.decoder is None or not callable(getattr(model.decoder, "encode", None)):
        raise ValueError(f"--model {args.model!r} has no VAE (no vae in model_index.json): images cannot be encoded")
    if [c.name for c in model.cond if c.null is None] != ["encoder_hidden_states"]:
        raise ValueError(f"--model {args.model!r}: edmrt edit takes Stable Diffusion 1.x / 2.x folders (one text input)")
    _, h, w = model.sample_shape
    scale = 2 ** (len(model.decoder.vae.config.block_out_channels) - 1)
    images = read_pngs(args.image, 3, h * scale, w * scale)
    N = images.shape[0]
    concept, uncond = embeds_from_prompt(args.model, args.prompt, "", True)
    rows = lambda d: {k: v.expand(N, *v.shape[1:]) for k, v in d.items()}   # noqa: E731
    base = None
    if args.source_prompt:
        base, _ = embeds_from_prompt(args.model, args.source_prompt, "", True)
        base = rows(base)
    t0 = time.perf_counter()
    if args.mask or args.mask_half:
        result = edmrt.inpaint(model, images, _mask(args, images), cond=rows(concept), backend=args.backend,
                               solver="dpmpp_2m", steps=args.steps, progress=True)
    else:
        inv = edmrt.invert(model, images, kind="ddpm", steps=args.steps, cond=base or rows(uncond),
                           backend=args.backend, progress=True)
        edits = [{"cond": rows(concept), "scale": args.scale, "threshold": args.threshold}]
        if base is not None:
            edits.append({"cond": base, "scale": args.scale, "threshold": args.threshold, "reverse": True})
        result = edmrt.edit(model, inv, edits, cond=base, uncond=rows(uncond), backend=args.backend,
                            output="image", progress=True)
    seconds = time.perf_counter() - t0
    before = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.cat([torch.cat(list(before), dim=2), torch.cat(list(result), dim=2)], dim=1)   # (3, 2H, N W)
    Image.fromarray(grid.permute(1, 2, 0).numpy().astype(np.uint8)).save(out)
    print(f"{N} images edited towards {args.prompt!r} in {seconds:.2f} s; wrote {out} (before top, after bottom)")
    return 0
