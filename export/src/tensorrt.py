"""TensorRT engines from ONNX files, with a cache whose key hashes everything that changes an engine.

``build_engine`` (the ``tensorrt`` Python API, imported lazily) parses the ONNX file, sets one
optimisation profile (min / opt / max batch on the batch axis of every input: x_in, c_noise and each
conditioning input, by name), fp16 or bf16, and a timing cache, and serialises the engine.
``EngineCache`` stores engines under ``<root>/<key>/engine.plan`` with ``manifest.json`` beside; the key is a sha256 of (ONNX bytes, profile, precision, TensorRT version, GPU compute
capability, format version).  On load the manifest and the engine's own sha256 are verified; a
missing, mismatched or corrupt entry is rebuilt, never trusted.  ``TensorRTBackend`` runs an engine
on torch's current CUDA stream with device buffers bound by address (so a CUDA graph can capture it).

UNVERIFIED: TensorRT cannot be installed on the machines this was written on; the cache logic is
tested with an injected builder, the TensorRT calls themselves have not run anywhere yet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from edmrt.backends.cachefile import atomic_write, cache_root, check_manifest, sha256_file
from edmrt.backends.trt import import_tensorrt

log = logging.getLogger("edmrt.tensorrt")

__all__ = ["Profile", "EngineCache", "build_engine", "CACHE_FORMAT"]

CACHE_FORMAT = 2  # 2: Profile.cond_shapes; engines of (x_in, c_noise, *cond) files
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Profile:
    """One optimisation profile over the batch dimension, for a sample shape (C, H, W).

    Every input's batch axis gets (min_batch, opt_batch, max_batch); its other dims are the ONNX file's, fixed for
    an edmrt export.  ``cond_shapes`` ({name: per-sample shape}, stored sorted as pairs) fills a conditioning input
    whose per-sample dims the file leaves symbolic (a foreign export's sequence length)."""

    sample_shape: tuple
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64
    cond_shapes: tuple = ()

    def __post_init__(self):
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ValueError(f"profile needs 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))
        shapes = self.cond_shapes.items() if isinstance(self.cond_shapes, dict) else self.cond_shapes
        try:
            if any(isinstance(s, (str, bytes)) for _, s in shapes):
                raise TypeError
            shapes = tuple(sorted((str(n), tuple(int(d) for d in s)) for n, s in shapes))
        except (TypeError, ValueError):
            raise ValueError(f"cond_shapes must map input names to per-sample shapes, got {self.cond_shapes!r}") from None
        if any(d < 1 for _, s in shapes for d in s):
            raise ValueError(f"cond_shapes must hold positive dims, got {self.cond_shapes!r}")
        object.__setattr__(self, "cond_shapes", shapes)


def build_engine(onnx_path: Path, profile: Profile, precision: str, timing_cache: Path | None = None,
                 refit: bool = False) -> bytes:
    """Build a serialised TensorRT engine from an ONNX file (through the API, never a shell command).
    ``refit``: a refittable engine (``BuilderFlag.REFIT``), whose weights ``trt.Refitter`` replaces in place
    (``TensorRTBackend.update_weights``: an adapter swap without a rebuild)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    cond_shapes = dict(profile.cond_shapes)
    for i in range(network.num_inputs):  # x_in, c_noise, then the conditioning inputs: each batch axis, by name
        inp = network.get_input(i)
        rest = tuple(inp.shape)[1:]
        if any(d < 0 for d in rest):
            if inp.name == "x_in":  # the image input: fill C, H, W from the profile
                rest = profile.sample_shape
            elif inp.name in cond_shapes and len(cond_shapes[inp.name]) == len(rest):
                rest = cond_shapes[inp.name]
            else:
                raise ValueError(f"ONNX input {inp.name!r} of {onnx_path} has symbolic per-sample dims {list(inp.shape)}: "
                                 f"give them in Profile(cond_shapes={{{inp.name!r}: (...)}})")
        opt.set_shape(inp.name, (profile.min_batch, *rest), (profile.opt_batch, *rest), (profile.max_batch, *rest))
    config.add_optimization_profile(opt)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(blob)


class EngineCache:
    """Engines keyed by everything that changes them; manifest verified on load, rebuilt on mismatch."""

    def __init__(self, root: str | os.PathLike | None = None,
                 builder: Callable[[Path, Profile, str, Path | None], bytes] = build_engine,
                 trt_version: str | None = None, compute_capability: str | None = None):
        self.root = Path(root or cache_root("tensorrt"))
        self.builder = builder
        self._trt_version = trt_version
        self._cc = compute_capability

    @property
    def trt_version(self) -> str:
        if self._trt_version is None:
            self._trt_version = import_tensorrt().__version__
        return self._trt_version

    @property
    def compute_capability(self) -> str:
        if self._cc is None:
            if not torch.cuda.is_available():
                raise RuntimeError("TensorRT engines need a CUDA GPU (torch.cuda.is_available() is False)")
            major, minor = torch.cuda.get_device_capability()
            self._cc = f"{major}.{minor}"
        return self._cc

    def key_fields(self, onnx_path: Path, profile: Profile, precision: str, refit: bool = False) -> dict:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        fields = dict(format=CACHE_FORMAT, onnx_sha256=sha256_file(onnx_path), profile=asdict(profile),
                      precision=precision, tensorrt=self.trt_version, compute_capability=self.compute_capability)
        if refit:
            fields["refit"] = True
        return json.loads(json.dumps(fields))  # as the manifest will hold them (tuples become lists)

    def key(self, fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, onnx_path: str | os.PathLike, profile: Profile, precision: str = "fp16", refit: bool = False) -> Path:
        """The engine file for these inputs: verified from the cache, or (re)built and recorded.  ``refit``: a
        refittable engine (part of the key)."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ValueError(f"ONNX file not found: {onnx_path}")
        fields = self.key_fields(onnx_path, profile, precision, refit)
        entry = self.root / self.key(fields)
        engine, manifest = entry / "engine.plan", entry / "manifest.json"
        problem = self._verify(engine, manifest, fields)
        if problem is None:
            log.info("TensorRT engine cache hit: %s", entry)
            return engine
        if problem != "missing":
            log.warning("TensorRT engine cache entry %s is not usable (%s): rebuilding", entry, problem)
        entry.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        timing = self.root / "timing.cache"
        blob = self.builder(onnx_path, profile, precision, timing, refit=True) if refit else \
            self.builder(onnx_path, profile, precision, timing)
        atomic_write(engine, blob)
        atomic_write(manifest, json.dumps(dict(fields, engine_sha256=sha256_file(engine), engine_bytes=len(blob),
                                               build_seconds=round(time.perf_counter() - t0, 2),
                                               created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                                          indent=1).encode())
        return engine

    @staticmethod
    def _verify(engine: Path, manifest: Path, fields: dict) -> str | None:
        """Why the entry is not usable ("missing" when neither file is there), or None."""
        problem, m = check_manifest(engine, manifest, fields)
        if problem is not None:
            return problem
        if m.get("engine_sha256") != sha256_file(engine):
            return "engine file does not match its recorded sha256 (corrupt or replaced)"
        return None
