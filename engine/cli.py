"""The ``edmrt`` command line: ``plan``, ``sample``, ``solvers``, ``train``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

log = logging.getLogger("edmrt")

PRECOND_CHOICES = ("identity", "edm", "vp", "ve", "iddpm")


def _options(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like NAME=VALUE, got {pair!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--option {key} must be a number, got {value!r}") from None
    return out


def _schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=18, help="EDM's N: noise levels before t_N = 0 (default 18)")
    p.add_argument("--schedule", default="karras", help="schedule name (default karras)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--option", "-O", action="append", metavar="NAME=VALUE",
                   help="solver option, repeatable (e.g. -O S_churn=40)")


def cmd_plan(args) -> int:
    import edmrt
    from edmrt.precond import PRECONDS

    sigmas = edmrt.make_sigmas(args.schedule, args.steps, args.sigma_min, args.sigma_max, args.rho)
    p = edmrt.plan(args.solver, sigmas, PRECONDS[args.precond](), **_options(args.option))
    if args.json:
        p.save(args.json)
        log.info("wrote %s", args.json)
    print(p.table())
    return 0


def _int_list(text: str, what: str) -> list[int]:
    """"0-39" or "0,5,7" (or a mix: "0-3,9") -> list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ValueError(f"{what} must look like 0-39 or 0,5,7, got {text!r}") from None
    if not out:
        raise ValueError(f"{what} is empty: {text!r}")
    return out


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


def cmd_sample_model(args) -> int:
    import edmrt

    model = edmrt.load(args.model)
    seeds = _int_list(args.seeds or "0-39", "--seeds")
    if args.class_ is not None:
        classes = _int_list(args.class_, "--class")
        labels = [classes[i % len(classes)] for i in range(len(seeds))]
    else:
        labels = [i % model.num_classes for i in range(len(seeds))]
    opts = _options(args.option)
    backend = args.backend
    if args.onnx:
        from edmrt.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(args.onnx)
        source = backend.session.get_modelmeta().custom_metadata_map.get("edmrt.model")
        if source is None:
            log.warning("%s does not say which bundled model it was exported from: its weights are not checked",
                        args.onnx)
        elif source != args.model:
            raise ValueError(f"--onnx {args.onnx!r} holds the network of {source!r}, not of --model {args.model!r}")
        if backend.sample_shape != model.sample_shape or backend.conditional != (model.num_classes > 0):
            raise ValueError(f"--onnx {args.onnx!r} takes samples {backend.sample_shape} "
                             f"({'conditional' if backend.conditional else 'unconditional'}); model {args.model!r} "
                             f"needs {model.sample_shape} ({'conditional' if model.num_classes else 'unconditional'})")
    sampler = edmrt.Sampler(model, solver=args.solver, steps=args.steps, backend=backend, schedule=args.schedule,
                            rho=args.rho, **opts)
    if args.onnx:
        sampler.backend_name = f"onnxruntime ({args.onnx})"
    args.solver, args.steps = sampler.solver, sampler.steps
    t0 = time.perf_counter()
    x = sampler.sample(seeds, cond=labels, guidance=args.guidance)
    dt = time.perf_counter() - t0
    out = args.output or f"{args.model}_samples.png"
    g = "" if args.guidance is None else f", guidance {args.guidance}"
    save_grid(x.cpu(), labels, out, f"{args.model}: {args.solver}, {args.steps} steps (NFE {sampler.plan.nfe}){g}, "
                                    f"backend {sampler.backend_name}")
    print(f"sampled {len(seeds)} images from {args.model!r} with {args.solver}, {args.steps} steps, NFE "
          f"{sampler.plan.nfe}{g}, backend {sampler.backend_name}: {len(seeds) / dt:.1f} images/s ({dt:.3f} s)")
    print(f"wrote {out}")
    return 0


def cmd_sample(args) -> int:
    import torch

    import edmrt
    from edmrt.models import GaussianMixture

    if args.model != "gmm":
        return cmd_sample_model(args)
    if args.onnx:
        raise ValueError("--onnx runs a bundled model's exported network; the gmm oracle has none")
    args.solver, args.steps = args.solver or "heun", args.steps or 18
    args.schedule = args.schedule or "karras"
    g = GaussianMixture.random(K=args.components, D=args.dim, seed=args.seed)
    noise = torch.randn(args.batch, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    sigmas = edmrt.make_sigmas(args.schedule, args.steps, args.sigma_min, args.sigma_max, args.rho)
    opts = _options(args.option)
    p = edmrt.plan(args.solver, sigmas, **opts)
    seeds = list(range(args.seed, args.seed + args.batch))
    t0 = time.perf_counter()
    x = edmrt.solve(g, noise, solver=args.solver, steps=args.steps, schedule=args.schedule, sigma_min=args.sigma_min,
                    sigma_max=args.sigma_max, rho=args.rho, seeds=seeds, **opts)
    dt = time.perf_counter() - t0
    print(f"sampled {args.batch} x {args.dim}-D from a {args.components}-component Gaussian mixture "
          f"(seed {args.seed}) with {args.solver}, {args.steps} steps, NFE {p.nfe}, in {dt:.3f} s")
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


def cmd_train(args) -> int:
    import shlex

    from edmrt.quality import machine_name
    from edmrt.train import TrainOptions, train

    opts = TrainOptions(config=args.config, iters=args.iters, batch=args.batch, lr=args.lr, seed=args.seed,
                        p_uncond=args.p_uncond, ema_decay=args.ema)
    r = train(opts, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    loss = float(np.mean(r.losses[-100:])) if r.losses else float("nan")
    print(f"trained {r.options.config} for {r.step} iterations (batch {r.options.batch}, seed {r.options.seed}) in "
          f"{r.seconds:.1f} s; loss (mean of the last 100) {loss:.4f}, first 100 {np.mean(r.losses[:100]):.4f}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint}")
    if args.output:
        from edmrt.train import export_weights

        argv = args.argv if getattr(args, "argv", None) is not None else sys.argv[1:]
        card = export_weights(r, args.output, {"command": "edmrt " + shlex.join(argv), "machine": machine_name()})
        print(f"wrote {args.output} and {str(args.output).rsplit('.', 1)[0]}.json "
              f"({len(card['architecture'])} architecture fields)")
    return 0


def cmd_distill(args) -> int:
    import shlex

    from edmrt.distill import DistillOptions, distill, export_student
    from edmrt.models.bundled import load
    from edmrt.quality import machine_name

    teacher = load(args.teacher)
    opts = DistillOptions(iters=args.iters, batch=args.batch, lr=args.lr, N=args.N, mu=args.mu, ema_decay=args.ema,
                          loss=args.loss, weighting=args.weighting, seed=args.seed)
    r = distill(teacher, opts, checkpoint=args.checkpoint, resume=args.resume, progress=not args.quiet)
    loss = float(np.mean(r.losses[-100:])) if r.losses else float("nan")
    print(f"distilled {args.teacher} for {r.step} iterations (batch {r.options.batch}, N {r.options.N}, seed "
          f"{r.options.seed}) in {r.seconds:.1f} s; loss (mean of the last 100) {loss:.4f}, first 100 "
          f"{np.mean(r.losses[:100]):.4f}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint}")
    if args.output:
        from edmrt.distill import select_levels, student_model

        levels = None
        if args.max_steps > 1:
            levels = select_levels(student_model(r, teacher), max_steps=args.max_steps, progress=not args.quiet)
            print("sampling levels (by FD against the training split): " + "; ".join(
                f"{k} steps {[round(v, 4) for v in lv]}" for k, lv in levels["levels"].items()))
        argv = args.argv if getattr(args, "argv", None) is not None else sys.argv[1:]
        export_student(r, teacher, args.output, {"command": "edmrt " + shlex.join(argv), "machine": machine_name()},
                       levels)
        print(f"wrote {args.output} and {str(args.output).rsplit('.', 1)[0]}.json")
    return 0


def cmd_solvers(args) -> int:
    import edmrt
    from edmrt.solvers import solver_options

    s = edmrt.make_sigmas("karras", 10)
    rows = []
    for name in sorted(edmrt.SOLVERS):
        p = edmrt.plan(name, s)
        opts = solver_options(name)
        doc = (edmrt.SOLVERS[name].__doc__ or "").strip().splitlines()[0]
        rows.append((name, f"{p.nfe / p.steps:.2f}", ", ".join(f"{k}={v}" for k, v in opts.items()) or "-", doc))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'solver'.ljust(w[0])}  {'NFE/step (N=10)'.ljust(15)}  {'options'.ljust(w[2])}  reference")
    for r in rows:
        print(f"{r[0].ljust(w[0])}  {r[1].ljust(15)}  {r[2].ljust(w[2])}  {r[3]}")
    return 0


def cmd_quality(args) -> int:
    from pathlib import Path

    from edmrt import quality as Q

    if args.model != "gmm":
        return cmd_quality_digits(args)
    args.nfe = args.nfe or list(Q.NFES)
    names = args.solvers or list(Q.RECIPES)
    unknown = [n for n in names if n not in Q.RECIPES]
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; expected names from {sorted(Q.RECIPES)}")
    result = Q.run_quality(dims=args.dims, samples=args.samples, seed=args.seed, nfes=args.nfe,
                           recipes=[Q.RECIPES[n] for n in names], peers=args.peers, progress=not args.quiet)
    for dim in args.dims:
        print(Q.table(result, dim, "rmse"))
        print()
    paths = Q.write_results(result, Path(args.output or "quality_gmm"), make_plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_quality_digits(args) -> int:
    from pathlib import Path

    from edmrt import quality_digits as QD
    from edmrt.models.bundled import BUNDLED
    from edmrt.solvers import get_solver

    if args.model not in BUNDLED:
        raise ValueError(f"--model must be gmm or a bundled teacher ({', '.join(BUNDLED)}), got {args.model!r}")
    for name in args.solvers or ():
        get_solver(name)
    student = None if args.no_student else args.student
    result = QD.run_quality_digits(args.model, student, nfes=args.nfe or QD.NFES,
                                   solvers=args.solvers or QD.TEACHER_SOLVERS, blocks=args.blocks,
                                   progress=not args.quiet)
    paths = QD.write_results_digits(result, Path(args.output or "quality_digits"), make_plot=not args.no_plot)
    print(QD._table(result))
    print("goals: " + json.dumps(QD.goals(result)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_export_onnx(args) -> int:
    from pathlib import Path

    from edmrt.export import export_onnx
    from edmrt.models import build_unet

    from edmrt.models.bundled import read_weights

    if args.model is not None:  # a bundled model's network, with its weights
        import edmrt

        if args.weights:
            raise ValueError("--weights goes with --model-config; --model NAME exports the bundled weights")
        net = edmrt.load(args.model).network
        name = args.model
    else:
        net = build_unet(args.model_config)
        name = args.model_config
        if args.weights:  # safetensors only: never torch.load of a pickle
            read_weights(Path(args.weights), net, f"UNet config {name!r}")
        else:
            log.warning("no --weights: exporting randomly initialised weights")
    dtype = "fp16" if args.fp16 else "fp32"
    out = args.output or f"{name}_{dtype}.onnx"
    r = export_onnx(net, Path(out), dtype=dtype, batch=args.batch, opset=args.opset, verify=not args.no_verify,
                    metadata={"model": name} if args.model is not None else None)
    sig = ", ".join(f"{k} {list(v[0])} {v[1]}" for k, v in {**r.inputs, **r.outputs}.items())
    err = "not verified" if r.max_abs_err is None else \
        f"max abs err vs torch {r.max_abs_err:.3e} <= {r.tolerance:.3e} at batch {list(r.verified_batches)}"
    print(f"wrote {r.path} ({dtype}, opset {r.opset}, {r.exporter} exporter) in {r.seconds:.1f} s: {sig}; {err}")
    return 0


def cmd_export_tensorrt(args) -> int:
    from pathlib import Path

    from edmrt.export.tensorrt import EngineCache, Profile

    onnx = Path(args.onnx)
    if not onnx.is_file():
        raise ValueError(f"ONNX file not found: {onnx}")
    import onnx as onnx_lib

    try:
        m = onnx_lib.load(str(onnx), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise ValueError(f"{onnx} is not a valid ONNX model ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in m.metadata_props}
    if "edmrt.sample_shape" not in meta:
        raise ValueError(f"{onnx} is not an edmrt ONNX export (no edmrt.sample_shape metadata)")
    shape = tuple(int(v) for v in meta["edmrt.sample_shape"].strip("()[] ").split(",") if v.strip())
    profile = Profile(shape, args.min_batch, args.opt_batch, args.max_batch)
    engine = EngineCache(args.cache).get(onnx, profile, args.precision)
    print(f"TensorRT engine: {engine} (manifest beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edmrt", description="EDM sampling engine: plans, samplers, exact oracles.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print a solver's coefficient plan as a table (optionally save its JSON)")
    p.add_argument("solver")
    _schedule_args(p)
    p.add_argument("--precond", default="identity", choices=PRECOND_CHOICES,
                   help="preconditioning of the network (default identity: the network returns D)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("sample", help="sample a bundled model to a PNG grid (default: the digits teacher), or the "
                                      "exact Gaussian mixture (--model gmm) and report the error against its exact ODE")
    p.add_argument("--model", default="digits",
                   help="a bundled model (edmrt.load: digits, digits-cd) or gmm, the exact Gaussian mixture (default digits)")
    p.add_argument("--solver", default="heun")
    _schedule_args(p)
    p.add_argument("--seeds", help="bundled models: sample seeds, e.g. 0-39 (default) or 0,5,7")
    p.add_argument("--class", dest="class_", metavar="CLASSES",
                   help="bundled models: class label(s), e.g. 3 or 0-9, cycled over the seeds (default: seed index % 10)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w (default: none, plain conditional)")
    p.add_argument("--backend", default="auto", help="auto, torch, torch-compile, onnxruntime, tensorrt (default auto)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="bundled models: run this ONNX file (from `edmrt export onnx "
                                                       "--model NAME`) in ONNX Runtime as the network")
    p.add_argument("-o", "--output", metavar="OUT.png", help="bundled models: PNG grid (default MODEL_samples.png)")
    p.set_defaults(solver=None, steps=None, schedule=None)  # bundled models: the model card's (heun, 18, karras)
    p.add_argument("--batch", type=int, default=64, help="gmm: samples")
    p.add_argument("--dim", type=int, default=64, help="gmm: dimension")
    p.add_argument("--components", type=int, default=8, help="gmm: mixture components")
    p.add_argument("--seed", type=int, default=0, help="gmm: mixture and noise seed")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("quality", help="quality per NFE: every solver on the exact Gaussian mixture (default), or "
                                       "FD-digits of the bundled teacher and its distilled student (--model digits)")
    p.add_argument("--model", default="gmm", help="gmm (exact mixture, default) or digits (the bundled models)")
    p.add_argument("--student", default="digits-cd", help="digits: the distilled student run at 1-4 steps")
    p.add_argument("--no-student", action="store_true", help="digits: teacher solvers only")
    p.add_argument("--blocks", type=int, default=5, help="digits: blocks of 197 samples per configuration")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 2])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="mixture and noise seed")
    p.add_argument("--nfe", type=int, nargs="+", help="NFE budgets (gmm: 3 5 6 8 10 16 20 35; digits: 2 .. 35)")
    p.add_argument("--solvers", nargs="+", help="solver/recipe names (default: all; digits: euler heun dpmpp_2m "
                                                "ipndm unipc)")
    p.add_argument("--peers", action="store_true", help="also run the installed k-diffusion and diffusers samplers")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", help="output stem: STEM.json, STEM.md, STEM.png (default quality_gmm / "
                                          "quality_digits)")
    p.set_defaults(fn=cmd_quality)

    p = sub.add_parser("train", help="EDM training of the class-conditional UNet on scikit-learn's 8x8 digits")
    p.add_argument("--config", default="digits", help="UNet config (digits; tiny for tests)")
    p.add_argument("--iters", type=int, default=2500, help="total iterations (a resumed run continues up to it)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null label (CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (written every 500 iterations and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder up to --iters")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="write the EMA weights + OUT.json model card")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("distill", help="consistency distillation of a bundled teacher into a 1-4 step student")
    p.add_argument("--teacher", default="digits", help="a bundled model (default digits)")
    p.add_argument("--iters", type=int, default=3000, help="total iterations (a resumed run continues up to it)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--N", type=int, default=18, help="Karras discretisation levels of [sigma_min, sigma_max]")
    p.add_argument("--mu", type=float, default=0.95, help="EMA decay of the target network")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped student")
    p.add_argument("--loss", default="pseudo_huber", choices=["pseudo_huber", "l2"])
    p.add_argument("--weighting", default="uniform", choices=["uniform", "inverse_gap"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (written every 500 iterations and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder up to --iters")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="write the EMA student + OUT.json model card")
    p.add_argument("--max-steps", type=int, default=4,
                   help="with -o: choose the card's noise levels for 2..MAX_STEPS step sampling (1: Karras' levels)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("solvers", help="list the solvers")
    p.set_defaults(fn=cmd_solvers)

    export = sub.add_parser("export", help="export a model (ONNX)").add_subparsers(dest="format", required=True)
    p = export.add_parser("onnx", help="export a bundled model's network or a UNet config to ONNX with a dynamic "
                                       "batch, verified in ONNX Runtime")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a bundled model (digits, digits-cd): its network and weights")
    which.add_argument("--model-config", choices=("tiny", "digits", "cifar10"), help="a UNet config (with --weights)")
    p.add_argument("--weights", metavar="FILE.safetensors", help="weights (safetensors only; default: random)")
    p.add_argument("--fp16", action="store_true", help="float16 inside, float32 inputs and output")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="default NAME_fp32.onnx / NAME_fp16.onnx")
    p.add_argument("--batch", type=int, default=2, help="batch of the traced example (>= 2; the file's batch is dynamic)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")
    p.set_defaults(fn=cmd_export_onnx)
    p = export.add_parser("tensorrt", help="build (or fetch from the cache) a TensorRT engine from an edmrt ONNX file")
    p.add_argument("onnx", help="an ONNX file written by `edmrt export onnx`")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--cache", help="cache root (default $EDMRT_CACHE or ~/.cache/edmrt)")
    p.set_defaults(fn=cmd_export_tensorrt)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        print(f"edmrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
