"""Real files for the file-processing tests: photos with EXIF, archives (good and hostile), CSVs."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

from PIL import Image

ORIENTATION_TAG = 0x0112


def photo(path: Path, size: tuple[int, int] = (400, 200), orientation: int | None = None) -> Path:
    """A JPEG, left half red and right half blue, optionally with an EXIF orientation tag."""
    image = Image.new("RGB", size, "blue")
    image.paste("red", (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims a huge canvas (the classic decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * 64)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def zip_of(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding `members` (name -> bytes) under the names given, hostile or not."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def zip_with_symlink(path: Path, name: str, target: str) -> Path:
    """A zip whose member is a Unix symlink."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, target)
    return path


def tar_of(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    """A tar (gzip by default) holding regular files."""
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def v7_tar_of(path: Path, members: dict[str, bytes]) -> Path:
    """A tar in the old V7 format: no `ustar` marker at offset 257, only a header checksum."""
    buffer = io.BytesIO()
    _ustar_into(buffer, members)
    raw = bytearray(buffer.getvalue())
    offset = 0
    while offset < len(raw) and raw[offset]:
        size = int(raw[offset + 124 : offset + 136].rstrip(b"\x00 ") or b"0", 8)
        raw[offset + 257 : offset + 265] = bytes(8)  # magic and version: V7 has neither
        raw[offset + 148 : offset + 156] = b" " * 8
        raw[offset + 148 : offset + 156] = b"%06o\x00 " % sum(raw[offset : offset + 512])
        offset += 512 + (size + 511) // 512 * 512
    path.write_bytes(bytes(raw))
    return path


def _ustar_into(handle: io.BytesIO, members: dict[str, bytes]) -> None:
    """Write an uncompressed ustar of regular files to `handle`."""
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def tar_with_special(path: Path, kind: bytes, name: str = "evil", link: str = "/etc/passwd") -> Path:
    """A tar with one symlink (SYMTYPE), hard link (LNKTYPE) or device (CHRTYPE/BLKTYPE) member."""
    with tarfile.open(path, "w") as archive:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 3
        archive.addfile(ok, io.BytesIO(b"ok\n"))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        archive.addfile(info)
    return path


def nested_zip(path: Path, depth: int) -> Path:
    """A zip containing a zip containing ... `depth` levels, the innermost holding one text file."""
    data = _zip_bytes({"core.txt": b"innermost\n"})
    for level in range(depth - 1):
        data = _zip_bytes({f"level{level}.zip": data})
    path.write_bytes(data)
    return path


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def sample_csv(path: Path) -> Path:
    """A CSV with a header, numeric and text columns, empty cells and one ragged row."""
    path.write_text(
        "id,price,name\n1,9.5,apple\n2,,banana\n3,12,\n4,7.25,cherry,extra\n5,-1,date\n",
        encoding="utf-8",
    )
    return path


def temp_leftovers(root: Path) -> list[str]:
    """Every temporary file or folder under `root` (the marker the cleaner looks for)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".proj-tmp-" in p.name)
