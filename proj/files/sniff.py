"""Content-based file type detection: magic numbers first, then a look at text."""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO

import filetype

# Enough for every magic number filetype knows and for a CSV sample.
SNIFF_BYTES = 64 * 1024
# Text whose first two records do not fit in SNIFF_BYTES (a cell over 64 KiB) is read up to this
# much more, so a CSV with large cells is still recognised (import_csv accepts fields up to 1 MiB).
CSV_SNIFF_MAX_BYTES = 2 * 1024 * 1024
_TAR_BLOCK = 512
_TAR_MAGIC_OFFSET = 257
_TAR_CHKSUM = slice(148, 156)
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
        found = sniff_bytes(head, path)
        if found.kind == "text" and len(head) == SNIFF_BYTES and _too_few_records(head):
            # Its first records did not fit in the sample (a long cell): look at a longer one.
            head += handle.read(CSV_SNIFF_MAX_BYTES - SNIFF_BYTES)
            found = sniff_bytes(head, path)
    return found


def read_csv_sample(handle: IO[bytes]) -> bytes:
    """The first bytes of a CSV: SNIFF_BYTES, or up to CSV_SNIFF_MAX_BYTES if its records are long."""
    head = handle.read(SNIFF_BYTES)
    if len(head) == SNIFF_BYTES and _too_few_records(head):
        head += handle.read(CSV_SNIFF_MAX_BYTES - SNIFF_BYTES)
    return head


def sniff_bytes(head: bytes, path: Path | None = None, *, whole: bool | None = None) -> FileType:
    """Detect the type from the first bytes; `path` lets gzip be opened to look for a tar inside.

    `whole` says the bytes are the entire file (by default: fewer than were asked for).
    """
    if head.startswith(_ZSTD_MAGIC):
        return FileType("application/zstd", "compressed")
    guess = filetype.guess(head)
    if guess is not None:
        return _from_mime(str(guess.mime), path)
    if _is_tar(head):
        return FileType("application/x-tar", "archive")
    return _text_type(head, sample_is_whole(head) if whole is None else whole)


def sample_is_whole(head: bytes) -> bool:
    """True if a sample read by `sniff` or `read_csv_sample` is shorter than asked: the whole file."""
    return len(head) not in (SNIFF_BYTES, CSV_SNIFF_MAX_BYTES)


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
    """POSIX and GNU tars carry `ustar` at offset 257; V7 tars only a valid header checksum."""
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return True
    return _is_v7_tar_header(head[:_TAR_BLOCK])


def _is_v7_tar_header(block: bytes) -> bool:
    """A named first header whose checksum field matches its bytes (as tarfile checks it)."""
    if len(block) < _TAR_BLOCK or block[0] == 0:
        return False
    field = block[_TAR_CHKSUM].split(b"\x00", 1)[0].strip(b" ")
    if not field or any(digit not in b"01234567" for digit in field):
        return False
    # The checksum counts the checksum field itself as eight spaces.
    unsigned = sum(block[:148]) + 8 * ord(" ") + sum(block[156:])
    signed = sum(byte - 256 if byte > 127 else byte for byte in block[:148] + block[156:]) + 256
    return int(field, 8) in (unsigned, signed)


def _gzip_holds_tar(path: Path) -> bool:
    """Decompress only the first tar header of a gzip file and look for the tar magic."""
    try:
        with gzip.open(path, "rb") as handle:
            return _is_tar(handle.read(_TAR_BLOCK))
    except (OSError, EOFError, zlib.error):
        return False


def _text_type(head: bytes, whole: bool) -> FileType:
    """Text if the sample is UTF-8 without NULs; CSV if it also has a consistent delimiter."""
    text = _utf8_text(head)
    if text is None:
        return FileType("application/octet-stream", "binary")
    if csv_delimiter(text, whole=whole) is not None:
        return FileType("text/csv", "csv")
    return FileType("text/plain", "text")


def _utf8_text(head: bytes) -> str | None:
    """The sample as text, or None if it has NULs or is not UTF-8."""
    if not head or b"\x00" in head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sample may end inside a multi-byte character; anything earlier is really not UTF-8.
        if exc.start < len(head) - 3:
            return None
        return head[: exc.start].decode("utf-8")


def _too_few_records(head: bytes) -> bool:
    """True if no delimiter finds two whole records in the sample (its first cells are long)."""
    text = _utf8_text(head)
    return text is not None and all(len(_records(text, d, whole=False)) < 2 for d in _CSV_DELIMITERS)


def csv_delimiter(text: str, *, whole: bool = False) -> str | None:
    """The delimiter that splits most of the first records into the same number (> 1) of fields.

    Unless the text is `whole` (the entire file), its last record may be cut and is left out.
    """
    best: tuple[float, str] | None = None
    for delimiter in _CSV_DELIMITERS:
        rows = _records(text, delimiter, whole=whole)
        if len(rows) < 2:
            continue
        width, hits = Counter(len(row) for row in rows).most_common(1)[0]
        share = hits / len(rows)
        if width > 1 and share >= _CSV_MIN_SHARE and (best is None or share > best[0]):
            best = (share, delimiter)
    return best[1] if best else None


def _records(text: str, delimiter: str, *, whole: bool) -> list[list[str]]:
    """The sample's first whole records (quoted newlines included), blank lines left out."""
    # Raised, never lowered: the limit is process-wide and import_csv sets its own before reading.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_SNIFF_MAX_BYTES))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[list[str]] = []
    try:
        for row in islice(reader, _CSV_SAMPLE_LINES + 1):
            if row:
                rows.append(row)
    except csv.Error:
        pass  # e.g. a stray quote or NUL: the records read so far are what there is
    if len(rows) > _CSV_SAMPLE_LINES or not whole:
        rows = rows[:-1]  # one more than needed, or maybe cut by the end of the sample
    return rows
