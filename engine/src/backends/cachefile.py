"""What every on-disk cache of the backends shares (its folder, ``cache_root``) (the ONNX exports, OpenVINO's compiled blobs, "auto"'s choices):
an entry file with a JSON manifest beside it, checked before use, and files written atomically.

``check_manifest(entry, manifest, fields)``: why an entry is not usable, or None: both files are regular files (not
symbolic links), the manifest is a JSON object and holds ``fields``.  What the entry's bytes must hash to is the
caller's own check (the manifests record it differently).  ``atomic_write(path, data)``: a temporary file beside
``path`` (mode 0600), renamed into place, so a killed process never leaves a partial file under the name and a link
at the name is replaced, never written through; the temporary file is removed when writing fails.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["cache_root", "check_manifest", "atomic_write"]


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


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` by temporary file + rename (module docstring); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
