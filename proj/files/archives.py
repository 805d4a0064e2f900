"""Safe extraction of zip, tar and tar.gz: no escapes, no links or devices, a budget checked while writing."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from proj.errors import InvalidFileError, UnsafePathError
from proj.files.sniff import sniff
from proj.files.storage import (
    CHUNK_SIZE,
    TEMP_MARKER,
    ProgressCallback,
    Storage,
    derived_key,
    io_errors,
    no_progress,
)

# Small outputs may compress 1000:1 legitimately (a sparse log); the ratio only counts past this.
RATIO_FLOOR = 1 << 20
NESTED_SUFFIX = ".extracted"
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    gzip.BadGzipFile,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """What one extraction may produce in total, nested archives included."""

    max_bytes: int
    max_members: int
    max_ratio: int
    max_depth: int


@dataclass
class _Budget:
    """Counts members and bytes as they are written and stops at the first limit crossed."""

    limits: ArchiveLimits
    archive_size: int
    outer: IO[bytes]
    on_progress: ProgressCallback
    written: int = 0
    members: int = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise InvalidFileError(f"archive has more than {self.limits.max_members} members")

    def add(self, count: int) -> None:
        self.written += count
        if self.written > self.limits.max_bytes:
            raise InvalidFileError(f"archive expands past {self.limits.max_bytes} bytes (zip bomb?)")
        if self.written > RATIO_FLOOR and self.written > self.limits.max_ratio * self.archive_size:
            raise InvalidFileError(f"archive expands more than {self.limits.max_ratio}x its size (zip bomb?)")
        self.on_progress(min(self.outer.tell(), self.archive_size), self.archive_size)


def extract_archive(
    storage: Storage, key: str, limits: ArchiveLimits, on_progress: ProgressCallback = no_progress
) -> list[str]:
    """Extract the archive at `key` under derived/<key>/extracted/ and return the keys of its files."""
    dest_key = derived_key(key, "extracted")
    with io_errors(key):
        path = storage.file(key)
        with path.open("rb") as outer, storage.folder_writer(dest_key) as temp:
            budget = _Budget(limits, path.stat().st_size, outer, on_progress)
            _extract(outer, path.name, temp, budget, depth=1)
            names = sorted(p.relative_to(temp).as_posix() for p in temp.rglob("*") if p.is_file())
    on_progress(budget.archive_size, budget.archive_size)
    return [f"{dest_key}/{name}" for name in names]


def _extract(handle: IO[bytes], label: str, dest: Path, budget: _Budget, depth: int) -> None:
    """Extract one archive (zip or any tar) from an open file into `dest`."""
    try:
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            _extract_zip(handle, dest, budget, depth)
        else:
            handle.seek(0)
            _extract_tar(handle, dest, budget, depth)
    except _ARCHIVE_ERRORS as exc:
        raise InvalidFileError(f"{label} is not a readable zip or tar archive: {exc}") from exc


def _extract_zip(handle: IO[bytes], dest: Path, budget: _Budget, depth: int) -> None:
    """Stream each zip member out through the budget; CRCs are checked by zipfile as it reads."""
    _check_zip_directory(handle, budget.limits.max_members)
    with zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            target = _claim(info.filename, dest, budget)
            mode = info.external_attr >> 16
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
                raise InvalidFileError(f"member {info.filename!r} is a link or device, refused")
            else:
                with archive.open(info) as source:
                    _write_member(source, target, budget, depth)


def _check_zip_directory(handle: IO[bytes], max_members: int) -> None:
    """Refuse a zip whose central directory announces too many entries, before it is parsed into memory."""
    end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]  # stable since Python 2
    if end and end[zipfile._ECD_ENTRIES_TOTAL] > max_members:  # type: ignore[attr-defined]
        raise InvalidFileError(f"archive has more than {max_members} members (central directory)")
    handle.seek(0)


def _extract_tar(handle: IO[bytes], dest: Path, budget: _Budget, depth: int) -> None:
    """Read the tar as a stream (constant memory, any compression) and refuse links and devices."""
    with tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            target = _claim(member.name, dest, budget)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif not member.isreg():
                raise InvalidFileError(f"member {member.name!r} is a link or device, refused")
            else:
                source = archive.extractfile(member)
                assert source is not None  # a regular member always has data
                _write_member(source, target, budget, depth)


def _claim(name: str, dest: Path, budget: _Budget) -> Path:
    """Count a member and turn its name into a path inside `dest`, refusing escapes and clashes."""
    budget.member()
    if not name or "\x00" in name or "\\" in name or TEMP_MARKER in name:
        raise UnsafePathError(f"archive member name {name!r} is not allowed")
    pure = PurePosixPath(name)
    if pure.is_absolute() or (pure.parts and pure.parts[0].endswith(":")):
        raise UnsafePathError(f"archive member {name!r} has an absolute name")
    parts = [part for part in pure.parts if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"archive member {name!r} leads outside the extraction folder (zip slip)")
    target = dest.joinpath(*parts) if parts else dest
    if not target.resolve().is_relative_to(dest.resolve()):
        raise UnsafePathError(f"archive member {name!r} leads outside the extraction folder")
    if target.is_file() or target.is_symlink():
        raise InvalidFileError(f"archive member {name!r} appears twice")
    return target


def _write_member(source: IO[bytes] | Any, target: Path, budget: _Budget, depth: int) -> None:
    """Copy one member through the budget, then extract it too if it is itself an archive."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = target.open("xb")
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidFileError(f"archive member {target.name!r} clashes with another member") from exc
    with out:
        while chunk := source.read(CHUNK_SIZE):
            budget.add(len(chunk))
            out.write(chunk)
        out.flush()
        # fsync: after a power cut the swapped-in folder must not hold empty files.
        os.fsync(out.fileno())
    if sniff(target).kind == "archive":
        _extract_nested(target, budget, depth + 1)


def _extract_nested(path: Path, budget: _Budget, depth: int) -> None:
    """Extract a nested archive next to itself, within the same budget and up to the depth limit."""
    if depth > budget.limits.max_depth:
        raise InvalidFileError(f"archives nested deeper than {budget.limits.max_depth} levels")
    folder = path.with_name(path.name + NESTED_SUFFIX)
    if folder.exists():
        raise InvalidFileError(f"archive member {path.name + NESTED_SUFFIX!r} clashes with a nested archive")
    folder.mkdir()
    with path.open("rb") as handle:
        _extract(handle, path.name, folder, budget, depth)
