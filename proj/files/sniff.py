"""Content-based file type detection: magic numbers first, then a look at text."""

from __future__ import annotations

import csv
import gzip
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import filetype

# Enough for every magic number filetype knows and for a CSV sample.
SNIFF_BYTES = 64 * 1024
_TAR_MAGIC_OFFSET = 257
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CSV_DELIMITERS = ",;\t|"
_CSV_SAMPLE_LINES = 50
# A few ragged rows are still a CSV (they go to the failed-rows report).
_CSV_MIN_SHARE = 0.7

ARCHIVE_MIMES = {"application/zip", "application/x-tar", "application/x-tar+gzip"}
COMPRESSED_MIMES = {"application/gzip", "application/zstd", "application/x-bzip2", "application/x-xz"}


@dataclass(frozen=True)
class FileType:
    """What a file is, by its content: a MIME type and the kind the pipeline dispatches on."""

    mime: str
    kind: str  # image | archive | csv | text | compressed | document | binary


def sniff(path: Path) -> FileType:
    """Detect the type of the file at `path` from its first bytes, ignoring its name."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    return sniff_bytes(head, path)


def sniff_bytes(head: bytes, path: Path | None = None) -> FileType:
    """Detect the type from the first bytes; `path` lets gzip be opened to look for a tar inside."""
    if head.startswith(_ZSTD_MAGIC):
        return FileType("application/zstd", "compressed")
    guess = filetype.guess(head)
    if guess is not None:
        return _from_mime(str(guess.mime), path)
    if _is_tar(head):
        return FileType("application/x-tar", "archive")
    return _text_type(head)


def _from_mime(mime: str, path: Path | None) -> FileType:
    """The kind for a MIME type found by magic number."""
    if mime == "application/gzip" and path is not None and _gzip_holds_tar(path):
        return FileType("application/x-tar+gzip", "archive")
    if mime.startswith("image/"):
        return FileType(mime, "image")
    if mime in ARCHIVE_MIMES:
        return FileType(mime, "archive")
    if mime in COMPRESSED_MIMES:
        return FileType(mime, "compressed")
    if mime.startswith("application/vnd.") or mime in ("application/pdf", "application/rtf"):
        return FileType(mime, "document")
    return FileType(mime, "binary")


def _is_tar(head: bytes) -> bool:
    """POSIX and GNU tars carry `ustar` at offset 257."""
    return head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def _gzip_holds_tar(path: Path) -> bool:
    """Decompress only the first tar header of a gzip file and look for the tar magic."""
    try:
        with gzip.open(path, "rb") as handle:
            return _is_tar(handle.read(512))
    except (OSError, EOFError, zlib.error):
        return False


def _text_type(head: bytes) -> FileType:
    """Text if the sample is UTF-8 without NULs; CSV if it also has a consistent delimiter."""
    if not head or b"\x00" in head:
        return FileType("application/octet-stream", "binary")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sample may end inside a multi-byte character; anything earlier is really not UTF-8.
        if exc.start < len(head) - 3:
            return FileType("application/octet-stream", "binary")
        text = head[: exc.start].decode("utf-8")
    return FileType("text/csv", "csv") if _looks_like_csv(text) else FileType("text/plain", "text")


def _looks_like_csv(text: str) -> bool:
    """A delimiter splits most of the first lines into the same number (> 1) of fields."""
    return csv_delimiter(text) is not None


def csv_delimiter(text: str) -> str | None:
    """The delimiter that splits the sample's lines most consistently, or None if none does."""
    lines = [line for line in text.splitlines()[:_CSV_SAMPLE_LINES] if line.strip()]
    if len(lines) < 2:
        return None
    best: tuple[float, str] | None = None
    for delimiter in _CSV_DELIMITERS:
        try:
            widths = Counter(len(row) for row in csv.reader(lines, delimiter=delimiter))
        except csv.Error:
            continue  # e.g. a field past the size limit: not this delimiter, or not a CSV at all
        width, hits = widths.most_common(1)[0]
        share = hits / len(lines)
        if width > 1 and share >= _CSV_MIN_SHARE and (best is None or share > best[0]):
            best = (share, delimiter)
    return best[1] if best else None
