"""What every on-disk cache of the backends shares (its folder, ``cache_root``) (the ONNX exports, OpenVINO's compiled blobs, "auto"'s choices):
an entry file with a JSON manifest beside it, checked before use, and files written atomically.

``check_manifest(entry, manifest, fields)``: why an entry is not usable, or None: both files are regular files (not
symbolic links), the manifest is a JSON object and holds ``fields``.  What the entry's bytes must hash to is the
caller's own check (the manifests record it differently).  ``atomic_write(path, data)``: a temporary file beside
``path`` (mode 0600, or the umask's for files others read: ``private=False``), renamed into place, so a killed
process never leaves a partial file under the name and a link at the name is replaced, never written through; the
temporary file is removed when writing fails.  ``sha256_file(path)``: the digest of a file's bytes, read in blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

__all__ = ["cache_root", "check_manifest", "atomic_write", "sha256_file", "TEMP_GLOB"]

# Every temporary file atomic_write makes is named ".<name>.<random>.tmp" beside its destination: what a clean-up of
# a killed writer's leftovers globs for.
TEMP_GLOB = ".*.tmp"


def cache_root(kind: str) -> Path:
    """``$EDMRT_CACHE/<kind>`` (default ``~/.cache/edmrt/<kind>``): where one cache keeps its entries."""
    return Path(os.environ.get("EDMRT_CACHE", Path.home() / ".cache" / "edmrt")) / kind


def check_manifest(entry: Path, manifest: Path, fields: dict) -> tuple[str | None, dict | None]:
    """(None, the manifest) when both files are intact and the manifest names ``fields``; else (why not, None),
    the reason "missing" when neither file exists."""
    if not os.path.lexists(entry) and not os.path.lexists(manifest):
        return "missing", None
    for p in (entry, manifest):
        if p.is_symlink() or not p.is_file():
            return f"{p.name} is {'a symbolic link' if p.is_symlink() else 'missing or not a regular file'}", None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"manifest unreadable: {exc}", None
    if not isinstance(m, dict):
        return "manifest is not a JSON object", None
    for k, v in json.loads(json.dumps(fields)).items():   # as the manifest holds them
        if m.get(k) != v:
            return f"manifest field {k!r} is {m.get(k)!r}, expected {v!r}", None
    return None, m


def atomic_write(path: Path, data: bytes, private: bool = True) -> None:
    """``data`` at ``path`` by temporary file + rename (module docstring); creates the folder.  ``private``: the file
    is readable by its owner only (0600, caches); False: the umask's mode (0666 masked), for output others read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:  # O_EXCL: a new file, never one a link points at
        tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
