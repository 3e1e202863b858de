"""The ONNX cache: a torch model's network exported once to ONNX, keyed by its weights, verified on every load.

``$EDMRT_CACHE/onnx/<key>-<dtype>.onnx`` (default ``~/.cache/edmrt``) with ``<key>-<dtype>.manifest.json`` beside it.
The key is a sha256 of its fields (``onnx_cache_fields``): the cache format, the network's ``weights_sha256``, its
class and config, the sample shape, the classes, the conditioning inputs (``Model.cond``, each ``to_dict()``: name,
per-sample shape, dtype, null, classes), the precision, the torch version and, when any, the parameters exported as
weight inputs (``weight_inputs``, in their order; absent when there are none, so entries without them keep their key).  The manifest holds those
fields and the sha256 of every file the export wrote.  An entry is used only when it is a regular file (not a
symbolic link), its manifest's fields are the expected ones, every file matches its recorded sha256 (the external
data file too, for a network over 2 GB), the file passes ``load_onnx_session``'s checks (its inputs are the model's
conditioning inputs) and its ``edmrt.weights_sha256`` is the network's.  Anything else (truncated,
corrupt, another model's file, an edited manifest, a link or an empty directory at the path) is logged with the
reason and exported again, never trusted; a non-empty directory at the path is refused (ValueError), not deleted.
The export writes atomically and replaces a link instead of writing through it (``edmrt.export.onnx``).

The exporter is imported only here, and only to build a missing or unusable file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ..model import Model
from .cachefile import atomic_write, cache_root, check_manifest, sha256_file
from ..onnx_contract import load_onnx_session, onnx_weight_inputs, weights_sha256

__all__ = ["onnx_cache_root", "onnx_cache_fields", "onnx_cache_path", "onnx_manifest_path", "cached_onnx",
           "cached_onnx_file", "check_exportable", "ONNX_CACHE_FORMAT"]

log = logging.getLogger("edmrt.backends")

# In every key and manifest; 2: manifests and edmrt.weights_sha256 (1 had neither); 3: named conditioning inputs
# (x_in, c_noise, *cond) and the cond field.
ONNX_CACHE_FORMAT = 3


def onnx_cache_root() -> Path:
    return cache_root("onnx")


def onnx_cache_fields(model: Model, dtype: str = "fp32", weight_inputs=(), weights: str | None = None) -> dict:
    """What the key hashes and the manifest records: everything that changes the exported file.  ``weights``: the
    network's ``weights_sha256`` when the caller has just computed it (hashing a large network takes seconds)."""
    net = model.network
    fields = dict(format=ONNX_CACHE_FORMAT, weights_sha256=weights or weights_sha256(net), network=type(net).__name__,
                  config=repr(getattr(net, "config", None)), sample_shape=list(model.sample_shape),
                  num_classes=model.num_classes, cond=[c.to_dict() for c in model.cond], dtype=dtype,
                  torch=torch.__version__)
    weight_inputs = _check_weight_names(weight_inputs)
    if weight_inputs:
        fields["weight_inputs"] = list(weight_inputs)
    return json.loads(json.dumps(fields))  # as the manifest will hold them


def _check_weight_names(weight_inputs) -> tuple:
    if isinstance(weight_inputs, str) or not isinstance(weight_inputs, (tuple, list)) \
            or not all(isinstance(n, str) for n in weight_inputs):
        raise ValueError(f"weight_inputs must be a sequence of parameter names, got {weight_inputs!r:.200}")
    return tuple(weight_inputs)


def onnx_cache_path(model: Model, dtype: str = "fp32", fields: dict | None = None, weight_inputs=()) -> Path:
    """Where ``model``'s network is exported for ONNX Runtime / TensorRT (the key in the module docstring)."""
    fields = onnx_cache_fields(model, dtype, weight_inputs) if fields is None else fields
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    return onnx_cache_root() / f"{key}-{dtype}.onnx"


def onnx_manifest_path(path: Path) -> Path:
    """The manifest beside a cache entry: ``<key>-<dtype>.manifest.json``."""
    return path.with_name(f"{path.stem}.manifest.json")


def check_exportable(model: Model, backend: str) -> None:
    """ValueError unless the model's network can be exported to ONNX for ``backend`` (a torch module)."""
    if not isinstance(model.network, torch.nn.Module):
        raise ValueError(f"backend {backend!r} exports the network to ONNX: it must be a torch.nn.Module")


def cached_onnx(model: Model, device: torch.device, weight_inputs=(), sess_options=None, weights: str | None = None):
    """(path, session or None): the model's cached ONNX file, loaded and checked when it is usable; otherwise
    exported again (from the CPU, the network then returned to ``device``) and the session left to the caller.

    ``weight_inputs``: parameter names exported as graph inputs (``export_onnx(weight_inputs=...)``; part of the key);
    the caller binds them (``OnnxRuntimeBackend(path_or_session, weights=...)``).  ``sess_options``: the
    ``onnxruntime.SessionOptions`` the checked session is opened with (threads), so a caller can keep it.
    ``weights``: the network's ``weights_sha256`` when the caller has it (``cached_onnx_file``)."""
    if not isinstance(model.network, torch.nn.Module):
        raise ValueError("exporting to ONNX needs the network to be a torch.nn.Module")
    weight_inputs = _check_weight_names(weight_inputs)
    fields = onnx_cache_fields(model, weight_inputs=weight_inputs, weights=weights)
    path = onnx_cache_path(model, fields=fields)
    problem, _ = _check_entry(path, fields)
    if problem is None:
        try:
            session = load_onnx_session(path, cond_inputs=model.cond, sess_options=sess_options)
        except ValueError as exc:
            problem = str(exc)
        else:
            meta = session.get_modelmeta().custom_metadata_map
            stored = meta.get("edmrt.weights_sha256")
            stored_inputs = tuple(onnx_weight_inputs(meta).values())
            if stored != fields["weights_sha256"]:
                problem = f"the file holds the weights {stored!r}, not the network's {fields['weights_sha256']!r}"
            elif stored_inputs != weight_inputs:
                problem = f"the file's weight inputs are {list(stored_inputs)}, not {list(weight_inputs)}"
            else:
                return path, session
    _export_again(model, device, path, fields, weight_inputs, problem)
    return path, None


def cached_onnx_file(model: Model, device: torch.device, weights: str | None = None) -> tuple[Path, str]:
    """(path, sha256) of the model's cached ONNX file (no weight inputs), for a runtime that opens the file itself
    (OpenVINO): the entry checked against its manifest, every file by its sha256, without an ONNX Runtime session;
    or exported again.  The sha256 returned is the one just computed from the file's bytes.  ``weights``: the
    network's ``weights_sha256`` when the caller has it (``backend="auto"`` hashes the weights once for every
    candidate)."""
    if not isinstance(model.network, torch.nn.Module):
        raise ValueError("exporting to ONNX needs the network to be a torch.nn.Module")
    fields = onnx_cache_fields(model, weights=weights)
    path = onnx_cache_path(model, fields=fields)
    problem, digest = _check_entry(path, fields)
    if problem is None:
        return path, digest
    return path, _export_again(model, device, path, fields, (), problem)


def _export_again(model: Model, device: torch.device, path: Path, fields: dict, weight_inputs: tuple,
                  problem: str) -> str:
    """Export over an unusable entry (said, unless it was missing); the network back on ``device``; the file's sha256."""
    if problem != "missing":
        log.warning("ONNX cache entry %s is not usable (%s): exporting again", path, problem)
    for p in (path, onnx_manifest_path(path)):
        _clear_directory(p)
    digest = _export(model, path, fields, weight_inputs)
    model.network.to(device)
    return digest


def _check_entry(path: Path, fields: dict) -> tuple[str | None, str | None]:
    """(None, the file's sha256) when the entry and its manifest are intact and name ``fields``; otherwise (why not,
    None) ("missing": no entry)."""
    problem, m = check_manifest(path, onnx_manifest_path(path), fields)
    if problem is not None:
        return problem, None
    files = m.get("files")
    if not isinstance(files, dict) or path.name not in files:
        return f"manifest lists no sha256 for {path.name}", None
    for name, digest in files.items():
        f = path.parent / str(name)
        if Path(str(name)).name != name or f.is_symlink() or not f.is_file():
            return f"{name!r} is not a regular file beside the entry", None
        if sha256_file(f) != digest:
            return f"{name} does not match its recorded sha256 (corrupt or replaced)", None
    return None, files[path.name]


def _clear_directory(path: Path) -> None:
    """Remove an empty directory at a cache file's path; refuse a non-empty one (the cache deletes only its files)."""
    if path.is_dir() and not path.is_symlink():
        try:
            path.rmdir()
        except OSError:
            raise ValueError(f"the ONNX cache path {str(path)!r} is a non-empty directory: remove it "
                             f"(expected the cache's file there)") from None


def _export(model: Model, path: Path, fields: dict, weight_inputs: tuple = ()) -> str:
    """Export the network to ``path`` (atomically), then write its manifest (atomically, after the file); returns
    the file's sha256."""
    from edmrt.export.onnx import export_onnx

    log.warning("exporting the network to ONNX (once; cached at %s)", path)
    name = model.metadata.get("name")
    named = {"model": name} if isinstance(name, str) and name else None  # edmrt sample --onnx checks it
    report = export_onnx(model.network.cpu().eval(), path, sample_shape=model.sample_shape,
                         num_classes=model.num_classes, cond_inputs=model.cond, metadata=named,
                         weight_inputs=weight_inputs)
    manifest = dict(fields, files=report.files, opset=report.opset, max_abs_err=report.max_abs_err,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # replaces a link at the name, never writes through it
    atomic_write(onnx_manifest_path(path), json.dumps(manifest, indent=1).encode())
    return report.files[path.name]
