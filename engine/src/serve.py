"""Serving on Ray Serve (``edmrt serve``): one deployment, a Sampler per replica, dynamic batching, bounded queue.

HTTP API (JSON in, PNG or JSON out):

- ``POST /v1/samples``: ``{"seeds": [..]}`` or ``{"count": n, "seed": s}`` (seeds s .. s + n - 1); ``"class"``: one
  label or one per seed (class-conditional models; default seed index % classes); ``"guidance"`` (optional);
  ``"solver"`` / ``"steps"`` from the allowed ones; ``"format"``: ``"png"`` (one image, ``image/png``), ``"json"``
  (base64 PNGs, the default) or ``"array"`` (the float samples as nested lists).
- A text model (a diffusers folder with a text encoder): ``"prompt"`` (and ``"negative_prompt"``) in place of
  ``"class"``; every replica encodes prompts with the folder's own ``encode_prompt`` (``PromptEncoder``) and keeps
  the most recent ``prompt_cache`` encodings.
- ``POST /v1/images/generations``: OpenAI's images API, so that its clients work unchanged: ``prompt``, ``n``
  (1 .. max_seeds), ``size`` ("WxH": the model's own), ``response_format`` ("b64_json"; "url" is refused: nothing is
  stored), ``model`` (optional: the served one); edmrt's extensions ``seed`` (first seed, default 0),
  ``negative_prompt``, ``guidance_scale``, ``steps``.  The answer is ``{"created": t, "data": [{"b64_json": ...}]}``.
- ``GET /healthz`` and ``GET /v1/models`` (the model, its shape and classes, the allowed solvers and limits).

Every bad request is a 400 with ``{"error": ..., "field": ...}``; an unknown path 404; over the queue bound, 503 with
``Retry-After``.  Concurrent requests are sampled together by ``@serve.batch`` (``max_batch_size``,
``batch_wait_timeout_s``): the seeds of every request in a batch with the same (solver, steps, guidance) form one
``Sampler.sample`` call.  Each sample depends only on its seed and condition (Philox per seed; ONNX Runtime on the
CPU is batch-independent bit for bit), so a request's images are the same batched or alone.

Two deployments: an ingress (HTTP, request checks, no CPU reserved) and the samplers (``--replicas``).  Each sampler
replica builds its Samplers (the ONNX export is cached, sessions opened) and samples once before it reports ready.
A sampler replica that dies under a request is replaced by Ray Serve, and the ingress sends the request again
(``retries``; the same seeds give the same images), so a client sees a 200, or a JSON 503 if every try died.  Ray is imported inside the functions (``pip install 'edmrt[serve]'``).
"""
from __future__ import annotations

import asyncio
import base64
import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ServeOptions", "SampleRequest", "parse_request", "parse_openai", "make_app", "Replica"]


@dataclass
class ServeOptions:
    """What a replica serves and its limits."""

    model: str = "digits-cd"
    adapters: dict | None = None
    solvers: tuple = ()              # allowed solvers (default: the model card's)
    max_steps: int = 64
    max_seeds: int = 64              # seeds per request
    max_batch_size: int = 64         # requests per dynamic batch
    batch_wait_timeout_s: float = 0.005
    max_queue: int = 256             # requests a replica holds at once (in flight + waiting); beyond: 503
    retry_after_s: int = 1
    threads: int = 1                 # intra-op threads per replica
    dynamic_batching: bool = True
    retries: int = 2                 # times the ingress resends a request whose sampler replica died under it
    prompt_cache: int = 256          # recent prompt encodings a replica keeps (text models)

    def __post_init__(self):
        for name in ("max_steps", "max_seeds", "max_batch_size", "max_queue", "threads", "retry_after_s",
                     "prompt_cache"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ValueError(f"retries must be an int in [0, 10], got {self.retries!r}")
        if not (0 <= self.batch_wait_timeout_s < 10):
            raise ValueError(f"batch_wait_timeout_s must lie in [0, 10), got {self.batch_wait_timeout_s!r}")
        self.solvers = tuple(self.solvers)


@dataclass
class SampleRequest:
    seeds: list
    classes: list | None
    guidance: float | None
    solver: str
    steps: int
    format: str = "json"
    prompt: str | None = None
    negative_prompt: str | None = None
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.solver, self.steps, self.guidance)


class BadRequest(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def _int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(name, f"{name} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _prompt(body, name: str, required: bool) -> str | None:
    from .pipelines.prompts import MAX_PROMPT_CHARS

    v = body.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or len(v) > MAX_PROMPT_CHARS:
        raise BadRequest(name, f"{name} must be a string of at most {MAX_PROMPT_CHARS} characters"
                         + ("" if v is not None else " (this model takes prompts)"))
    return v


def parse_request(body, opts: ServeOptions, num_classes: int, default_solver: str, default_steps: int,
                  solvers: tuple, text: bool = False) -> SampleRequest:
    """The request body (parsed JSON) as a SampleRequest; BadRequest naming the field otherwise.  ``text``: the
    model takes prompts ("prompt", "negative_prompt") instead of classes."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    fields = {"seeds", "count", "seed", "guidance", "solver", "steps", "format"} | (
        {"prompt", "negative_prompt"} if text else {"class"})
    unknown = set(body) - fields
    if unknown:
        name = sorted(unknown)[0]
        why = {"prompt": "this model takes classes, not prompts", "negative_prompt": "this model takes no prompts",
               "class": "this model takes prompts, not classes"}.get(name)
        raise BadRequest(name, why or f"unknown field(s) {sorted(unknown)}")
    if "seeds" in body:
        if "count" in body or "seed" in body:
            raise BadRequest("seeds", "give seeds, or count with seed, not both")
        seeds = body["seeds"]
        if not isinstance(seeds, list) or not 1 <= len(seeds) <= opts.max_seeds:
            raise BadRequest("seeds", f"seeds must be a list of 1 to {opts.max_seeds} integers")
        seeds = [_int(s, "seeds", 0, 2**63 - 1) for s in seeds]
    else:
        n = _int(body.get("count", 1), "count", 1, opts.max_seeds)
        base = _int(body.get("seed", 0), "seed", 0, 2**63 - 1 - n)
        seeds = list(range(base, base + n))
    cls = body.get("class")
    if num_classes:
        if cls is None:
            classes = [i % num_classes for i in range(len(seeds))]
        elif isinstance(cls, list):
            if len(cls) != len(seeds):
                raise BadRequest("class", f"class must be one label or one per seed ({len(seeds)}), got {len(cls)}")
            classes = [_int(c, "class", 0, num_classes - 1) for c in cls]
        else:
            classes = [_int(cls, "class", 0, num_classes - 1)] * len(seeds)
    elif cls is not None:
        raise BadRequest("class", "this model is unconditional: no class")
    else:
        classes = None
    guidance = body.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0 <= guidance <= 100:
            raise BadRequest("guidance", f"guidance must be a number in [0, 100] or null, got {guidance!r:.40}")
        if not num_classes and not text:
            raise BadRequest("guidance", "guidance needs a class-conditional or text-conditioned model")
        guidance = float(guidance)
    solver = body.get("solver", default_solver)
    if solver not in solvers:
        raise BadRequest("solver", f"solver must be one of {list(solvers)}, got {solver!r:.40}")
    steps = _int(body.get("steps", default_steps), "steps", 1, opts.max_steps)
    fmt = body.get("format", "json")
    if fmt not in ("png", "json", "array"):
        raise BadRequest("format", f"format must be 'png', 'json' or 'array', got {fmt!r:.40}")
    if fmt == "png" and len(seeds) != 1:
        raise BadRequest("format", "format 'png' returns one image: ask for one seed, or use 'json'")
    prompt = _prompt(body, "prompt", True) if text else None
    negative = _prompt(body, "negative_prompt", False) if text else None
    return SampleRequest(seeds, classes, guidance, solver, steps, fmt, prompt, negative)


def parse_openai(body, opts: ServeOptions, card: dict) -> SampleRequest:
    """An OpenAI ``images/generations`` body as a SampleRequest (module docstring); BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    known = {"prompt", "n", "size", "response_format", "model", "user", "quality", "style", "seed",
             "negative_prompt", "guidance_scale", "steps"}
    unknown = set(body) - known
    if unknown:
        raise BadRequest(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}")
    if not card.get("text"):
        raise BadRequest("prompt", f"model {card['model']!r} takes no prompts: use POST /v1/samples")
    if body.get("model") not in (None, card["model"]):
        raise BadRequest("model", f"this server serves {card['model']!r}, got {body['model']!r:.80}")
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise BadRequest("response_format", f"response_format must be 'b64_json' (nothing is stored to give a url), "
                                            f"got {fmt!r:.40}")
    w, h = card["image_size"]
    size = body.get("size", f"{w}x{h}")
    if size != f"{w}x{h}":
        raise BadRequest("size", f"size must be '{w}x{h}' (the model's), got {size!r:.40}")
    n = _int(body.get("n", 1), "n", 1, opts.max_seeds)
    ours = {"prompt": body.get("prompt"), "count": n, "seed": body.get("seed", 0), "format": "json"}
    for k, name in (("negative_prompt", "negative_prompt"), ("guidance_scale", "guidance"), ("steps", "steps")):
        if k in body:
            ours[name] = body[k]
    try:
        return parse_request(ours, opts, 0, card["default"]["solver"], card["default"]["steps"],
                             tuple(card["solvers"]), text=True)
    except BadRequest as exc:   # name the OpenAI field
        raise BadRequest({"count": "n", "guidance": "guidance_scale"}.get(exc.field, exc.field), str(exc)) from None


class Replica:
    """What one replica holds and does, independent of Ray: Samplers per (solver, steps), built on first use
    (the default one before the replica is ready), and the sampling of a batch of requests."""

    def __init__(self, opts: ServeOptions):
        import torch

        from .render import RenderJob, build_sampler, text_inputs

        torch.set_num_threads(opts.threads)
        self.opts = opts
        self._job = RenderJob(model=opts.model, adapters=opts.adapters)
        self.model, first = build_sampler(self._job, threads=opts.threads)
        self.default = (first.solver, first.steps)
        card = (self.model.metadata.get("sampling") or {}).get("solvers") or []
        self.solvers = tuple(opts.solvers) or tuple(dict.fromkeys([first.solver, *card]))
        self._samplers = {self.default: first}
        self.stats = {"sample_calls": 0, "requests": 0, "largest_batch": 0}  # requests per sample_many call
        self.text = text_inputs(self.model)
        self.encoder = None
        if self.text:
            from .pipelines.prompts import PromptEncoder

            self.encoder = PromptEncoder(opts.model, [c.name for c in self.model.cond], cache=opts.prompt_cache)
            first.sample([0], **self._text_cond([SampleRequest([0], None, None, *self.default, prompt="")]))
        else:   # warm: sessions, first-call costs
            first.sample([0], cond=[0] if self.model.num_classes else None)

    def sampler(self, solver: str, steps: int):
        from dataclasses import replace

        from .render import build_sampler

        key = (solver, steps)
        if key not in self._samplers:
            _, self._samplers[key] = build_sampler(replace(self._job, solver=solver, steps=steps),
                                                   threads=self.opts.threads)
        return self._samplers[key]

    def sample_many(self, reqs: list[SampleRequest]) -> list:
        """Each request's images (N, C, H, W), the requests with the same (solver, steps, guidance) in one call."""
        import torch

        out: list = [None] * len(reqs)
        self.stats["sample_calls"] += 1
        self.stats["requests"] += len(reqs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(reqs))
        groups: dict = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.key, []).append(i)
        for (solver, steps, guidance), idx in groups.items():
            seeds = [s for i in idx for s in reqs[i].seeds]
            if self.text:
                kw = self._text_cond([reqs[i] for i in idx])
            else:
                kw = dict(cond=[c for i in idx for c in reqs[i].classes] if self.model.num_classes else None,
                          guidance=guidance)
            x = self.sampler(solver, steps).sample(seeds, **kw).cpu()
            parts = torch.split(x, [len(reqs[i].seeds) for i in idx])
            for i, part in zip(idx, parts):
                out[i] = part
        return out

    def _text_cond(self, reqs: list[SampleRequest]) -> dict:
        """``Sampler.sample``'s cond / uncond / guidance for text requests of one (solver, steps, guidance): each
        request's prompt encoded (or taken from the cache), one row per seed."""
        import torch

        from .pipelines.prompts import default_inputs

        w = reqs[0].guidance
        rows = [self.encoder.encode(r.prompt, r.negative_prompt, w is not None) for r in reqs]
        reps = [len(r.seeds) for r in reqs]
        cond = {k: torch.cat([c[k].expand(n, *c[k].shape[1:]) for (c, _), n in zip(rows, reps)]) for k in rows[0][0]}
        uncond = {k: torch.cat([u[k].expand(n, *u[k].shape[1:]) for (_, u), n in zip(rows, reps)])
                  for k in rows[0][1]}
        cond, w = default_inputs(self.model, cond, w)
        return dict(cond=cond, uncond=uncond if w is not None else None, guidance=w)

    def info(self) -> dict:
        vae = getattr(self.model.decoder, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        h, w = self.model.sample_shape[-2:]
        return {"model": self.opts.model, "adapters": self.opts.adapters or {}, "text": self.text,
                "image_size": [w * scale, h * scale],
                "sample_shape": list(self.model.sample_shape), "num_classes": self.model.num_classes,
                "solvers": list(self.solvers), "default": {"solver": self.default[0], "steps": self.default[1]},
                "limits": {"max_seeds": self.opts.max_seeds, "max_steps": self.opts.max_steps,
                           "max_queue": self.opts.max_queue, "max_batch_size": self.opts.max_batch_size},
                "dynamic_batching": self.opts.dynamic_batching,
                "stats": {**self.stats, **({"prompts_encoded": self.encoder.encoded} if self.encoder else {})}}


def encode(req: SampleRequest, x, replica: Replica):
    """(body, media type) of the response."""
    from .render import to_png

    if req.format == "png":
        return to_png(x[0]), "image/png"
    meta = {"seeds": req.seeds, "class": req.classes, "guidance": req.guidance, "solver": req.solver,
            "steps": req.steps, "model": replica.opts.model,
            **({"prompt": req.prompt, "negative_prompt": req.negative_prompt} if req.prompt is not None else {})}
    if req.format == "array":
        return {**meta, "shape": list(x.shape), "data": x.numpy().astype(np.float64).tolist()}, "application/json"
    return {**meta, "images": [base64.b64encode(to_png(im)).decode() for im in x]}, "application/json"


def error(status: int, message: str, field_name: str | None = None, headers=None):
    """A JSON error response: {"error": message, "field": the request field at fault, or None}."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "field": field_name}, status_code=status, headers=headers)


def _route(request) -> tuple[str, str]:
    path, root = request.url.path, request.scope.get("root_path", "")
    path = (path[len(root):] if root and path.startswith(root) else path).rstrip("/") or "/"
    return path, request.method


def _parse(body, opts: ServeOptions, card: dict, openai: bool) -> SampleRequest:
    """A request body for /v1/samples or (``openai``) /v1/images/generations, against the sampler's card."""
    if openai:
        return parse_openai(body, opts, card)
    return parse_request(body, opts, card["num_classes"], card["default"]["solver"], card["default"]["steps"],
                         tuple(card["solvers"]), text=card.get("text", False))


def _response(out: tuple, openai: bool):
    """The HTTP response of a sampler's ("ok", body, media type): the PNG, edmrt's JSON, or OpenAI's."""
    import time

    from starlette.responses import JSONResponse, Response

    if openai:
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": im} for im in out[1]["images"]]})
    return Response(out[1], media_type=out[2]) if out[2] == "image/png" else JSONResponse(out[1])


def _sampler_deployment(opts: ServeOptions, num_replicas: int):
    """The deployment that holds a Replica per Ray Serve replica and samples (``make_app``)."""
    from ray import serve

    # The sampler answers "busy" beyond max_queue (fast: requests over the bound reach it and leave at once); Ray
    # Serve's router queue is a bounded backstop (its own 503, without Retry-After).
    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=opts.max_queue + opts.max_batch_size + 16,
                      max_queued_requests=4 * opts.max_queue + 64, ray_actor_options={"num_cpus": opts.threads})
    class EdmrtSampler:
        def __init__(self, options: dict):
            self.replica = Replica(ServeOptions(**options))
            self.in_flight = 0

        def info(self) -> dict:
            return self.replica.info()

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_timeout_s)
        async def batched(self, reqs: list) -> list:
            return await asyncio.get_running_loop().run_in_executor(None, self.replica.sample_many, reqs)

        async def alone(self, req):
            return (await asyncio.get_running_loop().run_in_executor(None, self.replica.sample_many, [req]))[0]

        async def run(self, req: SampleRequest) -> tuple:
            """("ok", body, media type), ("busy", message) or ("bad", message, field)."""
            r = self.replica
            if self.in_flight >= r.opts.max_queue:
                return "busy", f"the replica holds {self.in_flight} requests (max_queue): retry later"
            self.in_flight += 1
            try:
                x = await (self.batched(req) if r.opts.dynamic_batching else self.alone(req))
            except ValueError as exc:  # a solver / steps combination the plan builder refuses
                return "bad", str(exc), "steps"
            finally:
                self.in_flight -= 1
            return ("ok", *encode(req, x, r))

    return EdmrtSampler


def _ingress_deployment(opts: ServeOptions, num_replicas: int):
    """The deployment that answers HTTP and calls the samplers through a handle (``make_app``)."""
    from ray import serve

    ingress_queue = num_replicas * (opts.max_queue + opts.max_batch_size + 16)

    @serve.deployment(max_ongoing_requests=ingress_queue, max_queued_requests=4 * ingress_queue,
                      ray_actor_options={"num_cpus": 0})
    class EdmrtIngress:
        def __init__(self, sampler, options: dict):
            self.sampler, self.opts, self.card = sampler, ServeOptions(**options), None

        async def __call__(self, request):
            from starlette.responses import JSONResponse

            path, method = _route(request)
            if path == "/healthz" and method == "GET":
                return JSONResponse({"status": "ok"})
            if path == "/v1/models" and method == "GET":
                return JSONResponse({"models": [await self.sampler.info.remote()]})
            if path not in ("/v1/samples", "/v1/images/generations"):
                return error(404, f"no route {method} {path}; try POST /v1/samples, POST /v1/images/generations, "
                                  "GET /v1/models, GET /healthz")
            if method != "POST":
                return error(405, f"use POST {path}")
            return await self._sample(request, openai=path == "/v1/images/generations")

        async def _sample(self, request, openai: bool = False):
            from ray.exceptions import RayActorError

            try:
                body = await request.json()
            except ValueError:
                return error(400, "the body must be JSON", "body")
            if self.card is None:  # what parse_request needs, from the first sampler replica that answers
                self.card = await self.sampler.info.remote()
            c = self.card
            try:
                req = _parse(body, self.opts, c, openai)
            except BadRequest as exc:
                return error(400, str(exc), exc.field)
            retry_after = {"Retry-After": str(self.opts.retry_after_s)}
            for _ in range(self.opts.retries + 1):
                try:
                    out = await self.sampler.run.remote(req)
                except RayActorError:  # the replica died under the request: Ray Serve replaces it; send it again
                    continue
                if out[0] == "busy":
                    return error(503, out[1], headers=retry_after)
                if out[0] == "bad":
                    return error(400, out[1], out[2])
                return _response(out, openai)
            return error(503, f"the sampler replica died under this request {self.opts.retries + 1} time(s): "
                              "retry later", headers=retry_after)

    return EdmrtIngress


def make_app(opts: ServeOptions, num_replicas: int = 1):
    """The Ray Serve application: ``serve.run(make_app(opts))``.

    Two deployments: ``EdmrtSampler`` (``num_replicas``, ``opts.threads`` CPUs each) holds a Replica and samples;
    ``EdmrtIngress`` (no CPU reserved) answers HTTP, checks requests and calls a sampler through a handle.  A sampler
    replica that dies under a request is replaced by Ray Serve; the ingress sends the request again (up to
    ``opts.retries`` times: sampling is deterministic by seed, so a retry returns the same images), and answers a
    JSON 503 with Retry-After if every try died."""
    sampler = _sampler_deployment(opts, num_replicas).bind(asdict(opts))
    return _ingress_deployment(opts, num_replicas).bind(sampler, asdict(opts))
