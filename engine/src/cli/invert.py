"""``edmrt invert``: real images to the noise that samples back into them, and the reconstruction beside the original
(``edmrt.invert``; the pipeline does the work, this module parses arguments and draws)."""
from __future__ import annotations

import time

from .common import int_list, output_path, positive_int, read_pngs, held_out_digits

HELP = ("invert real images of a bundled model (PNG files, or held-out digits of the test split) with the "
        "probability-flow ODE run upward or DDPM noise maps, sample them back, and draw original | reconstruction "
        "with its error")


def register(sub) -> None:
    p = sub.add_parser("invert", help=HELP)
    p.add_argument("--model", default="digits", help="a bundled pixel model (default digits)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", action="append", metavar="IN.png",
                     help="an image of the model's size (repeatable; grayscale for digits)")
    src.add_argument("--digits", metavar="INDICES", default=None,
                     help="held-out digits of the test split by index, e.g. 0-9 (default 0-9 without --image)")
    p.add_argument("--class", dest="class_", metavar="CLASSES",
                   help="class label(s) to invert and sample under, cycled over the images (default: the test "
                        "split's labels for --digits, the null label, i.e. unconditional, for --image)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w for both directions")
    p.add_argument("--kind", choices=("ode", "ddpm"), default="ode",
                   help="ode: the probability-flow ODE run upward; ddpm: edit-friendly noise maps, an exact "
                        "reconstruction (default ode)")
    p.add_argument("--solver", default=None, help="ode: an upward solver, euler (DDIM inversion), heun, dpmpp_2m, "
                                                  "dpmpp_3m, ipndm, lms (default dpmpp_2m); ddpm: dpmpp_2m_sde "
                                                  "(default) or dpmpp_3m_sde")
    p.add_argument("--steps", type=positive_int, default=20, help="steps of the sampling schedule inverted (default 20)")
    p.add_argument("--backend", default="auto")
    p.add_argument("-o", "--output", metavar="OUT.png", default="invert.png",
                   help="PNG: original | reconstruction, two rows (default invert.png)")
    p.set_defaults(fn=run)


def _images(args, model):
    """(images (N, C, H, W) in [-1, 1], labels or None) from --image files or --digits indices."""
    return (read_pngs(args.image, *model.sample_shape), None) if args.image else held_out_digits(args.digits)


def run(args) -> int:
    import torch

    import edmrt

    from .sample import save_grid

    from edmrt.solvers import UPWARD_SOLVERS

    from edmrt.pipelines.inversion import DEFAULT_SOLVER

    args.solver = args.solver or DEFAULT_SOLVER[args.kind]
    if args.kind == "ode" and args.solver not in UPWARD_SOLVERS:   # said before the model loads
        raise ValueError(f"--solver {args.solver!r} does not run upward (an inversion); expected one of "
                         f"{list(UPWARD_SOLVERS)}")
    out = output_path(args.output)
    model = edmrt.load(args.model)
    images, labels = _images(args, model)
    if args.class_ is not None:
        given = int_list(args.class_, "--class")
        labels = [given[i % len(given)] for i in range(images.shape[0])]
    cond = labels   # None: the null label, an unconditional inversion
    t0 = time.perf_counter()
    inv = edmrt.invert(model, images, solver=args.solver, steps=args.steps, cond=cond, guidance=args.guidance,
                       backend=args.backend, kind=args.kind, progress=True)
    t1 = time.perf_counter()
    rec = edmrt.Sampler(model, backend=args.backend, **inv.sampler_args).sample(
        range(images.shape[0]), cond=cond, guidance=args.guidance, inversion=inv, progress=True)
    t2 = time.perf_counter()
    err = (rec - images).pow(2).flatten(1).mean(1).sqrt()
    shown = labels if labels is not None else [-1] * images.shape[0]
    save_grid(torch.cat([images, rec]), shown + shown, out,
              title=f"{args.model}: original (top) | reconstruction (bottom), {args.kind} {args.solver} {args.steps} steps, "
                    f"RMSE {err.mean():.3g}")
    print(f"inverted {images.shape[0]} images in {t1 - t0:.2f} s ({inv.nfe} NFE), reconstructed in {t2 - t1:.2f} s; "
          f"RMSE per image {', '.join(f'{e:.3g}' for e in err.tolist())} (mean {err.mean():.3g}, images in [-1, 1])")
    print(f"wrote {out}")
    return 0
