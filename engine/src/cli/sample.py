"""``edmrt sample``: a bundled model to a PNG grid (the main job), a local diffusers folder to PNGs (``prompt.py``), or
the exact Gaussian mixture against its ODE."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import int_list, output_path, positive_int, schedule_args, solver_choice, solver_options

HELP = ("sample a bundled model to a PNG grid (default: the digits teacher), a local diffusers folder to PNGs "
        "(--model DIR --prompt TEXT or --prompt-embeds FILE), or the exact Gaussian mixture (--model gmm) and report "
        "the error against its exact ODE")
log = logging.getLogger("edmrt")
GRID_MAX = 400  # images drawn in the PNG grid; more are sampled (and counted) but not drawn


def register(sub) -> None:
    p = sub.add_parser("sample", help=HELP)
    p.add_argument("--model", default="digits",
                   help="a bundled model (edmrt.load: digits, digits-cd), a local diffusers folder (model_index.json, "
                        "safetensors), or gmm, the exact Gaussian mixture (default digits)")
    p.add_argument("--prompt", help="diffusers folder: the text prompt (needs its tokenizer and text encoder)")
    p.add_argument("--negative-prompt", help="diffusers folder: the negative prompt (with --guidance)")
    p.add_argument("--prompt-embeds", metavar="FILE.safetensors",
                   help="diffusers folder: precomputed embeddings (prompt_embeds, negative_prompt_embeds, "
                        "pooled_prompt_embeds, ... or the model's input names) instead of --prompt")
    p.add_argument("--solver", default="heun",
                   help="a solver name (edmrt solvers), or learned:FILE, a plan JSON from edmrt fit-solver")
    schedule_args(p)
    p.add_argument("--seeds", help="bundled models: sample seeds, e.g. 0-39 (default) or 0,5,7")
    p.add_argument("--class", dest="class_", metavar="CLASSES",
                   help="bundled models: class label(s), e.g. 3 or 0-9, cycled over the seeds (default: seed index %% 10)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w (default: none, plain conditional)")
    p.add_argument("--backend", default="auto", help="auto (measured: the fastest that matches torch), auto-bf16, torch, torch-compile, onnxruntime, "
                        "openvino, openvino-bf16, tensorrt (default auto)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="bundled models: run this ONNX file (from `edmrt export onnx "
                                                       "--model NAME`) in ONNX Runtime as the network")
    p.add_argument("-o", "--output", metavar="OUT.png", help=f"bundled models: PNG grid of the first {GRID_MAX} "
                                                             "samples (default MODEL_samples.png); diffusers folder: "
                                                             "a folder for one PNG per seed (default NAME_samples/)")
    p.add_argument("--adapter", action="append", metavar="NAME_OR_PATH[=WEIGHT]",
                   help="fuse a LoRA / DoRA adapter into the model (repeatable): a bundled adapter (digits-cd-lora), a "
                        "peft adapter folder or a diffusers-format LoRA .safetensors; WEIGHT default 1.0")
    p.add_argument("--combination", default="linear",
                   help="with several --adapter: how peft combines them (linear, ties, dare_linear, dare_ties, "
                        "magnitude_prune, ...; default linear)")
    p.add_argument("--max-batch", type=positive_int, default=256,
                   help="bundled models: seeds sampled per batch (default 256); more seeds run in several batches")
    p.set_defaults(solver=None, steps=None, schedule=None)  # bundled models: the model card's (heun, 18, karras)
    p.add_argument("--batch", type=int, default=64, help="gmm: samples")
    p.add_argument("--dim", type=int, default=64, help="gmm: dimension")
    p.add_argument("--components", type=int, default=8, help="gmm: mixture components")
    p.add_argument("--seed", type=int, default=0, help="gmm: mixture and noise seed")
    p.set_defaults(fn=run)


def seed_list(args, default: str) -> list[int]:
    """``--seeds`` (or ``default``) as integers >= 0."""
    seeds = int_list(args.seeds if args.seeds is not None else default, "--seeds")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be integers >= 0, got {args.seeds!r}")
    return seeds


def adapter_weights(args) -> dict | None:
    """``--adapter`` values as {source: weight}, or None without any."""
    import math

    if not args.adapter:
        return None
    out = {}
    for item in args.adapter:
        src, sep, w = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not src or not math.isfinite(weight):
            raise ValueError(f"--adapter must be NAME_OR_PATH or NAME_OR_PATH=WEIGHT with a finite weight, got {item!r}")
        if src in out:
            raise ValueError(f"--adapter {src!r} is given twice")
        out[src] = weight
    return out


def run(args) -> int:
    if args.model == "gmm":
        return run_gmm(args)
    if Path(args.model).is_dir():
        from .prompt import run_folder

        return run_folder(args, seed_list(args, "0-3"))
    if args.prompt is not None or args.prompt_embeds is not None or args.negative_prompt is not None:
        raise ValueError(f"--prompt, --negative-prompt and --prompt-embeds need --model DIR, a diffusers folder; "
                         f"{args.model!r} is not a folder")
    return run_model(args)


def save_grid(images, labels, path, title: str = "") -> None:
    """PNG grid of (N, 1, H, W) images in [-1, 1], 10 columns, each image titled with its class."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("writing the PNG grid needs matplotlib: pip install 'edmrt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = min(10, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_title(str(int(labels[i])), fontsize=8, pad=2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def onnx_backend(path: str, model_name: str, model):
    """An ONNX Runtime backend on ``path``, checked against the model it is to run: its ``edmrt.model`` metadata
    (the name), its ``edmrt.weights_sha256`` (the weights), its sample shape and conditioning."""
    from edmrt.backends import OnnxRuntimeBackend
    from edmrt.onnx_contract import weights_sha256

    backend = OnnxRuntimeBackend(path)
    meta = backend.session.get_modelmeta().custom_metadata_map
    source, weights = meta.get("edmrt.model"), meta.get("edmrt.weights_sha256")
    if source is not None and source != model_name:
        raise ValueError(f"--onnx {path!r} holds the network of {source!r}, not of --model {model_name!r}")
    if weights is None:
        log.warning("%s does not record which weights it holds (no edmrt.weights_sha256; exported by an older edmrt?): "
                    "its weights are not checked against --model %r", path, model_name)
    elif weights != (ours := weights_sha256(model.network)):
        raise ValueError(f"--onnx {path!r} holds other weights than --model {model_name!r} (edmrt.weights_sha256 "
                         f"{weights[:16]}..., the model's {ours[:16]}...): export it again "
                         f"with `edmrt export onnx --model {model_name}`")
    if backend.sample_shape != model.sample_shape or set(backend.cond_names) != set(model.cond_names):
        raise ValueError(f"--onnx {path!r} takes samples {backend.sample_shape} "
                         f"({'conditional' if backend.conditional else 'unconditional'}); model {model_name!r} "
                         f"needs {model.sample_shape} ({'conditional' if model.num_classes else 'unconditional'})")
    return backend


def _checked(args, model) -> tuple[list[int], list[int]]:
    """(seeds, labels) of a bundled-model run, and every argument checked before any work starts."""
    from edmrt.request import check_guidance

    seeds = seed_list(args, "0-39")
    if args.class_ is not None:
        classes = int_list(args.class_, "--class")
        bad = [c for c in classes if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"--class must be in [0, {model.num_classes}), got {bad}")
        labels = [classes[i % len(classes)] for i in range(len(seeds))]
    else:
        labels = [i % model.num_classes for i in range(len(seeds))]
    check_guidance(args.guidance)  # a range, not only a number: --guidance -5 is refused here
    if args.onnx and args.backend != "auto":
        raise ValueError(f"--onnx runs the file in ONNX Runtime: drop --backend {args.backend} (or drop --onnx)")
    output_path(args.output or f"{args.model}_samples.png")
    return seeds, labels


def run_model(args) -> int:
    import torch
    from tqdm import tqdm

    import edmrt

    adapters = adapter_weights(args)
    if adapters and args.onnx:
        raise ValueError("--onnx runs a file exported from the base weights: export the adapted model instead of "
                         "combining --onnx with --adapter")
    model = edmrt.load(args.model, adapters=adapters, combination=args.combination) if adapters else \
        edmrt.load(args.model)
    seeds, labels = _checked(args, model)
    out = output_path(args.output or f"{args.model}_samples.png")
    backend = onnx_backend(args.onnx, args.model, model) if args.onnx else args.backend
    learned = solver_choice(args)
    sampler = edmrt.Sampler(model, backend=backend, **learned) if learned else \
        edmrt.Sampler(model, solver=args.solver, steps=args.steps, backend=backend, schedule=args.schedule,
                      rho=args.rho, **solver_options(args.option))
    t0 = time.perf_counter()
    chunks, n = [], args.max_batch
    with tqdm(total=len(seeds), disable=len(seeds) <= n, desc="sample", unit="img", dynamic_ncols=True) as bar:
        for i in range(0, len(seeds), n):  # a sample depends on its seed only, not on its batch
            chunks.append(sampler.sample(seeds[i:i + n], cond=labels[i:i + n], guidance=args.guidance).cpu())
            bar.update(len(chunks[-1]))
    x = torch.cat(chunks)
    dt = time.perf_counter() - t0
    backend_name = f"onnxruntime ({args.onnx})" if args.onnx else _backend_said(sampler)
    what = (f"{sampler.solver}, {sampler.steps} steps, NFE {sampler.plan.nfe}"
            f"{'' if args.guidance is None else f', guidance {args.guidance}'}, backend {backend_name}")
    shown = min(len(seeds), GRID_MAX)
    save_grid(x[:shown], labels[:shown], out, f"{args.model}: {what}")
    if adapters:
        what += ", adapters " + ", ".join(f"{k}={v:g}" for k, v in adapters.items())
    print(f"sampled {len(seeds)} images from {args.model!r} with {what}: {len(seeds) / dt:.1f} images/s ({dt:.3f} s)")
    print(f"wrote {out}" + (f" (the first {shown} of {len(seeds)} samples)" if shown < len(seeds) else ""))
    return 0


def _backend_said(sampler) -> str:
    """The backend's name; for "auto", what it picked per batch size and why (its measurement, its cache, a pin)."""
    choices = getattr(sampler.backend, "choices", None)
    if not choices:
        return sampler.backend_name
    from edmrt.backends.auto import describe_choice

    for b, c in sorted(choices.items()):
        print(f"backend {sampler.backend_name}, batch {b}: picked {c['picked']} ({c['source']}"
              f"{': ' + describe_choice(c) if c['table'] else ''})")
    picked = sorted({c["picked"] for c in choices.values()})
    return f"{sampler.backend_name} ({', '.join(picked)})"


def run_gmm(args) -> int:
    import torch

    import edmrt
    from edmrt.models import GaussianMixture

    if args.onnx:
        raise ValueError("--onnx runs a bundled model's exported network; the gmm oracle has none")
    if args.adapter:
        raise ValueError("--adapter needs a network to adapt; the gmm oracle has none")
    learned = solver_choice(args)
    solver, steps, schedule = args.solver or "heun", args.steps or 18, args.schedule or "karras"
    g = GaussianMixture.random(K=args.components, D=args.dim, seed=args.seed)
    noise = torch.randn(args.batch, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    seeds = list(range(args.seed, args.seed + args.batch))
    t0 = time.perf_counter()
    if learned:
        p = learned["plan"]
        sigmas, steps = p.sigmas, p.steps
        x = edmrt.solve(g, noise, seeds=seeds, **learned)
    else:
        sigmas = edmrt.make_sigmas(schedule, steps, args.sigma_min, args.sigma_max, args.rho)
        opts = solver_options(args.option)
        p = edmrt.plan(solver, sigmas, **opts)
        x = edmrt.solve(g, noise, solver=solver, steps=steps, schedule=schedule, sigma_min=args.sigma_min,
                        sigma_max=args.sigma_max, rho=args.rho, seeds=seeds, **opts)
    dt = time.perf_counter() - t0
    print(f"sampled {args.batch} x {args.dim}-D from a {args.components}-component Gaussian mixture "
          f"(seed {args.seed}) with {solver}, {steps} steps, NFE {p.nfe}, in {dt:.3f} s")
    if p.stochastic:
        print("stochastic solver: no single ODE endpoint to compare with")
        return 0
    t0 = time.perf_counter()
    exact = g.ode(float(sigmas[0]) * noise, float(sigmas[0]), 0.0)
    err = (x - exact).pow(2).mean(dim=1).sqrt()
    print(f"exact probability-flow ODE endpoint (scipy DOP853, rtol=atol=1e-10) in {time.perf_counter() - t0:.2f} s")
    print(f"error against it: RMSE {float(err.pow(2).mean().sqrt()):.3e}, median per-sample {float(err.median()):.3e}, "
          f"max per-sample {float(err.max()):.3e}")
    return 0
