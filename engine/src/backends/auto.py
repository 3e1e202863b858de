"""``backend="auto"`` on the CPU: the fastest installed backend for a (model, batch), chosen by measurement.

At the first call with a batch size it has not seen, ``AutoBackend`` builds every candidate (torch eager, ONNX
Runtime, OpenVINO fp32 when installed; with ``"auto-bf16"`` also OpenVINO bf16 where the CPU has bf16), runs each on
that call's own inputs once to warm up, compares its F with torch eager's (the reference), times ``evals``
interleaved rounds (more, up to ``MAX_ROUNDS``, until each has run ``MIN_SECONDS``), and keeps the fastest whose relative RMS difference from torch is within the tolerance
(``TOLERANCE``: 1e-4 for "auto", 5e-2 for "auto-bf16").  Every later call with that batch goes straight to it.

The choice is cached in ``$EDMRT_CACHE/auto/<key>.json`` (default ``~/.cache/edmrt``), keyed by the network's
weights, the batch, the per-sample shapes, the CPU, the thread count, the candidates and their versions, so a
second process skips the measurement; an unreadable or inconsistent entry is measured again and rewritten
atomically.  ``EDMRT_AUTO_BACKEND=<name>`` pins the choice (no measurement: reproducible runs, CI).

What was picked and why: ``AutoBackend.choices`` ({batch: the table}), logged at INFO on ``edmrt.backends``, and
printed by ``edmrt sample``.  Threads: concurrent first calls with one batch size wait for one measurement (a lock).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .cachefile import atomic_write, cache_root

__all__ = ["AutoBackend", "TOLERANCE", "auto_cache_root", "cpu_name"]

log = logging.getLogger("edmrt.backends")

TOLERANCE = {"auto": 1e-4, "auto-bf16": 5e-2}   # relative RMS of F against torch eager fp32
MIN_SECONDS = 0.2      # the timed rounds go on until every candidate has run this long in all (or MAX_ROUNDS)
MAX_ROUNDS = 25
AUTO_CACHE_FORMAT = 1


def auto_cache_root() -> Path:
    return cache_root("auto")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(names) -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for dist, prefix in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        if any(n.startswith(prefix) for n in names):
            try:
                out[dist] = md.version(dist)
            except md.PackageNotFoundError:
                out[dist] = None
    return out


class AutoBackend:
    """Dispatches each call to the backend measured fastest for its batch size (module docstring).

    ``build``: name -> backend (``resolve_backend`` of the model); ``candidates``: names, "torch" first (the
    reference); ``weights``: the network's weights sha256 (part of the cache key), or a function giving it, called
    only when the key is needed (not when EDMRT_AUTO_BACKEND pins the choice)."""

    def __init__(self, build: Callable, candidates, mode: str, weights: str, evals: int = 3, cache: bool = True):
        if mode not in TOLERANCE:
            raise ValueError(f"mode must be one of {sorted(TOLERANCE)}, got {mode!r}")
        if not candidates or candidates[0] != "torch":
            raise ValueError(f"candidates must start with 'torch' (the reference), got {candidates!r}")
        self.name, self.mode, self.tolerance = mode, mode, TOLERANCE[mode]
        self.candidates, self.weights, self.evals, self.cache = tuple(candidates), weights, int(evals), bool(cache)
        self._build, self._built, self._by_batch = build, {}, {}
        self.choices: dict = {}   # batch -> {"picked": name, "source": "measured" | "cache" | "pinned", "table": ...}
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build the candidates now (the ONNX export, sessions), as a named backend is built when its Sampler is:
        the first call then only measures.  With EDMRT_AUTO_BACKEND set, only the pinned one."""
        pinned = os.environ.get("EDMRT_AUTO_BACKEND")
        for name in ([pinned] if pinned in self.candidates else [] if pinned else self.candidates):
            try:
                self.backend(name)
            except Exception as exc:   # reported, and left out, at the first call's measurement
                log.warning("backend %s: candidate %s cannot be built (%s)", self.mode, name, exc)

    def backend(self, name: str):
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond, out: torch.Tensor) -> None:
        backend = self._by_batch.get(x_in.shape[0])
        if backend is None:
            with self._lock:
                backend = self._by_batch.get(x_in.shape[0]) or self._choose(x_in, c_noise, cond, out)
        backend(x_in, c_noise, cond, out)

    def _choose(self, x_in, c_noise, cond, out):
        B = x_in.shape[0]
        pinned = os.environ.get("EDMRT_AUTO_BACKEND")
        if pinned:
            if pinned not in self.candidates:
                raise ValueError(f"EDMRT_AUTO_BACKEND must name one of {list(self.candidates)} (installed here), "
                                 f"got {pinned!r}")
            choice = {"picked": pinned, "source": "pinned (EDMRT_AUTO_BACKEND)", "table": []}
        else:
            key = self._key(x_in, cond)
            choice = self._read(key) if self.cache else None
            if choice is None:
                choice = dict(self._measure(x_in, c_noise, cond, out), source="measured")
                if self.cache:
                    _write_json(auto_cache_root() / f"{key}.json", dict(choice, key_fields=self._fields(x_in, cond)))
            else:
                choice["source"] = "cache"
        self.choices[B] = choice
        log.info("backend %s picked %s for batch %d (%s): %s", self.mode, choice["picked"], B, choice["source"],
                 describe_choice(choice))
        self._by_batch[B] = self.backend(choice["picked"])
        return self._by_batch[B]

    def _fields(self, x_in, cond) -> dict:
        shapes = {"x_in": list(x_in.shape)}
        shapes.update({k: list(v.shape) for k, v in (cond or {}).items()} if isinstance(cond, dict) else {})
        if callable(self.weights):
            self.weights = self.weights()
        return {"format": AUTO_CACHE_FORMAT, "mode": self.mode, "weights": self.weights, "shapes": shapes,
                "cpu": cpu_name(), "threads": torch.get_num_threads(), "candidates": list(self.candidates),
                "versions": _versions(self.candidates), "tolerance": self.tolerance}

    def _key(self, x_in, cond) -> str:
        return hashlib.sha256(json.dumps(self._fields(x_in, cond), sort_keys=True).encode()).hexdigest()[:32]

    def _read(self, key: str) -> dict | None:
        path = auto_cache_root() / f"{key}.json"
        if not path.exists():
            return None
        try:
            if path.is_symlink():
                raise ValueError("a symbolic link")
            entry = json.loads(path.read_text())
            if entry.get("picked") not in self.candidates or not isinstance(entry.get("table"), list):
                raise ValueError(f"picked {entry.get('picked')!r} is not a candidate")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("auto backend cache entry %s is not usable (%s): measuring again", path, exc)
            return None
        return {"picked": entry["picked"], "table": entry["table"]}

    def _measure(self, x_in, c_noise, cond, out) -> dict:
        """Warm every candidate on these inputs, check its F against torch's, time interleaved rounds."""
        outs, rows = {}, []
        for name in self.candidates:
            try:
                b = self.backend(name)
                outs[name] = torch.empty_like(out)
                b(x_in, c_noise, cond, outs[name])   # warm-up (and compile, for OpenVINO) on this batch
            except Exception as exc:   # a candidate that cannot run here is reported, not picked
                outs.pop(name, None)
                rows.append({"backend": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        ref = outs["torch"].double()
        scale = ref.pow(2).mean().sqrt().clamp_min(1e-30)
        times: dict = {name: [] for name in outs}
        rounds = 0
        while rounds < self.evals or (rounds < MAX_ROUNDS and min(map(sum, times.values())) < MIN_SECONDS):
            rounds += 1
            for name in outs:
                t0 = time.perf_counter()
                self.backend(name)(x_in, c_noise, cond, outs[name])
                times[name].append(time.perf_counter() - t0)
        for name in outs:
            err = float((outs[name].double() - ref).pow(2).mean().sqrt() / scale)
            ok = bool(torch.isfinite(outs[name]).all()) and err <= self.tolerance
            rows.append({"backend": name, "ms": 1000 * statistics.median(times[name]), "rel_rms": err, "ok": ok})
        fine = [r for r in rows if r.get("ok")]
        picked = min(fine, key=lambda r: r["ms"])["backend"] if fine else "torch"
        return {"picked": picked, "table": rows}


def describe_choice(choice: dict) -> str:
    """One line: each candidate's time and difference from torch, or why it could not run."""
    parts = []
    for r in choice.get("table", []):
        if "error" in r:
            parts.append(f"{r['backend']} failed ({r['error'][:60]})")
        else:
            parts.append(f"{r['backend']} {r['ms']:.2f} ms (rel. RMS {r['rel_rms']:.1e}{'' if r['ok'] else ', over'})")
    return ", ".join(parts) or "no measurement"


def _write_json(path: Path, entry: dict) -> None:
    atomic_write(path, json.dumps(entry, indent=1).encode())
