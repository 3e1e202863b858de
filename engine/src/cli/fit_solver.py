"""``edmrt fit-solver``: learn a solver's time steps and coefficients for one model (``edmrt.optimize_solver``) and
write its plan JSON (for ``--solver learned:FILE`` and the C ABI), its card and its loss curve."""
from __future__ import annotations

from pathlib import Path

from .common import command_line, int_list, output_path, positive_int

HELP = ("learn a solver's time steps and multistep coefficients for a model by matching its own many-step solve; "
        "writes the plan JSON (--solver learned:FILE), a card and the loss curve")


def register(sub) -> None:
    p = sub.add_parser("fit-solver", help=HELP)
    p.add_argument("--model", default="digits",
                   help="a bundled model (digits), a local diffusers folder (with --prompt or --prompt-embeds), or gmm, "
                        "the exact Gaussian mixture (default digits)")
    p.add_argument("--nfe", type=positive_int, default=4, help="network evaluations of the learned solver (default 4)")
    p.add_argument("--budget", type=positive_int, default=1_000_000,
                   help="evaluations in all, the teacher's and the backward passes included (default 1000000)")
    p.add_argument("--samples", type=positive_int, help="training noises (default: about 25 full iterations of the budget)")
    p.add_argument("--heldout", type=positive_int, default=128, help="held-out noises for early stopping (default 128)")
    p.add_argument("--history", type=positive_int, default=3, help="D values each step combines, 1-4 (default 3)")
    p.add_argument("--consistency", default="kept", choices=["kept", "relaxed"],
                   help="kept: each step's weights sum to 1 (first-order consistent); relaxed: free (S4S)")
    p.add_argument("--reference-nfe", type=positive_int, default=100, help="the teacher's steps (DPM-Solver++(3M))")
    p.add_argument("--seed", type=int, default=0, help="the fit's noise seed (default 0)")
    p.add_argument("--class", dest="class_", metavar="CLASSES",
                   help="bundled models: class labels cycled over the noises (default 0-9)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w, part of each network call")
    p.add_argument("--prompt", help="diffusers folder: the text prompt")
    p.add_argument("--negative-prompt", help="diffusers folder: the negative prompt (with --guidance)")
    p.add_argument("--prompt-embeds", metavar="FILE.safetensors", help="diffusers folder: precomputed embeddings")
    p.add_argument("--dim", type=int, default=64, help="gmm: dimension")
    p.add_argument("--components", type=int, default=8, help="gmm: mixture components")
    p.add_argument("--mixture-seed", type=int, default=0, help="gmm: the mixture's seed")
    p.add_argument("--cache", metavar="DIR", help="keep fits here by weights hash, NFE and options")
    p.add_argument("-o", "--output", metavar="FILE.json",
                   help="the plan JSON (default MODEL_nfeN.json); the card is FILE.card.json, the curve FILE_loss.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)


def _target(args):
    """(denoiser or Model, shape, cond, uncond, guidance) for --model."""
    import edmrt
    from edmrt.models import GaussianMixture

    if args.model == "gmm":
        if args.guidance is not None or args.class_ is not None or args.prompt or args.prompt_embeds:
            raise ValueError("--guidance, --class and prompts are for models with conditioning; gmm has none")
        if args.dim < 1 or args.components < 1:
            raise ValueError(f"--dim and --components must be >= 1, got {args.dim} and {args.components}")
        g = GaussianMixture.random(K=args.components, D=args.dim, seed=args.mixture_seed,
                                   spread=3.0 if args.dim > 2 else 4.0)
        return g, (args.dim,), None, None, None
    if Path(args.model).is_dir():
        from edmrt.pipelines.prompts import default_inputs, embeds_from_file

        from .prompt import check_args, embeds_from_prompt

        args.onnx = None
        check_args(args)
        model = edmrt.load(args.model)
        names = [c.name for c in model.cond]
        guided = args.guidance is not None
        cond, uncond = (embeds_from_prompt(args.model, args.prompt, args.negative_prompt, guided, names)
                        if args.prompt is not None else embeds_from_file(args.prompt_embeds, names))
        cond, guidance = default_inputs(model, cond, args.guidance)
        return model, None, cond, (uncond or None) if guidance is not None else None, guidance
    if args.prompt is not None or args.prompt_embeds is not None:
        raise ValueError(f"--prompt and --prompt-embeds need --model DIR, a diffusers folder; {args.model!r} is not one")
    model = edmrt.load(args.model)
    cond = None
    if args.class_ is not None:
        import torch

        classes = int_list(args.class_, "--class")
        if any(not 0 <= c < model.num_classes for c in classes):
            raise ValueError(f"--class must be in [0, {model.num_classes}), got {args.class_!r}")
        cond = torch.tensor(classes)
    return model, None, cond, None, args.guidance


def run(args) -> int:
    from edmrt.learned import card_path, optimize_solver
    from edmrt.lab.common import machine_name

    out = output_path(args.output or f"{Path(args.model).name}_nfe{args.nfe}.json", create=True)
    target, shape, cond, uncond, guidance = _target(args)
    opt = optimize_solver(target, args.nfe, shape, cond=cond, uncond=uncond, guidance=guidance, seed=args.seed,
                          budget=args.budget, samples=args.samples, heldout=args.heldout, history=args.history,
                          consistency=args.consistency, reference_nfe=args.reference_nfe, cache=args.cache,
                          progress=not args.quiet)
    opt.save(out)
    plot = out.with_name(out.stem + "_loss.png")
    try:
        _plot_curve(opt, plot, f"{args.model}, NFE {opt.nfe} ({machine_name()})")
    except ImportError:
        plot = "no loss plot (pip install matplotlib); the curve is in the card"
    print(f"learned a {opt.nfe}-evaluation solver for {args.model!r} in {opt.seconds:.1f} s with {opt.cost} evaluations "
          f"({opt.reference_cost} by the teacher, {opt.backward} backward): RMSE to the teacher {opt.loss:.4g} "
          f"(training), {opt.heldout_loss:.4g} (held out), from {opt.initial_loss:.4g} (DPM-Solver++(3M), Karras)")
    print("levels: " + ", ".join(f"{v:.4g}" for v in opt.sigmas))
    print(f"wrote {out} (edmrt sample --model {args.model} --solver learned:{out}), {card_path(out)} and {plot}")
    print(f"command: {command_line(args)}")
    return 0


def _plot_curve(opt, path: Path, title: str) -> None:
    """Training and held-out RMSE to the teacher against the evaluations spent (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost, train, held = zip(*opt.curve)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(cost, train, label="training")
    ax.semilogy(cost, held, label="held out")
    ax.axhline(opt.initial_loss, color="gray", ls=":", label="start: DPM-Solver++(3M), Karras")
    ax.set_xlabel("evaluations spent (teacher, forward and backward)")
    ax.set_ylabel("RMSE to the teacher")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
