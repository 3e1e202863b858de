"""The one atomic writer and file digest every cache and the renderer share (edmrt.backends.cachefile)."""
from __future__ import annotations

import hashlib
import os
import stat

import pytest

from edmrt.backends.cachefile import TEMP_GLOB, atomic_write, sha256_file


@pytest.mark.parametrize("private", [True, False])
def test_atomic_write_replaces_a_link_and_never_writes_through_it(tmp_path, private):
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep me")
    path = tmp_path / "out" / "file.bin"
    path.parent.mkdir()
    path.symlink_to(target)
    atomic_write(path, b"new bytes", private=private)
    assert not path.is_symlink() and path.read_bytes() == b"new bytes" and target.read_bytes() == b"keep me"
    assert not list(path.parent.glob(TEMP_GLOB))


def test_private_files_are_the_owners_and_others_get_the_umasks_mode(tmp_path):
    atomic_write(tmp_path / "cache.bin", b"x")
    assert stat.S_IMODE((tmp_path / "cache.bin").stat().st_mode) == 0o600
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "render.png", b"x", private=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "render.png").stat().st_mode) == 0o644


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    for private in (True, False):
        with pytest.raises(TypeError):
            atomic_write(tmp_path / "f.bin", "text, not bytes", private=private)   # the write itself fails
        assert not (tmp_path / "f.bin").exists() and not list(tmp_path.glob(TEMP_GLOB))


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    data = os.urandom(3 << 20 | 17)   # several read blocks and a partial one
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
