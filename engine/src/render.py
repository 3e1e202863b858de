"""Offline rendering at scale on Ray Data (``edmrt render``): deterministic, resumable, fault-tolerant.

The work is a list of requests (index, seed, class label or prompt, guidance), from a seed range or a JSONL / CSV
file, cut
into chunks of ``batch`` consecutive requests (chunk k holds requests k*batch .. k*batch + batch - 1).  The chunks
still to do form a Ray Data dataset, one chunk per block; ``map_batches`` runs them on an actor pool, each actor
holding one ``Sampler`` built once (and its exported network); Ray Data's writer API (``write_datasink``) writes
every chunk through ``ChunkSink``, in one of three formats:

- ``png``: one file per image, ``images/NNNNN/IIIIIIIII.png`` (index I, folder I // 10000), a prompt in its
  ``prompt`` / ``negative_prompt`` text chunks;
- ``parquet``: one file per chunk, ``parquet/chunk-KKKKKKK.parquet``: index, seed, class_label, guidance (and
  prompt, negative_prompt for a text model), the PNG bytes, and the job (model weights' sha256, solver, steps,
  sigmas) in the file's metadata;
- ``webdataset``: one tar shard per chunk, ``webdataset/chunk-KKKKKKK.tar``: ``IIIIIIIII.png`` + ``IIIIIIIII.json``
  per sample (deterministic tar headers: the same images give the same bytes).

Per-request size and steps: a request may ask for ``steps`` and an image ``height`` / ``width`` (pixels) from the
sets the job allows (``RenderJob.step_counts``, ``RenderJob.sizes``: each is another plan or sample shape, so another
engine and export in every actor); 0 is the job's own.  A latent model's size is its VAE's pixels (the latents
are the size over the VAE's scale factor).  The outputs carry them (Parquet columns, WebDataset JSON).

Prompts (a diffusers folder with a text encoder): a request holds ``prompt`` (and ``negative_prompt``) or
``embeds``, a safetensors file of its embeddings (``edmrt sample --prompt-embeds``' names; beside the requests
file).  Each actor runs the folder's own text encoder (``PromptEncoder``, the pipeline's ``encode_prompt``) once
per distinct (prompt, negative prompt) it meets, kept in a bounded cache, so embeddings are made where they are
used and never travel as JSON; the summary counts the encodings and the encoder's share of the actors' time.

Safe and resumable: every file is written under a temporary name beside its destination and renamed into place
(``os.replace``), then the chunk's record ``done/chunk-KKKKKKK.json`` (its files and their sha256) is written the
same way.  ``manifest.json`` holds the job; a folder holding another job is refused.  A re-run skips each chunk
whose record is there and whose files have the recorded sha256 (a run with nothing left to do only verifies), and
renders the rest: a killed run leaves at most temporary files (removed) and chunks without records (redone).

Deterministic: image i depends only on (model, plan, seed_i, condition_i), never on the actor or batch that drew it:
the Sampler draws each sample's noise from its own seed (Philox), and ONNX Runtime on the CPU, the default
backend there, is batch-independent bit for bit (measured: 0.0 between batches of 1, 7 and 100; torch's CPU
convolutions differ by ~1e-6 between batch sizes, which 8-bit PNGs hide nearly always, not always).

Fault-tolerant: Ray Data restarts an actor that dies and retries its task (an actor pool's ``max_restarts`` and
``max_task_retries`` are -1 by default): its chunk is redone and the output is the same.  For tests, ``EDMRT_RENDER_TEST_EXIT_AFTER=N``
with ``EDMRT_RENDER_TEST_MARKER=PATH`` makes the first actor that reaches N calls create PATH and exit.

Ray is imported inside the functions that need it (``pip install 'edmrt[render]'``).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends.cachefile import TEMP_GLOB, atomic_write

__all__ = ["FORMATS", "RenderJob", "Requests", "TimedBackend", "read_requests", "render", "verify_output", "to_png"]

FORMATS = ("png", "parquet", "webdataset")
MANIFEST_FORMAT = "edmrt-render-1"
_EXIT_AFTER, _MARKER = "EDMRT_RENDER_TEST_EXIT_AFTER", "EDMRT_RENDER_TEST_MARKER"


@dataclass
class Requests:
    """Per-request columns (index i is the request's position): seed, class label (-1: none), guidance (NaN:
    none); for a text model, prompt and negative prompt (None: none) or an embeddings file (``embeds``, None:
    none; ``embeds_sha256``: {path: digest} of the files, read when the requests were); per request ``steps`` and
    ``height`` / ``width`` in pixels (0: the job's; None: all 0)."""

    seed: np.ndarray
    class_label: np.ndarray
    guidance: np.ndarray
    prompt: np.ndarray | None = None
    negative_prompt: np.ndarray | None = None
    embeds: np.ndarray | None = None
    embeds_sha256: dict = field(default_factory=dict)
    steps: np.ndarray | None = None
    height: np.ndarray | None = None
    width: np.ndarray | None = None

    @property
    def text(self) -> bool:
        return self.prompt is not None

    def __len__(self) -> int:
        return len(self.seed)

    @property
    def variants(self) -> bool:
        """Whether any request asks for its own steps or size."""
        return any(c is not None and bool(np.any(c)) for c in (self.steps, self.height, self.width))

    def variant(self, i: int) -> tuple[int, int, int]:
        """(steps, height, width) of request i (0: the job's)."""
        return tuple(0 if c is None else int(c[i]) for c in (self.steps, self.height, self.width))

    def with_variants(self, steps: Sequence[int] | None = None, sizes: Sequence | None = None) -> Requests:
        """These requests with per-request ``steps`` and ``sizes`` ((height, width) pixels; 0 or None: the job's)."""
        n = len(self.seed)
        cols = {}
        if steps is not None:
            cols["steps"] = np.asarray([0 if v is None else _integer(v) for v in steps], dtype=np.int64)
        if sizes is not None:
            hw = [(0, 0) if v is None or v == 0 else tuple(v) for v in sizes]
            if any(len(v) != 2 for v in hw):
                raise ValueError(f"requests: sizes must be (height, width) pairs, got {list(sizes)[:4]}")
            cols["height"] = np.asarray([_integer(h) for h, _ in hw], dtype=np.int64)
            cols["width"] = np.asarray([_integer(w) for _, w in hw], dtype=np.int64)
        for k, v in cols.items():
            if len(v) != n:
                raise ValueError(f"requests: one {k} value per request ({n}), got {len(v)}")
        return dataclasses.replace(self, **cols)._checked_variants()

    def _checked_variants(self) -> Requests:
        """ValueError naming the first request whose steps, height or width is negative, or that gives one side."""
        n = len(self.seed)
        for name in ("steps", "height", "width"):
            col = getattr(self, name)
            if col is None:
                continue
            bad = np.flatnonzero(col < 0)
            if bad.size:
                raise ValueError(f"requests: {name} must be >= 1 (0: the job's), request {bad[0]} has {col[bad[0]]}")
        h = self.height if self.height is not None else np.zeros(n, dtype=np.int64)
        w = self.width if self.width is not None else np.zeros(n, dtype=np.int64)
        bad = np.flatnonzero((h == 0) != (w == 0))
        if bad.size:
            raise ValueError(f"requests: request {bad[0]} gives one of height and width; give both or neither")
        return self

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], num_classes: int = 0, classes: Sequence[int] | None = None,
                   guidance: float | None = None) -> Requests:
        """Requests for ``seeds``: class ``classes[i % len(classes)]`` (default i % num_classes) for a
        class-conditional model, none otherwise; one guidance weight for all (None: plain conditional)."""
        seeds = np.asarray(list(seeds), dtype=np.int64)
        n = len(seeds)
        if num_classes:
            pool = np.asarray(list(classes) if classes else range(num_classes), dtype=np.int64)
            labels = pool[np.arange(n) % len(pool)]
        else:
            labels = np.full(n, -1, dtype=np.int64)
        g = np.full(n, np.nan if guidance is None else float(guidance))
        return cls(seeds, labels, g).checked(num_classes)

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                     negative_prompts: Sequence[str | None] | None = None, guidance: float | None = None) -> Requests:
        """Requests for a text model: prompt i with seed i (default 0 .. N-1), one guidance weight for all."""
        prompts = list(prompts)
        n = len(prompts)
        seeds = np.asarray(list(range(n)) if seeds is None else list(seeds), dtype=np.int64)
        negs = [None] * n if negative_prompts is None else list(negative_prompts)
        if len(seeds) != n or len(negs) != n:
            raise ValueError(f"requests: one seed and one negative prompt per prompt ({n}), got {len(seeds)} seeds "
                             f"and {len(negs)} negative prompts")
        return cls(seeds, np.full(n, -1, dtype=np.int64), np.full(n, np.nan if guidance is None else float(guidance)),
                   np.asarray(prompts, dtype=object), np.asarray(negs, dtype=object),
                   np.asarray([None] * n, dtype=object)).checked(0, text=True)

    def checked(self, num_classes: int, text: bool = False) -> Requests:
        """ValueError naming the first bad request: seeds >= 0 and < 2**63, labels in [0, num_classes) (or -1 for
        an unconditional model), guidance NaN (none) or finite >= 0; ``text``: the model takes prompts, and every
        request has a prompt or an embeddings file."""
        if not len(self.seed):
            raise ValueError("requests: there is nothing to render (no seeds)")
        if text != self.text:
            raise ValueError("requests: this model takes prompts: each request needs 'prompt' or 'embeds'" if text
                             else "requests: this model takes no prompts (no text encoder inputs); drop 'prompt' / "
                                  "'embeds'")
        if text:
            from .pipelines.prompts import check_prompt

            for i in range(len(self.seed)):
                if (self.prompt[i] is None) == (self.embeds[i] is None):
                    raise ValueError(f"requests: request {i} needs 'prompt' or 'embeds' (one of them)")
                if self.prompt[i] is not None:
                    check_prompt(self.prompt[i], f"requests: request {i}'s prompt")
                if self.negative_prompt[i] is not None:
                    if self.prompt[i] is None:
                        raise ValueError(f"requests: request {i}: negative_prompt goes with prompt (an embeds file "
                                         "holds negative_prompt_embeds)")
                    check_prompt(self.negative_prompt[i], f"requests: request {i}'s negative_prompt")
        bad = np.flatnonzero(self.seed < 0)
        if bad.size:
            raise ValueError(f"requests: seeds must be >= 0, request {bad[0]} has {self.seed[bad[0]]}")
        lab = self.class_label
        bad = np.flatnonzero((lab < 0) | (lab >= num_classes)) if num_classes else np.flatnonzero(lab != -1)
        if bad.size:
            want = f"a class in [0, {num_classes})" if num_classes else "no class (the model is unconditional)"
            raise ValueError(f"requests: each request needs {want}; request {bad[0]} has {lab[bad[0]]}")
        g = self.guidance
        bad = np.flatnonzero(~np.isnan(g) & (~np.isfinite(g) | (g < 0)))
        if bad.size:
            raise ValueError(f"requests: guidance must be a finite number >= 0, request {bad[0]} has {g[bad[0]]}")
        if (~np.isnan(g)).any() and not num_classes and not text:
            raise ValueError("requests: guidance needs a class-conditional or text-conditioned model")
        return self._checked_variants()

    def digest(self) -> str:
        """sha256 over every column (the prompts as UTF-8, the embeddings files by content)."""
        h = hashlib.sha256()
        for col in (self.seed, self.class_label, self.guidance):
            h.update(np.ascontiguousarray(col).tobytes())
        if self.text:
            for col in (self.prompt, self.negative_prompt, self.embeds):
                h.update(json.dumps([None if v is None else str(v) for v in col]).encode())
            h.update(json.dumps(self.embeds_sha256, sort_keys=True).encode())
        if self.variants:   # (requests without them keep the digest they always had)
            for i in range(len(self.seed)):
                h.update(np.asarray(self.variant(i), dtype=np.int64).tobytes())
        return h.hexdigest()


def read_requests(path: str | os.PathLike, num_classes: int = 0, text: bool = False) -> Requests:
    """Requests from a JSONL file (one object per line: "seed", optional "class", optional "guidance"; a text model
    (``text``): "prompt" and optional "negative_prompt", or "embeds", a safetensors file relative to the requests
    file) or a CSV file with a header naming the same columns; a class-conditional model's missing class is the
    request's index modulo its classes.  ValueError naming the file, line and field for anything malformed."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--requests {str(path)!r} cannot be read: {exc}") from None
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        if not reader.fieldnames or "seed" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV of requests needs a header with 'seed' (and optional 'class', 'guidance')")
        rows = [{k: v for k, v in r.items() if v not in (None, "")} for r in reader]
    else:
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object ({exc})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with 'seed'")
                rows.append(obj)
    seeds, labels, guidance, prompts, negatives, embeds, digests = [], [], [], [], [], [], {}
    steps, sizes = [], []
    keys = {"seed", "guidance", "steps", "height", "width"} | ({"prompt", "negative_prompt", "embeds"} if text
                                                                else {"class"})
    for i, r in enumerate(rows):
        unknown = set(r) - keys
        if unknown or "seed" not in r:
            raise ValueError(f"{path}: request {i} must have 'seed' and may have {sorted(keys - {'seed'})}, got "
                             f"{sorted(r)}")
        try:
            seeds.append(_integer(r["seed"]))
            labels.append(_integer(r["class"]) if "class" in r else (i % num_classes if num_classes else -1))
            guidance.append(float(r["guidance"]) if "guidance" in r else math.nan)
            steps.append(_integer(r.get("steps", 0)))
            sizes.append((_integer(r.get("height", 0)), _integer(r.get("width", 0))))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: request {i}: seed, class, steps, height and width must be integers, guidance "
                             f"a number; got {r}") from None
        if text:
            for k in ("prompt", "negative_prompt", "embeds"):
                if k in r and not isinstance(r[k], str):
                    raise ValueError(f"{path}: request {i}: {k!r} must be a string, got {type(r[k]).__name__}")
            prompts.append(r.get("prompt"))
            negatives.append(r.get("negative_prompt"))
            embeds.append(_embeds_file(path, i, r["embeds"], digests) if "embeds" in r else None)
    extra = {}
    if text:
        extra = dict(prompt=np.asarray(prompts, dtype=object), negative_prompt=np.asarray(negatives, dtype=object),
                     embeds=np.asarray(embeds, dtype=object), embeds_sha256=digests)
    out = Requests(np.asarray(seeds, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                   np.asarray(guidance, dtype=np.float64), **extra).checked(num_classes, text)
    return out.with_variants(steps, sizes) if any(steps) or any(h or w for h, w in sizes) else out


def _embeds_file(requests: Path, i: int, name: str, digests: dict) -> str:
    """An embeddings file of request ``i``, relative to the requests file, as an absolute path (a regular
    safetensors file, not a link); its sha256 goes into ``digests``."""
    p = (requests.parent / name).resolve()
    if p.suffix != ".safetensors" or not p.is_file() or (requests.parent / name).is_symlink():
        raise ValueError(f"{requests}: request {i}: embeds {name!r} must be a .safetensors file beside the requests "
                         "(not a link)")
    key = str(p)
    if key not in digests:
        digests[key] = _sha256(p.read_bytes())
    return key


def _integer(v) -> int:
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    return int(v)


@dataclass
class RenderJob:
    """What is rendered and how: the model (a bundled name, a diffusers folder, optional adapters {name: weight}
    and an ONNX file to run it), the sampler (solver, steps, schedule, solver options; None: the model card's),
    the backend ("auto": ONNX Runtime on the CPU), the output format and the chunk size; ``encode``: where a text
    model's prompts are encoded, "actor" (in each sampling actor, with a cache) or "stage" (a Ray Data stage of its
    own, one actor: each distinct prompt once for the run).  The images are the same either way.  ``step_counts`` and
    ``sizes`` ((height, width) pixels): what a request may ask for besides the job's own steps and size."""

    model: str = "digits"
    solver: str | None = None
    steps: int | None = None
    schedule: object = None
    options: dict = field(default_factory=dict)
    backend: str = "auto"
    onnx: str | None = None
    adapters: dict | None = None
    format: str = "png"
    batch: int = 64
    device: str = "cpu"
    encode: str = "actor"
    step_counts: tuple = ()
    sizes: tuple = ()

    def __post_init__(self):
        try:
            self.step_counts = tuple(sorted({_integer(v) for v in self.step_counts}))
            self.sizes = tuple(sorted({(_integer(h), _integer(w)) for h, w in self.sizes}))
        except (TypeError, ValueError):
            raise ValueError(f"step_counts must be ints and sizes (height, width) pairs of ints, got "
                             f"{self.step_counts!r}, {self.sizes!r}") from None
        if any(v < 1 for v in self.step_counts) or any(min(hw) < 1 for hw in self.sizes):
            raise ValueError(f"step_counts and sizes must be >= 1, got {self.step_counts}, {self.sizes}")
        if self.encode not in ENCODE_MODES:
            raise ValueError(f"encode must be one of {list(ENCODE_MODES)} (where prompts are encoded), got "
                             f"{self.encode!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {self.batch!r}")


# ---------------------------------------------------------------------------------------------- building a sampler
def load_model(job: RenderJob):
    from .loading import load

    return load(job.model, adapters=job.adapters) if job.adapters else load(job.model)


def sized_model(model, height: int, width: int):
    """``model`` sampling images of height x width pixels (a latent model: latents of that over its VAE's scale
    factor); ValueError naming a size the model cannot take (not a multiple of the scale, a network built for one
    shape)."""
    if not height:
        return model
    vae = getattr(model.decoder, "vae", None)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if height % scale or width % scale:
        raise ValueError(f"size {height}x{width}: a multiple of the VAE's scale factor {scale} is needed")
    return dataclasses.replace(model, sample_shape=(model.sample_shape[0], height // scale, width // scale))


def build_sampler(job: RenderJob, threads: int = 1, model=None, steps: int = 0, size: tuple = (0, 0)):
    """The job's Sampler (``steps`` / ``size``: a request's own, 0 for the job's, on ``model``, default the job's):
    on the CPU with backend "auto" / "onnxruntime", an ONNX Runtime session with ``threads`` intra-op threads over
    the cached export (adapters fused and baked in), else ``resolve_backend``'s."""
    from .backends import BACKENDS
    from .sampler import Sampler

    model = sized_model(load_model(job) if model is None else model, *size)
    backend = job.backend
    if job.onnx is not None or (job.device == "cpu" and backend in ("auto", "onnxruntime")):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = max(1, int(threads))
        backend = BACKENDS["onnxruntime"].from_model(model, torch.device("cpu"), path=job.onnx, sess_options=opts,
                                                     live_weights=False)
    return model, Sampler(model, solver=job.solver, steps=steps or job.steps, schedule=job.schedule, backend=backend,
                          device=job.device, **job.options)


class TimedBackend:
    """A backend that adds the seconds spent in it (the network) to ``seconds``; forwards everything else."""

    def __init__(self, inner):
        self._inner, self.seconds = inner, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self._inner(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._inner, name)


def to_png(image: torch.Tensor, text: dict | None = None) -> bytes:
    """One image (C, H, W) in [-1, 1] (or uint8, as a decoder gives them) as PNG bytes (8 bits, "L" for one
    channel, "RGB" for three): round((x + 1) 127.5), clipped; ``text``: {key: str} written as iTXt chunks (the
    prompt); deterministic for one Pillow version."""
    from PIL import Image, PngImagePlugin

    if image.dtype == torch.uint8:
        x = image.detach().cpu().numpy()
    else:
        x = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).numpy()
    if x.shape[0] == 1:
        pic = Image.fromarray(x[0], mode="L")
    elif x.shape[0] == 3:
        pic = Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)), mode="RGB")
    else:
        raise ValueError(f"to_png needs 1 or 3 channels, got {x.shape[0]}")
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_itxt(k, v)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


PROMPT_CACHE = 1024   # distinct (prompt, negative prompt) encodings an actor keeps
ENCODE_MODES = ("actor", "stage")


def _given_rows(batch: dict, c: int, guid: np.ndarray) -> list[tuple[dict, dict]]:
    """Chunk ``c``'s (cond, uncond) rows from a PromptStage's columns."""
    names = [k[len("cond."):] for k in batch if k.startswith("cond.")]
    rows = []
    for j, g in enumerate(guid):
        cond = {n: torch.from_numpy(np.asarray(batch[f"cond.{n}"][c][j:j + 1], dtype=np.float32)) for n in names}
        uncond = {} if np.isnan(g) else {n: torch.from_numpy(np.asarray(batch[f"uncond.{n}"][c][j:j + 1],
                                                                         dtype=np.float32)) for n in names}
        rows.append((cond, uncond))
    return rows


def text_inputs(model) -> bool:
    """Whether the model takes text (prompt embeddings) rather than only class labels."""
    return any(c.name == "encoder_hidden_states" for c in model.cond)


def _shape_of(model, name: str) -> tuple:
    return next((c.shape for c in model.cond if c.name == name), ())


def _none(v):
    """A request column's empty value (Ray Data hands None back as None or NaN, strings as str)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else str(v)


def _png_text(prompt, negative) -> dict | None:
    if prompt is None:
        return None
    return {"prompt": prompt, **({"negative_prompt": negative} if negative else {})}


class TextRows:
    """Per request (cond, uncond) rows of a text model: the prompt through the folder's own text encoder (once per
    distinct (prompt, negative prompt, guided): ``PromptEncoder``'s cache) or an embeddings file (read once);
    ``encoded`` and ``seconds`` count the encodings and the time spent."""

    def __init__(self, folder: str, names: Sequence[str], shapes: dict):
        self.folder, self.names, self.shapes = folder, list(names), {k: tuple(v) for k, v in shapes.items()}
        self._encoder, self._files, self.seconds = None, {}, 0.0

    @property
    def encoded(self) -> int:
        return self._encoder.encoded if self._encoder is not None else 0

    def rows(self, prompts, negs, files, guided) -> list[tuple[dict, dict]]:
        from .pipelines.prompts import PromptEncoder, embeds_from_file

        t0 = time.perf_counter()
        out = []
        for p, q, f, g in zip(prompts, negs, files, guided):
            if p is not None:
                if self._encoder is None:
                    self._encoder = PromptEncoder(self.folder, self.names, cache=PROMPT_CACHE)
                out.append(self._encoder.encode(p, q, g))
                continue
            if f not in self._files:
                cond, uncond = embeds_from_file(f, self.names)
                one = lambda d: {n: v if v.ndim == len(self.shapes.get(n, ())) + 1 else v[None]  # noqa: E731
                                 for n, v in d.items()}
                self._files[f] = (one(cond), one(uncond))
            cond, uncond = self._files[f]
            if g and not uncond:
                raise ValueError(f"embeds {f!r}: guidance needs negative_prompt_embeds in the file")
            out.append((cond, uncond if g else {}))
        self.seconds += time.perf_counter() - t0
        return out


def _text_columns(batch: dict, c: int, n: int):
    """(prompts, negative prompts, embeds files) of chunk ``c`` of a batch (Ray Data hands "" back for none)."""
    files = [_none(v) for v in batch["embeds"][c]]
    prompts = [None if f is not None else ("" if _none(v) is None else str(v)) for v, f in zip(batch["prompt"][c], files)]
    return prompts, [_none(v) for v in batch["negative_prompt"][c]], files


class PromptStage:
    """The text encoder as a Ray Data stage of its own (``RenderJob.encode="stage"``): each chunk gets its
    requests' embeddings as columns ``cond.NAME`` / ``uncond.NAME`` (zeros where unguided), and its encodings and
    seconds; one actor encodes each distinct prompt once for the whole run."""

    def __init__(self, folder: str, names: list, shapes: dict):
        self.text = TextRows(folder, names, shapes)

    def __call__(self, batch: dict) -> dict:
        out = {k: list(v) for k, v in batch.items()}
        cols: dict[str, list] = {}
        stats = {"stage_text_s": [], "stage_encoded": []}
        for c in range(len(batch["chunk"])):
            n = len(batch["index"][c])
            enc0, t0 = self.text.encoded, self.text.seconds
            guided = [not np.isnan(g) for g in np.asarray(batch["guidance"][c], dtype=np.float64)]
            rows = self.text.rows(*_text_columns(batch, c, n), guided)
            for name in rows[0][0]:
                cols.setdefault(f"cond.{name}", []).append(torch.cat([r[0][name] for r in rows]).numpy())
                shape = rows[0][0][name].shape[1:]
                cols.setdefault(f"uncond.{name}", []).append(torch.cat([
                    r[1][name] if name in r[1] else torch.zeros((1, *shape)) for r in rows]).numpy())
            stats["stage_text_s"].append(self.text.seconds - t0)
            stats["stage_encoded"].append(self.text.encoded - enc0)
        out.update(cols, **stats)
        return {k: v if k.startswith(("cond.", "uncond.")) else np.asarray(v, dtype=object if k in (
            "prompt", "negative_prompt", "embeds") else None) for k, v in out.items()}


class Renderer:
    """The actor of ``map_batches``: one Sampler built once; each call renders its chunks (columns chunk, index,
    seed, class_label, guidance: one row per chunk) and returns one row per image with its PNG bytes and the
    chunk's timings (network, the rest of sampling, encoding, the wall time it ended) on the chunk's first row."""

    def __init__(self, job: dict, threads: int = 1):
        torch.set_num_threads(max(1, int(threads)))
        self.job = RenderJob(**job)
        self.threads = threads
        self.model, self.sampler = build_sampler(self.job, threads)
        self.timers = [TimedBackend(self.sampler.backend)]
        self.sampler.backend = self.timers[0]  # engines are built on first use: every one times its network
        self.variants = {(0, 0, 0): (self.model, self.sampler)}   # (steps, height, width) -> (model, Sampler)
        self.calls, self.actor = 0, f"{os.uname().nodename}:{os.getpid()}"
        self.text = text_inputs(self.model)
        self.texts = TextRows(self.job.model, [c.name for c in self.model.cond],
                              {c.name: c.shape for c in self.model.cond}) if self.text else None
        if getattr(self.model.decoder, "batch", None) is not None:
            # torch's CPU convolutions round differently per batch size (~1e-6: now and then one PNG level): the
            # VAE decodes one image at a time, so an image never depends on the chunk that drew it.
            self.model.decoder.batch = 1

    @property
    def network_seconds(self) -> float:
        return sum(t.seconds for t in self.timers)

    def variant(self, key: tuple):
        """(model, Sampler) for a request's (steps, height, width), built on first use (its network timed)."""
        if key not in self.variants:
            steps, h, w = key
            model, sampler = build_sampler(self.job, self.threads, self.model, steps, (h, w))
            self.timers.append(TimedBackend(sampler.backend))
            sampler.backend = self.timers[-1]
            self.variants[key] = (model, sampler)
        return self.variants[key]

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        self._test_exit()
        cols: dict[str, list] = {k: [] for k in ("chunk", "index", "seed", "class_label", "guidance", "png",
                                                "actor", "network_s", "sample_s", "encode_s", "text_s", "encoded",
                                                "done_at", "prompt", "negative_prompt", "steps", "height",
                                                "width")}
        for c in range(len(batch["chunk"])):
            idx, seeds = np.asarray(batch["index"][c]), np.asarray(batch["seed"][c])
            labels, guid = np.asarray(batch["class_label"][c]), np.asarray(batch["guidance"][c], dtype=np.float64)
            n = len(idx)
            prompts, negs, files = _text_columns(batch, c, n) if self.text else ([None] * n,) * 3
            keys = [tuple(int(batch[k][c][j]) for k in ("steps", "height", "width")) for j in range(n)]
            net0, t0 = self.network_seconds, time.perf_counter()
            text0, enc0 = (self.texts.seconds, self.texts.encoded) if self.text else (0.0, 0)
            given = _given_rows(batch, c, guid) if self.text and "stage_encoded" in batch else None
            images = self._sample(seeds, labels, guid, prompts, negs, files, given, keys)
            t1 = time.perf_counter()
            pngs = [to_png(im, _png_text(p, q)) for im, p, q in zip(images, prompts, negs)]
            t2 = time.perf_counter()
            net = self.network_seconds - net0
            text_s = (self.texts.seconds - text0) if self.text else 0.0
            encoded = (self.texts.encoded - enc0) if self.text else 0
            stage = (float(batch["stage_text_s"][c]), int(batch["stage_encoded"][c])) if given is not None else (0, 0)
            cols["chunk"] += [int(batch["chunk"][c])] * n
            cols["index"] += idx.tolist()
            cols["seed"] += seeds.tolist()
            cols["class_label"] += labels.tolist()
            cols["guidance"] += guid.tolist()
            for j, k in enumerate(("steps", "height", "width")):
                cols[k] += [key[j] for key in keys]
            cols["png"] += pngs
            cols["actor"] += [self.actor] * n
            cols["network_s"] += [net] + [0.0] * (n - 1)
            cols["text_s"] += [text_s + stage[0]] + [0.0] * (n - 1)
            cols["encoded"] += [encoded + stage[1]] + [0] * (n - 1)
            cols["prompt"] += ["" if p is None else p for p in prompts]
            cols["negative_prompt"] += ["" if q is None else q for q in negs]
            cols["sample_s"] += [t1 - t0 - net - text_s] + [0.0] * (n - 1)
            cols["encode_s"] += [t2 - t1] + [0.0] * (n - 1)
            cols["done_at"] += [time.time()] + [0.0] * (n - 1)
        objects = ("png", "actor", "prompt", "negative_prompt")
        return {k: np.asarray(v, dtype=object) if k in objects else np.asarray(v) for k, v in cols.items()}

    def _sample(self, seeds: np.ndarray, labels: np.ndarray, guid: np.ndarray, prompts=None, negs=None,
                files=None, given=None, variants=None) -> list[torch.Tensor]:
        """The chunk's images in request order; requests with different guidance, steps or size run as separate
        calls (and, for a text model, prompts of different token counts).  ``given``: the rows a PromptStage
        encoded; ``variants``: each request's (steps, height, width)."""
        out = [None] * len(seeds)
        keys = ["none" if np.isnan(g) else float(g) for g in guid]
        variants = variants or [(0, 0, 0)] * len(seeds)
        rows = None
        if self.text:
            rows = given if given is not None else self.texts.rows(prompts, negs, files, [k != "none" for k in keys])
        groups = {}
        for i, k in enumerate(keys):
            shape = tuple(rows[i][0]["encoder_hidden_states"].shape) if rows is not None else ()
            groups.setdefault((k, shape, variants[i]), []).append(i)
        for (key, _, variant), pos in groups.items():
            model, sampler = self.variant(variant)
            w = None if key == "none" else key
            if rows is not None:
                from .pipelines.prompts import default_inputs

                cond = {n: torch.cat([rows[i][0][n] for i in pos]) for n in rows[pos[0]][0]}
                uncond = {n: torch.cat([rows[i][1][n] for i in pos]) for n in rows[pos[0]][1]}
                cond, w = default_inputs(model, cond, w)
                kw = dict(cond=cond, uncond=uncond if w is not None and uncond else None)
            else:
                kw = dict(cond=labels[pos].tolist() if model.num_classes else None)
            x = sampler.sample(seeds[pos].tolist(), guidance=w, **kw).cpu()
            for j, i in enumerate(pos):
                out[i] = x[j]
        return out

    def _test_exit(self) -> None:
        after, marker = os.environ.get(_EXIT_AFTER), os.environ.get(_MARKER)
        if after and marker and self.calls > int(after):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(3)


# ---------------------------------------------------------------------------------------------- writing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunk_files(fmt: str, chunk: int, rows: list[dict], meta: dict) -> dict[str, bytes]:
    """{relative path: bytes} of one chunk's output in ``fmt`` (rows sorted by index)."""
    if fmt == "png":
        return {f"images/{r['index'] // 10000:05d}/{r['index']:09d}.png": r["png"] for r in rows}
    text = bool(meta.get("text"))
    info = [{"index": r["index"], "seed": r["seed"], "class_label": r["class_label"],
             "guidance": None if math.isnan(r["guidance"]) else r["guidance"],
             **({"prompt": r["prompt"], "negative_prompt": r["negative_prompt"]} if text else {}),
             **({k: int(r[k]) for k in ("steps", "height", "width")} if meta.get("variants") else {})} for r in rows]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"index": [r["index"] for r in rows], "seed": [r["seed"] for r in rows],
                   "class_label": [r["class_label"] for r in rows], "guidance": [i["guidance"] for i in info]}
        if text:
            columns.update(prompt=[r["prompt"] for r in rows], negative_prompt=[r["negative_prompt"] for r in rows])
        if meta.get("variants"):   # 0: the job's steps / size
            columns.update({k: [int(r[k]) for r in rows] for k in ("steps", "height", "width")})
        table = pa.table({**columns, "png": pa.array([r["png"] for r in rows], type=pa.binary())})
        table = table.replace_schema_metadata({"edmrt": json.dumps(meta, sort_keys=True)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return {f"parquet/chunk-{chunk:07d}.parquet": buf.getvalue()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r, i in zip(rows, info):
            for name, data in ((f"{r['index']:09d}.png", r["png"]),
                               (f"{r['index']:09d}.json", json.dumps({**i, **meta}, sort_keys=True).encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(data))
    return {f"webdataset/chunk-{chunk:07d}.tar": buf.getvalue()}


def _record_path(out: Path, chunk: int) -> Path:
    return out / "done" / f"chunk-{chunk:07d}.json"


def write_chunk(out: Path, fmt: str, chunk: int, rows: list[dict], meta: dict, expected: int) -> dict:
    """Write one chunk's files atomically, then its record; returns the record.  ValueError if the chunk's rows
    are not all here (``expected``), so that no record ever covers a partial chunk."""
    rows = sorted(rows, key=lambda r: r["index"])
    if len(rows) != expected or len({r["index"] for r in rows}) != expected:
        raise ValueError(f"chunk {chunk}: {len(rows)} rows reached the writer, expected {expected}")
    t0 = time.perf_counter()
    files = _chunk_files(fmt, chunk, rows, meta)
    for rel, data in files.items():
        atomic_write(out / rel, data, private=False)
    record = {"chunk": chunk, "first": rows[0]["index"], "count": len(rows),
              "files": {rel: _sha256(data) for rel, data in files.items()}}
    atomic_write(_record_path(out, chunk), json.dumps(record, sort_keys=True).encode(), private=False)
    record["write_s"] = time.perf_counter() - t0
    record["written_at"] = time.time()
    return record


def make_sink(out: Path, fmt: str, meta: dict, sizes: dict):
    """A Ray Data ``Datasink`` writing each chunk with ``write_chunk``; ``sizes`` {chunk: rows}.  Its write tasks
    return per-chunk records with the actors' timings; ``on_write_complete`` keeps them (``sink.records``)."""
    from ray.data import Datasink

    class ChunkSink(Datasink):
        def __init__(self):
            self.records: list[dict] = []

        def get_name(self) -> str:
            return "edmrt-render"

        def write(self, blocks, ctx) -> list[dict]:
            by_chunk: dict[int, list[dict]] = {}
            for block in blocks:
                table = block.to_pydict() if hasattr(block, "to_pydict") else block.to_dict("list")
                for i in range(len(table["chunk"])):
                    by_chunk.setdefault(int(table["chunk"][i]), []).append({k: table[k][i] for k in table})
            out_records = []
            for chunk, rows in sorted(by_chunk.items()):
                rec = write_chunk(out, fmt, chunk, rows, meta, sizes[chunk])
                rec.update(actor=rows[0]["actor"], **{k: float(sum(r[k] for r in rows))
                                                      for k in ("network_s", "sample_s", "encode_s", "text_s")},
                           encoded=int(sum(r["encoded"] for r in rows)),
                           done_at=max(float(r["done_at"]) for r in rows))
                out_records.append(rec)
            return out_records

        def on_write_complete(self, write_result) -> None:
            self.records = [r for ret in write_result.write_returns for r in (ret or [])]

    return ChunkSink()


# ---------------------------------------------------------------------------------------------- the manifest
def job_manifest(job: RenderJob, model, sampler, requests: Requests) -> dict:
    """The job as recorded in manifest.json: everything an image depends on, and the requests' digest."""
    from .onnx_contract import weights_sha256

    net = model.network
    weights = weights_sha256(net) if isinstance(net, torch.nn.Module) else None
    return {"format": MANIFEST_FORMAT, "model": job.model, "model_weights_sha256": weights,
            "adapters": job.adapters or {}, "onnx": job.onnx, "solver": sampler.solver, "steps": sampler.steps,
            "sigmas": [float(s) for s in sampler.plan.sigmas], "options": job.options, "backend": job.backend,
            "image_format": job.format, "batch": job.batch, "requests": len(requests),
            "requests_sha256": requests.digest(), "sample_shape": list(model.sample_shape),
            **({"text": True} if requests.text else {}),
            **({"step_counts": list(job.step_counts), "sizes": [list(v) for v in job.sizes]}
               if job.step_counts or job.sizes else {})}


def _open_output(out: Path, manifest: dict) -> None:
    """Create ``out`` with ``manifest.json``, or check that an existing one records the same job; remove temporary
    files a killed run left behind."""
    path = out / "manifest.json"
    if path.exists() or path.is_symlink():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable render manifest ({exc}): choose another --out") from None
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"{out} holds another render job (it differs in {diff}): choose another --out")
    else:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not an edmrt render folder (no manifest.json): choose another --out")
        atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode(), private=False)
    for tmp in out.rglob(TEMP_GLOB):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()


def verify_output(out: str | os.PathLike, chunks: int | None = None) -> tuple[set, set]:
    """(complete chunks, chunks to redo) of a render folder: a chunk is complete when its record parses and each
    of its files exists as a regular file with the recorded sha256."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    total = chunks if chunks is not None else math.ceil(manifest["requests"] / manifest["batch"])
    done, redo = set(), set()
    for k in range(total):
        rec_path = _record_path(out, k)
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            ok = rec.get("chunk") == k and all(
                (out / rel).is_file() and not (out / rel).is_symlink()
                and _sha256((out / rel).read_bytes()) == sha for rel, sha in rec["files"].items())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            ok = False
        (done if ok else redo).add(k)
    return done, redo


# ---------------------------------------------------------------------------------------------- the run
def _chunk_rows(requests: Requests, batch: int, todo: Sequence[int]) -> list[dict]:
    rows = []
    for k in todo:
        lo, hi = k * batch, min(len(requests), (k + 1) * batch)
        row = {"chunk": k, "index": np.arange(lo, hi, dtype=np.int64), "seed": requests.seed[lo:hi],
               "class_label": requests.class_label[lo:hi], "guidance": requests.guidance[lo:hi],
               **{k: (np.zeros(hi - lo, dtype=np.int64) if getattr(requests, k) is None else getattr(requests, k)[lo:hi])
                  for k in ("steps", "height", "width")}}
        if requests.text:   # strings for Ray Data's blocks ("": none); the actor reads them back
            row.update({k: ["" if v is None else str(v) for v in getattr(requests, k)[lo:hi]]
                        for k in ("prompt", "negative_prompt", "embeds")})
        rows.append(row)
    return rows


def render(job: RenderJob, requests: Requests, out: str | os.PathLike, actors: int = 1, cpus_per_actor: float = 1,
           gpus_per_actor: float = 0, address: str | None = None, progress: bool = True) -> dict:
    """Render ``requests`` with ``job`` into ``out`` on Ray (module docstring); returns the summary (also written
    to ``out/summary.json``): images written and verified, seconds, images/s overall and per actor, NFE/s, and
    where the actors' time went.  ``address``: an existing Ray cluster (default: a local Ray in this process)."""
    import ray

    out = Path(out)
    if not isinstance(requests, Requests):
        raise ValueError(f"requests must be an edmrt.render.Requests (Requests.from_seeds, read_requests), got "
                         f"{type(requests).__name__}")
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be an int >= 1, got {actors!r}")
    if not (cpus_per_actor > 0 and gpus_per_actor >= 0):
        raise ValueError(f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got {cpus_per_actor}, {gpus_per_actor}")
    t_start = time.perf_counter()
    started = not ray.is_initialized()
    try:
        return _render(job, requests, out, actors, cpus_per_actor, gpus_per_actor, address, progress, t_start)
    finally:
        if started and ray.is_initialized():  # a Ray this call started ends with it; the caller's stays
            ray.shutdown()


def _render(job, requests, out, actors, cpus_per_actor, gpus_per_actor, address, progress, t_start) -> dict:
    model, sampler = build_sampler(job, threads=int(cpus_per_actor))  # checks the job, warms the ONNX cache
    text = text_inputs(model)
    other = [c.name for c in model.cond if c.name not in ("class_labels", "encoder_hidden_states", "text_embeds",
                                                          "pooled_projections", "time_ids", "timestep_cond")]
    if other:
        raise ValueError(f"render takes seeds, class labels or prompts, and guidance; model {job.model!r} also needs "
                         f"{other}")
    if text and model.decoder is None:
        raise ValueError(f"model {job.model!r} takes prompts but has no VAE (no vae in model_index.json): render "
                         "writes images")
    requests.checked(model.num_classes, text)
    nfe = _variant_nfe(job, requests, model, sampler, int(cpus_per_actor))
    manifest = job_manifest(job, model, sampler, requests)
    out.mkdir(parents=True, exist_ok=True)
    _open_output(out, manifest)
    n_chunks = math.ceil(len(requests) / job.batch)
    done, todo = verify_output(out, n_chunks)
    summary = {"requests": len(requests), "chunks": n_chunks, "chunks_skipped": len(done), "chunks_rendered": 0,
               "actors": actors, "batch": job.batch, "nfe_per_image": sampler.plan.nfe}
    if requests.variants:
        summary["nfe_per_variant"] = {"x".join(map(str, k)): v for k, v in nfe.items()}
    if todo:
        sizes = {k: min(len(requests), (k + 1) * job.batch) - k * job.batch for k in todo}
        t0 = time.perf_counter()
        spec = {"folder": job.model, "names": [c.name for c in model.cond],
                "shapes": {c.name: list(c.shape) for c in model.cond}} if text else None
        records = _run_pipeline(job, requests, out, sorted(todo), sizes, manifest, actors, cpus_per_actor,
                                gpus_per_actor, address, progress, text=spec)
        wall = time.perf_counter() - t0
        summary.update(_timings(records, sampler.plan.nfe, text))
        total = sum(nfe[requests.variant(i)] for k in todo for i in range(k * job.batch, k * job.batch + sizes[k]))
        summary.update(chunks_rendered=len(records), pipeline_s=round(wall, 3),
                       images_per_s=summary["rendered_images"] / wall, nfe_per_s=total / wall)
    done, redo = verify_output(out, n_chunks)
    if redo:
        raise RuntimeError(f"{len(redo)} chunks are not complete after the run (first {min(redo)}); run again")
    summary.update(images=len(requests), verified_chunks=len(done), seconds=round(time.perf_counter() - t_start, 3))
    if summary["chunks_rendered"]:
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode(), private=False)
    return summary


def _variant_nfe(job: RenderJob, requests: Requests, model, sampler, threads: int) -> dict:
    """{(steps, height, width): NFE per image} of the variants the requests ask for, each checked against the job's
    ``step_counts`` / ``sizes`` (ValueError naming the first request outside them) and built once here (the model
    takes that size; its ONNX export is cached for the actors)."""
    nfe = {(0, 0, 0): sampler.plan.nfe}
    for i in range(len(requests)) if requests.variants else ():
        key = requests.variant(i)
        if key in nfe:
            continue
        steps, h, w = key
        if steps and steps not in job.step_counts:
            raise ValueError(f"requests: request {i} asks for steps={steps}; this job allows {list(job.step_counts)} "
                             "(RenderJob.step_counts, edmrt render --step-counts) or 0 for its own")
        if h and (h, w) not in job.sizes:
            raise ValueError(f"requests: request {i} asks for {h}x{w} pixels; this job allows "
                             f"{['x'.join(map(str, v)) for v in job.sizes]} (RenderJob.sizes, edmrt render --sizes) "
                             "or 0 for its own")
        nfe[key] = build_sampler(job, threads, model, steps, (h, w))[1].plan.nfe
    return nfe


def _run_pipeline(job, requests, out, todo, sizes, manifest, actors, cpus, gpus, address, progress,
                  writers: int = 1, text: dict | None = None) -> list[dict]:
    """The Ray Data pipeline over the chunks in ``todo``: from_items (one block each) -> [map_batches on one
    PromptStage, for ``job.encode == "stage"``] -> map_batches on an actor pool of Renderers ->
    write_datasink(ChunkSink)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k in (_EXIT_AFTER, _MARKER)}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    rows = _chunk_rows(requests, job.batch, todo)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    if text is not None and job.encode == "stage":
        # One encoder actor for the run; no CPU of the budget (it is light next to sampling, and the sampling actors
        # hold every CPU): it runs beside them, as the writers do.
        ds = ds.map_batches(PromptStage, fn_constructor_kwargs=text, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    meta = {k: manifest[k] for k in ("model", "model_weights_sha256", "solver", "steps", "sigmas")}
    meta.update({"text": True} if manifest.get("text") else {})
    meta.update({"variants": True} if "step_counts" in manifest else {})
    # Ray Data restarts a dead actor and retries its task (max_restarts = max_task_retries = -1 by default for an
    # actor pool); a constructor that fails (a bad model) is a user error and is not retried.
    ds = ds.map_batches(Renderer, fn_constructor_kwargs={"job": dataclasses.asdict(job), "threads": int(cpus)},
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus, num_gpus=gpus)
    sink = make_sink(out, job.format, meta, sizes)
    # Writing is light next to sampling: its tasks take no CPU of the budget, so they run beside the actors that
    # hold every CPU instead of waiting for them to finish; at most `writers` at a time (each task needs a worker
    # process: unbounded zero-CPU tasks would start dozens).
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=writers)
    return sink.records


def _timings(records: list[dict], nfe: int, text: bool = False) -> dict:
    """Images/s overall and per actor, NFE/s, and where the actors' time went (network, the text encoder for a text
    model, the rest of sampling, PNG encoding, writing), from the chunk records."""
    images = sum(r["count"] for r in records)
    keys = ("network_s", "text_s", "sample_s", "encode_s", "write_s") if text else \
        ("network_s", "sample_s", "encode_s", "write_s")
    parts = {k: sum(r[k] for r in records) for k in keys}
    busy = sum(parts.values())
    per_actor: dict[str, dict] = {}
    for r in records:
        a = per_actor.setdefault(r["actor"], {"images": 0, "busy_s": 0.0})
        a["images"] += r["count"]
        a["busy_s"] += r["network_s"] + r["text_s"] + r["sample_s"] + r["encode_s"] + r["write_s"]
    for a in per_actor.values():
        a["images_per_s_busy"] = a["images"] / a["busy_s"] if a["busy_s"] else None
    # Steady state: the images of every chunk after the first, over the time from the first chunk's end of encoding
    # in its actor to the last chunk's record (the rate a long run tends to, without starting Ray and the actors).
    stamps = sorted((r["done_at"], r["count"]) for r in records)
    stamps[-1] = (max(r["written_at"] for r in records), stamps[-1][1])
    span = stamps[-1][0] - stamps[0][0] if len(stamps) > 1 else 0.0
    steady = sum(c for _, c in stamps[1:]) / span if span > 0 else None
    return {"rendered_images": images, "steady_images_per_s": steady,
            "prompts_encoded": sum(r["encoded"] for r in records),
            "time_split_s": {k: round(v, 3) for k, v in parts.items()},
            "time_split_share": {k: round(v / busy, 4) if busy else None for k, v in parts.items()},
            "per_actor": per_actor, "nfe": nfe}
