"""Keys resolved inside the storage root, streaming reads and atomic writes."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from proj.errors import (
    FileNotFoundForProcessing,
    ProjError,
    StorageUnavailableError,
    UnsafePathError,
)

logger = logging.getLogger(__name__)

# Fixed-size chunks everywhere: memory stays flat whatever the file size.
CHUNK_SIZE = 1 << 20
# Every temporary file or folder carries this marker, so the cleaner can find orphans.
TEMP_MARKER = ".proj-tmp-"
# Where outputs derived from an input key live: derived/<key>/...
DERIVED_PREFIX = "derived"

# Linux's NAME_MAX, less room for the temporary-file marker and suffix added to a name.
MAX_KEY_PART_BYTES = 200
# Keys nest under derived/<key>/ and the root; PATH_MAX (4096) must hold them with room to spare.
MAX_KEY_LENGTH = 1024

ProgressCallback = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    """Progress callback that ignores progress."""


def check_key(key: str) -> PurePosixPath:
    """Validate the shape of a key: relative, no `..`, no empty or NUL parts, a length a file system takes."""
    if not isinstance(key, str) or not key or "\x00" in key or "\\" in key:
        raise UnsafePathError(f"invalid storage key {key!r:.200}")
    # Checked here, not left to the OS: ENAMETOOLONG would be taken for a storage outage and retried.
    try:
        parts = [len(part.encode()) for part in key.split("/")]
    except UnicodeEncodeError:
        raise UnsafePathError(f"storage key {key!r:.200} is not valid Unicode (a lone surrogate)") from None
    if len(key) > MAX_KEY_LENGTH or max(parts) > MAX_KEY_PART_BYTES:
        raise UnsafePathError(
            f"storage key {key!r:.200} is too long: at most {MAX_KEY_LENGTH} characters, "
            f"{MAX_KEY_PART_BYTES} bytes between slashes"
        )
    path = PurePosixPath(key)
    if path.is_absolute() or any(part in ("..", ".", "") for part in key.split("/")):
        raise UnsafePathError(f"storage key {key!r} must be relative, without '..' or empty parts")
    return path


def derived_key(key: str, name: str) -> str:
    """The deterministic key of an output `name` derived from input `key`."""
    return f"{DERIVED_PREFIX}/{key}/{name}"


class Storage:
    """A folder holding every file; keys are paths relative to it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The absolute path of `key`, refusing anything that resolves outside the root."""
        resolved = (self.root / check_key(key)).resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise UnsafePathError(f"storage key {key!r} leads outside the storage root")
        return resolved

    def file(self, key: str) -> Path:
        """The path of an existing, non-empty regular file."""
        path = self.path(key)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise FileNotFoundForProcessing(f"no file at key {key!r}") from None
        if not stat.S_ISREG(info.st_mode):
            raise FileNotFoundForProcessing(f"key {key!r} is not a regular file")
        if info.st_size == 0:
            raise FileNotFoundForProcessing(f"file {key!r} is empty")
        return path

    def key_of(self, path: Path) -> str:
        """The key of a path inside the root."""
        return path.resolve().relative_to(self.root).as_posix()

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Write `key` atomically: a marked temp file, fsync, then os.replace; removed on any error."""
        target = self.path(key)
        created = self._make_parents(target)
        temp = target.with_name(f".{target.name}{TEMP_MARKER}{uuid.uuid4().hex}")
        try:
            with temp.open("xb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            # BaseException too: a soft time limit or a shutdown must not leave half a file.
            temp.unlink(missing_ok=True)
            _remove_empty(created)
            raise

    @contextmanager
    def folder_writer(self, key: str) -> Iterator[Path]:
        """Build folder `key` in a marked temp folder and swap it in whole, or remove it on error."""
        target = self.path(key)
        created = self._make_parents(target)
        self.remove_partial_folders(target)
        temp = target.with_name(f"{target.name}{TEMP_MARKER}{uuid.uuid4().hex}")
        temp.mkdir()
        try:
            yield temp
            _swap_folder(temp, target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            _remove_empty(created)
            raise

    def _make_parents(self, target: Path) -> list[Path]:
        """Create the missing parent folders of `target`; return them, deepest first."""
        missing = [p for p in target.parents if p.is_relative_to(self.root) and not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        return missing

    def remove_partial_folders(self, target: Path) -> None:
        """Remove leftovers of an earlier attempt at `target` (a worker killed mid-way)."""
        for leftover in target.parent.glob(f"{target.name}{TEMP_MARKER}*"):
            logger.warning("Removing partial output %s of an earlier attempt", leftover.name)
            _remove(leftover)

    def clean_temp(self, max_age: float, now: float | None = None) -> list[str]:
        """Remove temp files and folders older than `max_age` seconds; return their keys."""
        cutoff = (time.time() if now is None else now) - max_age
        removed: list[str] = []
        for path in _marked(self.root):
            try:
                if path.lstat().st_mtime < cutoff:
                    key = path.relative_to(self.root).as_posix()
                    _remove(path)
                    removed.append(key)
            except FileNotFoundError:
                continue  # removed meanwhile by its own task
        return removed


def _marked(root: Path) -> Iterator[Path]:
    """Paths under `root` carrying the temp marker, without descending into them."""
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in [*filenames, *[d for d in dirnames if TEMP_MARKER in d]]:
            if TEMP_MARKER in name:
                yield base / name
        dirnames[:] = [d for d in dirnames if TEMP_MARKER not in d]


def _swap_folder(temp: Path, target: Path) -> None:
    """Replace `target` by `temp`; a rename cannot overwrite a non-empty folder, so move the old aside."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}{TEMP_MARKER}old-{uuid.uuid4().hex}")
        os.replace(target, old)
    os.replace(temp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders made for an output that was never written, if nothing else landed there."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: another output lives there


def _remove(path: Path) -> None:
    """Remove a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def io_errors(key: str) -> Iterator[None]:
    """Turn storage OSErrors into proj errors: a vanished file is permanent, anything else transient."""
    try:
        yield
    except ProjError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundForProcessing(f"{key}: {exc.strerror}") from exc
    except OSError as exc:
        # EIO, ENOSPC, a stale mount: the disk may come back, so let the task retry a few times.
        raise StorageUnavailableError(f"{key}: {exc}") from exc
