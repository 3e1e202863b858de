"""``edmrt serve``: a model behind HTTP on Ray Serve (``edmrt.serve``), dynamic batching, a bounded queue."""
from __future__ import annotations

import time

from .common import positive_int

HELP = "serve a model over HTTP on Ray Serve (POST /v1/samples, GET /v1/models, GET /healthz)"


def register(sub) -> None:
    p = sub.add_parser("serve", help=HELP)
    p.add_argument("--model", default="digits-cd", help="a bundled model (default digits-cd) or a local diffusers "
                                                        "folder (requests with a prompt)")
    p.add_argument("--adapter", action="append", metavar="NAME_OR_PATH[=WEIGHT]", help="fuse a LoRA / DoRA adapter")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=positive_int, default=1)
    p.add_argument("--threads", type=positive_int, default=1, help="CPUs (intra-op threads) per replica")
    p.add_argument("--solvers", nargs="+", help="solvers a request may ask for (default: the model card's)")
    p.add_argument("--max-steps", type=positive_int, default=64)
    p.add_argument("--max-seeds", type=positive_int, default=64, help="seeds per request")
    p.add_argument("--max-batch-size", type=positive_int, default=64, help="requests per dynamic batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (ms)")
    p.add_argument("--no-batching", action="store_true", help="sample every request alone")
    p.add_argument("--max-queue", type=positive_int, default=256, help="requests per replica before 503s")
    p.add_argument("--retries", type=int, default=2, help="times a request is sent again when its sampler replica "
                   "died under it (default 2; 0: answer 503 at once)")
    p.add_argument("--prompt-cache", type=positive_int, default=256, help="recent prompt encodings a replica keeps "
                                                                          "(text models; default 256)")
    p.add_argument("--address", help="an existing Ray cluster (default: a local Ray in this process)")
    p.set_defaults(fn=run)


def run(args) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError("edmrt serve needs Ray Serve: pip install 'edmrt[serve]'") from None
    from edmrt.cli.sample import adapter_weights
    from edmrt.serve import ServeOptions, make_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in [1, 65535], got {args.port}")
    opts = ServeOptions(model=args.model, adapters=adapter_weights(args), solvers=tuple(args.solvers or ()),
                        max_steps=args.max_steps, max_seeds=args.max_seeds, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_ms / 1000, max_queue=args.max_queue,
                        threads=args.threads, dynamic_batching=not args.no_batching, retries=args.retries,
                        prompt_cache=args.prompt_cache)
    from edmrt.loading import load

    load(args.model)  # a bad model name fails here, in one line, before Ray starts
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(make_app(opts, num_replicas=args.replicas), name="edmrt", route_prefix="/")
        print(f"serving {args.model} at http://{args.host}:{args.port}: POST /v1/samples, POST "
              f"/v1/images/generations, GET /v1/models, GET /healthz (Ctrl+C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
