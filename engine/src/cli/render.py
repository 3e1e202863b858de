"""``edmrt render``: many samples to files on Ray Data (``edmrt.render``): deterministic, resumable, fault-tolerant."""
from __future__ import annotations

import json
import os

from .common import int_list, positive_int, schedule_args, solver_options

HELP = "render many samples to PNG files, Parquet or WebDataset shards on Ray (resumable; --address for a cluster)"


def register(sub) -> None:
    p = sub.add_parser("render", help=HELP)
    p.add_argument("--model", default="digits", help="a bundled model (digits, digits-cd) or a local diffusers folder "
                                                    "(prompts: --requests with 'prompt', or --prompt with --seeds)")
    p.add_argument("--adapter", action="append", metavar="NAME_OR_PATH[=WEIGHT]",
                   help="fuse a LoRA / DoRA adapter (repeatable; e.g. digits-cd-lora)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="run this exported network in ONNX Runtime")
    p.add_argument("--solver")
    schedule_args(p)
    p.set_defaults(solver=None, steps=None, schedule=None)  # the model card's
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--seeds", help="seeds, e.g. 0-99999 (classes cycle over the model's, or --class)")
    work.add_argument("--requests", metavar="FILE.jsonl|FILE.csv",
                      help="one request per line / row: seed, optional class and guidance; a text model: prompt "
                           "(and negative_prompt) or embeds (a .safetensors file beside it)")
    p.add_argument("--class", dest="class_", metavar="CLASSES", help="with --seeds: class label(s) cycled over them")
    p.add_argument("--guidance", type=float, help="with --seeds: classifier-free guidance for every sample")
    p.add_argument("--prompt", help="with --seeds: a text model's prompt for every sample")
    p.add_argument("--negative-prompt", help="with --prompt: the negative prompt")
    p.add_argument("--step-counts", metavar="N,N,...", help="the step counts a --requests line may ask for ('steps'; "
                   "each is another plan in every actor)")
    p.add_argument("--sizes", metavar="HxW,...", help="the image sizes in pixels a --requests line may ask for "
                   "('height' and 'width'; each is another engine and export in every actor)")
    p.add_argument("--format", default="png", choices=["png", "parquet", "webdataset"])
    p.add_argument("--encode", default="actor", choices=["actor", "stage"], help="a text model's prompts: encoded in "
                   "each sampling actor (default) or in a Ray Data stage of its own (each distinct prompt once)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a re-run resumes it)")
    p.add_argument("--batch", type=positive_int, default=64, help="samples per chunk and per network call (64)")
    p.add_argument("--actors", type=positive_int,
                   help="actors in the pool (default: the CPUs Ray sees / --cpus-per-actor, or the GPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--backend", default="auto", help="auto (ONNX Runtime on the CPU), torch, onnxruntime, tensorrt")
    p.add_argument("--address", help="an existing Ray cluster (ray://host:10001 or auto); default a local Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)


def run(args) -> int:
    from edmrt.cli.sample import adapter_weights
    from edmrt.loading import load
    from edmrt.render import RenderJob, Requests, read_requests, render, text_inputs

    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError("edmrt render needs Ray Data: pip install 'edmrt[render]'") from None
    if args.requests and (args.class_ or args.guidance is not None or args.prompt is not None):
        raise ValueError("--class, --prompt and --guidance go with --seeds; a --requests file gives them per request")
    if args.negative_prompt is not None and args.prompt is None:
        raise ValueError("--negative-prompt goes with --prompt")
    options = solver_options(args.option)
    if args.rho != 7.0:
        options["rho"] = args.rho
    gpus = args.gpus_per_actor
    job = RenderJob(model=args.model, solver=args.solver, steps=args.steps, schedule=args.schedule, options=options,
                    backend=args.backend, onnx=args.onnx, adapters=adapter_weights(args), format=args.format,
                    batch=args.batch, device="cuda" if gpus > 0 else "cpu", encode=args.encode,
                    step_counts=int_list(args.step_counts, "--step-counts") if args.step_counts else (),
                    sizes=_sizes(args.sizes) if args.sizes else ())
    model = load(args.model)
    num_classes, text = model.num_classes, text_inputs(model)
    del model
    if args.requests:
        requests = read_requests(args.requests, num_classes, text)
    elif text:
        if args.prompt is None:
            raise ValueError(f"--model {args.model!r} takes prompts: give --prompt TEXT with --seeds, or --requests")
        seeds = int_list(args.seeds, "--seeds")
        requests = Requests.from_prompts([args.prompt] * len(seeds), seeds, [args.negative_prompt] * len(seeds),
                                         args.guidance)
    else:
        if args.prompt is not None:
            raise ValueError(f"--prompt: model {args.model!r} takes no prompts")
        classes = int_list(args.class_, "--class") if args.class_ else None
        requests = Requests.from_seeds(int_list(args.seeds, "--seeds"), num_classes, classes, args.guidance)
    actors = args.actors or _default_actors(args.cpus_per_actor, gpus, args.address)
    summary = render(job, requests, args.out, actors=actors, cpus_per_actor=args.cpus_per_actor,
                     gpus_per_actor=gpus, address=args.address, progress=not args.quiet)
    print(_report(summary, args.out))
    return 0


def _sizes(text: str) -> list[tuple[int, int]]:
    """--sizes "512x512,768x512" as [(512, 512), (768, 512)] (height x width); ValueError naming a malformed one."""
    out = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise ValueError(f"--sizes: {item.strip()!r} is not HEIGHTxWIDTH in pixels (e.g. 512x768)")
        out.append((int(h), int(w)))
    return out


def _default_actors(cpus: float, gpus: float, address: str | None) -> int:
    """One actor per GPU when actors take GPUs, else the CPUs over --cpus-per-actor (local: this machine's)."""
    if address is None:
        if gpus > 0:
            import torch

            return max(1, int(torch.cuda.device_count() / gpus))
        return max(1, int((os.cpu_count() or 1) / cpus))
    return 1


def _report(s: dict, out: str) -> str:
    if not s["chunks_rendered"]:
        return (f"nothing to do: {s['images']} images in {s['verified_chunks']} chunks of {out} verified against "
                f"their manifest ({s['seconds']:.1f} s)")
    lines = [f"rendered {s['rendered_images']} images ({s['chunks_rendered']} chunks; {s['chunks_skipped']} already "
             f"done) into {out} in {s['pipeline_s']:.1f} s: {s['images_per_s']:.1f} images/s, {s['nfe_per_s']:.0f} "
             f"NFE/s with {s['actors']} actors, batch {s['batch']}"]
    share = s["time_split_share"]
    lines.append("actors' time: " + ", ".join(f"{k.removesuffix('_s')} {100 * v:.1f}%" for k, v in share.items()
                                              if v is not None))
    if s.get("prompts_encoded"):
        lines.append(f"text encoder: {s['prompts_encoded']} prompts encoded (once per distinct prompt and actor), "
                     f"{s['time_split_s']['text_s']:.2f} s")
    for actor, a in sorted(s["per_actor"].items()):
        rate = a["images_per_s_busy"]
        lines.append(f"  actor {actor}: {a['images']} images, {rate:.1f} images/s while busy" if rate else
                     f"  actor {actor}: {a['images']} images")
    lines.append(f"all {s['images']} images verified; summary: {json.dumps(os.path.join(out, 'summary.json'))}")
    return "\n".join(lines)
