"""Streaming checksums and the inspect service built on them."""

from __future__ import annotations

import hashlib
from typing import Any

from proj.files.sniff import sniff
from proj.files.storage import CHUNK_SIZE, ProgressCallback, Storage, io_errors, no_progress


def sha256_file(handle: Any, total: int, on_progress: ProgressCallback = no_progress) -> tuple[int, str]:
    """Hash an open binary file in fixed-size chunks; return (bytes read, hex digest)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    done = 0
    while count := handle.readinto(buffer):
        digest.update(view[:count])
        done += count
        on_progress(done, total)
    return done, digest.hexdigest()


def inspect_file(storage: Storage, key: str, on_progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Size, SHA-256 and the content-sniffed type of the file at `key`."""
    with io_errors(key):
        path = storage.file(key)
        kind = sniff(path)
        with path.open("rb", buffering=0) as handle:
            size, sha256 = sha256_file(handle, path.stat().st_size, on_progress)
    return {"key": key, "size": size, "sha256": sha256, "mime": kind.mime, "kind": kind.kind}
