"""OpenVINO as the backend: an edmrt ONNX file compiled for the CPU, one static shape per batch size, in float32 or
bfloat16, with the engine's buffers bound to OpenVINO tensors that share their memory (no copy in or out).

The file is checked like ONNX Runtime's (``check_onnx_file``: the declared signature of ``edmrt.onnx_contract``).

Precision: OpenVINO's CPU plugin runs bf16 *by default* where the CPU has it (AVX512_BF16 or AMX), so "fp32" is
asked for explicitly (``INFERENCE_PRECISION_HINT=f32``); "bf16" is refused with the reason on a CPU without it.
"int8": the network quantised by NNCF's post-training quantisation (``nncf.quantize``, preset MIXED: symmetric
weights, asymmetric activations) on calibration inputs, its convolutions and matrix products then run in int8 (VNNI
or AMX where the CPU has them), everything else in f32.  Calibration inputs are what the network sees while
sampling: ``edmrt.backends.calibration_inputs(model)`` records them along the model's own Heun trajectories.
Inputs, outputs and the sampler's state stay float32 in every precision: only the network's insides change.

Performance hint: "latency" (one inference request, every thread on it), "throughput" (the batch cut into equal
slices, one request per OpenVINO stream, run at once) or "auto" (throughput from ``THROUGHPUT_MIN_BATCH`` samples,
when the batch divides into the streams).

Compiled blobs are cached under ``$EDMRT_CACHE/openvino/`` (default ``~/.cache/edmrt``): ``<key>.blob`` and
``<key>.manifest.json``.  The key hashes the ONNX file's sha256, the OpenVINO version, the CPU (its name and
capabilities), the compile configuration and the static input shapes, and for int8 the calibration (the sha256 of
its arrays, or the recipe that makes them) and NNCF's version; the manifest records those fields and the
blob's sha256.  A blob is used only when both are regular files (not links), the fields match and the blob matches
its sha256 (OpenVINO itself imports a blob with a flipped byte without complaint: measured); anything else is
logged and compiled again, and written atomically (temp file + rename, blob before manifest).  The cache is bounded:
after a write, the least recently used blobs go until the rest fit ``EDMRT_OPENVINO_CACHE_GB`` (default 20; a blob
is 217 MB for the CIFAR-shaped UNet, ~3.4 GB for SD 1.5).

Threads: an inference request is not thread-safe; every call takes requests no other call in flight holds (a pool
per set of buffers, at most ``MAX_REQUESTS`` idle ones kept), and ``infer`` releases the GIL.

``openvino`` is imported where used (``pip install 'edmrt[openvino]'``), never by ``import edmrt``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .base import as_cond, check_backend_args
from .cachefile import atomic_write, cache_root, check_manifest, sha256_file
from ..onnx_contract import check_onnx_file, onnx_weight_inputs

__all__ = ["OpenVinoBackend", "openvino_available", "import_openvino", "bf16_supported", "cpu_capabilities", "openvino_cache_root",
           "check_calibration", "trim_cache", "cache_limit_bytes", "CACHE_GB",
           "PRECISIONS", "HINTS", "THROUGHPUT_MIN_BATCH", "MAX_REQUESTS", "OV_CACHE_FORMAT"]

log = logging.getLogger("edmrt.backends")

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}   # edmrt's name -> INFERENCE_PRECISION_HINT (int8:
#                                                                 of the ops left unquantised)
HINTS = ("auto", "latency", "throughput")
THROUGHPUT_MIN_BATCH = 16   # "auto" uses the throughput hint from this batch (+3% at 16 on 2 vCPUs; measured)
MAX_REQUESTS = 64           # idle inference-request sets kept per backend
OV_CACHE_FORMAT = 1
CACHE_GB = 20.0             # the blob cache's default size bound (EDMRT_OPENVINO_CACHE_GB): SD 1.5 takes ~3.4 GB a blob


def quantize_options(nncf) -> dict:
    """NNCF's options for "int8": asymmetric activations (MIXED), and the transformer scheme, which leaves the
    normalisations, softmax and element-wise ops of the attention and time-embedding paths in f32.  Measured on the
    digits teacher's F along its trajectories: median relative RMS error 0.31 with MIXED alone, 0.029 with this."""
    return dict(preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def import_openvino():
    """The ``openvino`` module, or ImportError saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("backend 'openvino' needs OpenVINO: pip install 'edmrt[openvino]'") from None
    return ov


def import_nncf():
    """The ``nncf`` module (int8 post-training quantisation), or ImportError saying how to install it."""
    try:
        import nncf
    except ImportError:
        raise ImportError("precision 'int8' quantises with NNCF: pip install 'edmrt[openvino]' (or pip install nncf)") \
            from None
    return nncf


def check_calibration(items, sample_shape, cond_inputs) -> tuple[list, str]:
    """(items as {name: C-contiguous numpy array}, sha256 of their names, shapes, dtypes and bytes) for int8
    calibration; ValueError naming the first problem.  Each item: x_in (b, *sample_shape) and c_noise (b,) float32,
    finite, and every conditioning input (b, *shape) in its dtype, for one batch size b >= 1 per item."""
    import numpy as np

    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__len__") or len(items) == 0:
        raise ValueError("calibration must be a non-empty sequence of {input name: array} (x_in, c_noise, cond), got "
                         f"{type(items).__name__}")
    want = {"x_in": (tuple(sample_shape), np.dtype(np.float32)), "c_noise": ((), np.dtype(np.float32))}
    for c in cond_inputs:
        want[c.name] = (tuple(c.shape), np.dtype(str(c.dtype).removeprefix("torch.")))
    out, h = [], hashlib.sha256()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != set(want):
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"calibration[{i}] must have the inputs {sorted(want)}, got {got}")
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                  for k, v in item.items()}
        b = arrays["x_in"].shape[0] if arrays["x_in"].ndim else 0
        for name, (shape, dtype) in want.items():
            a = arrays[name]
            if a.dtype != dtype or a.shape != (b, *shape) or b < 1:
                raise ValueError(f"calibration[{i}][{name!r}] must be {dtype} of shape {(max(b, 1), *shape)}, got "
                                 f"{a.dtype} {a.shape}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"calibration[{i}][{name!r}] must be finite (it has NaN or Inf)")
            h.update(f"{name}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
        out.append(arrays)
    return out, h.hexdigest()


def cpu_capabilities(core=None) -> list:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (e.g. FP32, BF16, INT8)."""
    core = import_openvino().Core() if core is None else core
    return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (its OPTIMIZATION_CAPABILITIES name BF16)."""
    return openvino_available() and "BF16" in cpu_capabilities()


def openvino_cache_root() -> Path:
    return cache_root("openvino")


def _choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


class OpenVinoBackend:
    """``OpenVinoBackend(path, precision="fp32", hint="auto", threads=None, cache=True)``: the ONNX file at ``path``
    run by OpenVINO on the CPU (module docstring).  ``cond_inputs``: the conditioning inputs the file must have
    (``Model.cond``).  ``threads``: OpenVINO's INFERENCE_NUM_THREADS (default: its own choice, every core).
    ``file_sha256``: the file's sha256 when the caller has just computed it from the file (the ONNX cache verifies
    its entries so), to spare a second pass over a large file; computed here otherwise.

    ``calibration`` (precision "int8" only, and needed there): the network inputs to calibrate on, a sequence of
    {input name: array} (x_in (b, C, H, W) and c_noise (b,) float32, every conditioning input; ``check_calibration``),
    or a callable returning them together with ``calibration_key``, a string naming how they are made: then it is
    called only when no compiled blob is cached under that key (a recipe is cheaper to hash than to run)."""

    shares_weights = False   # the compiled model bakes the weights in and cannot take a swap

    @classmethod
    def from_model(cls, model, device: torch.device, digest=None, precision: str = "fp32", **options):
        """The model's network from the ONNX cache (the file alone, checked by its sha256, which the blob cache
        reuses; no ONNX Runtime session), compiled for the CPU.  int8 is calibrated on the model's own sampling
        trajectories (``calibrate.py``), run only when no blob is cached under their recipe; a model with inputs
        calibration cannot make up (text embeddings) is refused: build the backend with real ones."""
        from .onnx_cache import cached_onnx_file, check_exportable

        name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        check_exportable(model, name)
        if device.type != "cpu":
            raise ValueError(f"backend {name!r} runs on the CPU; the device is {device}")
        if precision == "int8":
            from .calibrate import calibration_inputs, calibration_recipe

            if any(c.name != "class_labels" for c in model.cond):
                raise ValueError("backend 'openvino-int8' calibrates on sampling trajectories it runs itself, which "
                                 f"needs inputs it cannot make up ({[c.name for c in model.cond]}): build "
                                 "OpenVinoBackend(path, precision='int8', calibration=edmrt.backends."
                                 "calibration_inputs(model, cond=...)) with real ones")
            options = dict(calibration=lambda: calibration_inputs(model), calibration_key=calibration_recipe(model),
                           **options)
        path, sha = cached_onnx_file(model, device, weights=digest() if digest is not None else None)
        return cls(path, cond_inputs=model.cond, precision=precision, file_sha256=sha, **options)

    def __init__(self, path, cond_inputs=None, precision: str = "fp32", hint: str = "auto", threads: int | None = None,
                 cache: bool = True, file_sha256: str | None = None, calibration=None,
                 calibration_key: str | None = None):
        self.precision = _choice(precision, "precision", PRECISIONS)
        self.hint = _choice(hint, "hint", HINTS)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        self.threads, self.cache = threads, bool(cache)
        if self.cache:
            cache_limit_bytes()   # a malformed EDMRT_OPENVINO_CACHE_GB is said now, not after a compile
        if file_sha256 is not None and (not isinstance(file_sha256, str) or len(file_sha256) != 64):
            raise ValueError(f"file_sha256 must be None or a sha256 hex digest (64 characters), got {file_sha256!r:.80}")
        self.name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        ov = import_openvino()
        self.core = ov.Core()
        if precision == "bf16" and "BF16" not in cpu_capabilities(self.core):
            raise ValueError("precision 'bf16' needs a CPU with bf16 support (AVX512_BF16 or AMX); this one "
                             f"({self.core.get_property('CPU', 'FULL_DEVICE_NAME')}) has none: use precision 'fp32'")
        if precision == "int8":
            if "INT8" not in cpu_capabilities(self.core):
                raise ValueError("precision 'int8' needs a CPU OpenVINO runs int8 on; this one "
                                 f"({self.core.get_property('CPU', 'FULL_DEVICE_NAME')}) has none: use 'fp32'")
            import_nncf()
        self.path = Path(path)
        self.cond_inputs, meta = check_onnx_file(self.path, cond_inputs=cond_inputs)
        if onnx_weight_inputs(meta):
            raise ValueError("the ONNX file takes weights as inputs (a model with adapters, for swaps): OpenVINO "
                             "bakes weights in; export without weight inputs, or use backend 'onnxruntime'")
        self._calibration, self._calibration_fields = None, None
        # The blob cache's key: the file's sha256, computed here unless the caller just did (the ONNX cache's check)
        self.file_sha256 = file_sha256 if file_sha256 is not None else sha256_file(self.path)
        try:
            self._model = self.core.read_model(str(self.path))
        except Exception as exc:
            raise ValueError(f"OpenVINO cannot read {str(self.path)!r}: {type(exc).__name__}: "
                             f"{str(exc).strip()[:300]}") from None
        shape = self._model.input("x_in").get_partial_shape()
        if shape.rank.get_length() != 4 or not all(shape[k].is_static for k in (1, 2, 3)):
            raise ValueError(f"ONNX 'x_in' must have fixed (C, H, W) for OpenVINO's static shapes, got {shape}")
        self.sample_shape = tuple(shape[k].get_length() for k in (1, 2, 3))
        self._quantized_model, self._quantize_lock = None, threading.Lock()
        if precision == "int8":
            self._set_calibration(calibration, calibration_key)
        elif calibration is not None or calibration_key is not None:
            raise ValueError(f"calibration is for precision 'int8' (post-training quantisation), not {precision!r}")
        self._compiled: dict = {}   # batch -> (compiled model, slice count)
        self._idle: OrderedDict = OrderedDict()
        self._idle_count = 0
        self._lock = threading.Lock()
        self.compile_log: list = []   # (batch, hint, streams, seconds, "compiled" | "cache")

    # -- int8 ------------------------------------------------------------------------------------------------------
    def _set_calibration(self, calibration, key) -> None:
        if calibration is None:
            raise ValueError("precision 'int8' needs calibration inputs (calibration=edmrt.backends."
                             "calibration_inputs(model), or backend 'openvino-int8', which records them)")
        if callable(calibration):
            if not isinstance(key, str) or not key:
                raise ValueError("a callable calibration needs calibration_key, a non-empty string naming the recipe")
            self._calibration, self._calibration_fields = calibration, {"recipe": key}
        else:
            if key is not None:
                raise ValueError("calibration_key names a callable calibration's recipe; given arrays are hashed")
            items, digest = check_calibration(calibration, self.sample_shape, self.cond_inputs)
            self._calibration, self._calibration_fields = items, {"sha256": digest, "items": len(items)}
        import nncf

        self._calibration_fields.update(nncf=nncf.__version__, options=repr(sorted(quantize_options(nncf).items())))

    def _quantized(self):
        """The OpenVINO model quantised to int8 on the calibration inputs: once per backend, under its own lock (a
        call compiling another batch size meanwhile waits for it, rather than quantising twice); NNCF's progress
        bars say how far it is."""
        with self._quantize_lock:
            if self._quantized_model is None:
                items = self._calibration
                if callable(items):
                    items, _ = check_calibration(items(), self.sample_shape, self.cond_inputs)
                import nncf

                log.warning("quantising the network to int8 on %d calibration batches (NNCF; once, then cached)",
                            len(items))
                self._quantized_model = nncf.quantize(self._model, nncf.Dataset(items), subset_size=len(items),
                                                      **quantize_options(nncf))
            return self._quantized_model

    # -- compiling -------------------------------------------------------------------------------------------------
    def _streams(self, batch: int) -> tuple[str, int]:
        """(hint, requests per call) for a batch."""
        hint = self.hint
        if hint == "auto":
            hint = "throughput" if batch >= THROUGHPUT_MIN_BATCH else "latency"
        if hint == "latency":
            return "latency", 1
        top = int(self.core.get_property("CPU", "RANGE_FOR_STREAMS")[1])
        if self.threads is not None:
            top = min(top, self.threads)
        n = max(d for d in range(1, min(top, batch) + 1) if batch % d == 0)
        return ("throughput", n) if n > 1 else ("latency", 1)

    def _config(self, hint: str, streams: int) -> dict:
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision], "PERFORMANCE_HINT": hint.upper()}
        if hint == "throughput":
            config["NUM_STREAMS"] = streams
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _shapes(self, rows: int) -> dict:
        shapes = {"x_in": [rows, *self.sample_shape], "c_noise": [rows]}
        for c in self.cond_inputs:
            shapes[c.name] = [rows, *c.shape]
        return shapes

    def compiled(self, batch: int):
        """(compiled model, requests per call) for ``batch``: compiled once per batch size (or read from the blob
        cache), the ONNX file's batch axis fixed to the slice each request runs."""
        with self._lock:
            if batch in self._compiled:
                return self._compiled[batch]
        import time

        hint, n = self._streams(batch)
        shapes, config = self._shapes(batch // n), self._config(hint, n)
        t0 = time.perf_counter()
        compiled, how = self._cached_compile(shapes, config)
        self.compile_log.append((batch, hint, n, round(time.perf_counter() - t0, 3), how))
        with self._lock:
            self._compiled.setdefault(batch, (compiled, n))
            return self._compiled[batch]

    def _cached_compile(self, shapes: dict, config: dict):
        fields = {"format": OV_CACHE_FORMAT, "onnx_sha256": self.file_sha256, "openvino": self._version(),
                  "cpu": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
                  "capabilities": sorted(cpu_capabilities(self.core)),
                  "config": {k: str(v) for k, v in config.items()}, "shapes": shapes}
        if self.precision == "int8":
            fields["int8"] = self._calibration_fields
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        root = openvino_cache_root()
        blob, manifest = root / f"{key}.blob", root / f"{key}.manifest.json"
        if self.cache:
            problem = _check_blob(blob, manifest, fields)
            if problem is None:
                try:
                    compiled = self.core.import_model(io.BytesIO(blob.read_bytes()), "CPU", config)
                    _touch(blob)   # recently used: the size bound removes the least recently used first
                    return compiled, "cache"
                except Exception as exc:   # a blob this OpenVINO cannot import after all: compile again
                    problem = f"OpenVINO cannot import it: {type(exc).__name__}: {str(exc).strip()[:200]}"
            if problem != "missing":
                log.warning("OpenVINO cache entry %s is not usable (%s): compiling again", blob, problem)
        model = (self._quantized() if self.precision == "int8" else self._model).clone()
        model.reshape(shapes)
        compiled = self.core.compile_model(model, "CPU", config)
        if self.cache:
            _write_blob(blob, manifest, fields, compiled.export_model().getvalue())
        return compiled, "compiled"

    @staticmethod
    def _version() -> str:
        import openvino as ov

        return ov.__version__

    # -- running ---------------------------------------------------------------------------------------------------
    def _requests(self, x_in, c_noise, cond, out) -> list:
        """Inference requests bound to slices of these buffers (their memory shared, not copied)."""
        import openvino as ov

        B = x_in.shape[0]
        compiled, n = self.compiled(B)
        rows = B // n
        tensors = {"x_in": x_in, "c_noise": c_noise.reshape(B), **{c.name: cond[c.name] for c in self.cond_inputs}}
        reqs = []
        for i in range(n):
            r = compiled.create_infer_request()
            sl = slice(i * rows, (i + 1) * rows)
            for name, t in tensors.items():
                r.set_tensor(name, ov.Tensor(t[sl].numpy(), shared_memory=True))
            r.set_output_tensor(0, ov.Tensor(out[sl].numpy(), shared_memory=True))
            reqs.append(r)
        return reqs

    def _key(self, x_in, c_noise, cond, out):
        def k(t):
            return t.data_ptr(), t.shape, t.dtype, t.device

        return k(x_in), k(c_noise), k(out), tuple(sorted((str(n), k(t)) for n, t in cond.items()))

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None:
        check_backend_args(x_in, c_noise, cond, out, self.cond_inputs, torch.float32, torch.float32,
                           self.sample_shape)
        if x_in.device.type != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU; x_in is on {x_in.device}")
        cond = as_cond(cond)
        key = self._key(x_in, c_noise, cond, out)
        with self._lock:
            idle = self._idle.get(key)
            reqs = idle.pop() if idle else None
            if reqs is not None:
                self._idle_count -= 1
        if reqs is None:
            reqs = self._requests(x_in, c_noise, cond, out)
        if len(reqs) == 1:
            reqs[0].infer()
        else:
            for r in reqs:
                r.start_async()
            for r in reqs:
                r.wait()
        self._checkin(key, reqs)

    def _checkin(self, key, reqs) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(reqs)
            self._idle.move_to_end(key)
            self._idle_count += 1
            while self._idle_count > MAX_REQUESTS:
                oldest, idle = next(iter(self._idle.items()))
                idle.pop(0)
                self._idle_count -= 1
                if not idle:
                    del self._idle[oldest]


def _check_blob(blob: Path, manifest: Path, fields: dict) -> str | None:
    """None when the cached blob and its manifest are intact and name ``fields``; otherwise why not."""
    problem, m = check_manifest(blob, manifest, fields)
    if problem is None and sha256_file(blob) != m.get("sha256"):
        problem = "the blob does not match its recorded sha256 (corrupt or replaced)"
    return problem


def _write_blob(blob: Path, manifest: Path, fields: dict, data: bytes) -> None:
    """The blob, then its manifest, each written atomically; then the cache trimmed to its size bound."""
    record = json.dumps(dict(fields, sha256=hashlib.sha256(data).hexdigest(), size=len(data)), indent=1)
    atomic_write(blob, data)
    atomic_write(manifest, record.encode())
    trim_cache(blob.parent, keep=blob)


def _touch(path: Path) -> None:
    try:
        os.utime(path, follow_symlinks=False)
    except OSError:   # a read-only cache still works; only its eviction order is older
        pass


def cache_limit_bytes() -> int:
    """The blob cache's size bound: ``EDMRT_OPENVINO_CACHE_GB`` (default ``CACHE_GB``), in bytes."""
    raw = os.environ.get("EDMRT_OPENVINO_CACHE_GB")
    try:
        gb = CACHE_GB if raw is None else float(raw)
    except ValueError:
        gb = float("nan")
    if not (gb >= 0 and gb < float("inf")):
        raise ValueError(f"EDMRT_OPENVINO_CACHE_GB must be a number of gigabytes >= 0, got {raw!r}")
    return int(gb * 2**30)


def trim_cache(root: Path, keep: Path | None = None) -> list:
    """Remove the least recently used blobs (and their manifests) until the cache's blobs fit ``cache_limit_bytes``;
    never ``keep`` (the blob just written).  A hit refreshes a blob's time.  Only regular files named like the
    cache's own are counted or removed; a file another process removes first is skipped.  Returns the removed
    blobs."""
    limit = cache_limit_bytes()
    blobs = []
    for f in root.glob("*.blob"):
        try:
            st = f.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            blobs.append((st.st_mtime_ns, st.st_size, f))
    total, removed = sum(b[1] for b in blobs), []
    for _, size, f in sorted(blobs, key=lambda b: b[0]):
        if total <= limit:
            break
        if keep is not None and f == keep:
            continue
        for gone in (f, f.with_name(f"{f.stem}.manifest.json")):
            try:
                gone.unlink()
            except FileNotFoundError:
                pass
        total -= size
        removed.append(f)
    if removed:
        log.warning("OpenVINO cache over %.1f GB: removed %d least recently used blob(s)", limit / 2**30, len(removed))
    return removed
