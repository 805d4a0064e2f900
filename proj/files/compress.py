"""Streaming compression of a stored file to gzip or zstd."""

from __future__ import annotations

import gzip
from typing import IO, Any

import zstandard

from proj.errors import InvalidFileError
from proj.files.storage import CHUNK_SIZE, ProgressCallback, Storage, derived_key, io_errors, no_progress

FORMATS = {"gzip": "gz", "zstd": "zst"}
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


def compress(
    storage: Storage, key: str, fmt: str = "gzip", on_progress: ProgressCallback = no_progress
) -> dict[str, Any]:
    """Compress `key` to derived/<key>/compressed.<gz|zst>; return the output key, sizes and ratio."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise InvalidFileError(f"unknown compression format {fmt!r:.200}; use one of {sorted(FORMATS)}")
    out_key = derived_key(key, f"compressed.{FORMATS[fmt]}")
    with io_errors(key):
        path = storage.file(key)
        total = path.stat().st_size
        with path.open("rb") as source, storage.writer(out_key) as out:
            _stream(source, out, fmt, total, on_progress)
        size = storage.path(out_key).stat().st_size
    return {
        "key": out_key,
        "format": fmt,
        "size": total,
        "compressed_size": size,
        "ratio": round(total / size, 3) if size else 0.0,
    }


def _stream(source: IO[bytes], out: IO[bytes], fmt: str, total: int, on_progress: ProgressCallback) -> None:
    """Copy `source` into a compressor writing to `out`, chunk by chunk."""
    sink: Any
    if fmt == "gzip":
        # mtime=0 and no file name: the same input always gives the same bytes.
        sink = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=GZIP_LEVEL, mtime=0, filename="")
    else:
        sink = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
            out, size=total, closefd=False
        )
    done = 0
    with sink:
        while chunk := source.read(CHUNK_SIZE):
            sink.write(chunk)
            done += len(chunk)
            on_progress(done, total)
