"""The file services on real files in tmp_path: storage, sniffing, checksums, images, archives, CSV."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import zipfile

import pytest
import zstandard
from PIL import Image

from proj.errors import FileNotFoundForProcessing, InvalidFileError, UnsafePathError
from proj.files import archives, checksums, compress, csvimport, images, summary
from proj.files.sniff import FileType, sniff
from proj.files.storage import Storage
from tests import filefactory as ff

LIMITS = archives.ArchiveLimits(max_bytes=8 << 20, max_members=50, max_ratio=100, max_depth=2)


@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    return Storage(root)


# --- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "./a", "a\\b", "a\x00b"])
def test_keys_that_leave_the_root_are_refused(storage, key):
    with pytest.raises(UnsafePathError):
        storage.path(key)


def test_symlink_leading_out_is_refused(storage, tmp_path):
    (tmp_path / "secret").write_text("s")
    (storage.root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="outside"):
        storage.file("link")


def test_missing_and_empty_files_are_permanent_errors(storage):
    (storage.root / "empty").touch()
    with pytest.raises(FileNotFoundForProcessing, match="no file"):
        storage.file("nope")
    with pytest.raises(FileNotFoundForProcessing, match="empty"):
        storage.file("empty")


def test_writer_is_atomic_and_leaves_nothing_on_error(storage):
    with storage.writer("out/a.bin") as handle:
        handle.write(b"first")
    with pytest.raises(RuntimeError), storage.writer("out/a.bin") as handle:
        handle.write(b"half")
        raise RuntimeError("crash mid-write")
    assert (storage.root / "out/a.bin").read_bytes() == b"first"
    assert ff.temp_leftovers(storage.root) == []


def test_clean_temp_removes_only_old_marked_files(storage):
    old = storage.root / "d" / ".x.proj-tmp-1"
    old.parent.mkdir()
    old.write_bytes(b"x")
    young = storage.root / ".y.proj-tmp-2"
    young.write_bytes(b"y")
    folder = storage.root / "z.proj-tmp-3"
    (folder / "sub").mkdir(parents=True)
    keep = storage.root / "d" / "real.txt"
    keep.write_bytes(b"keep")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(folder, (past, past))
    assert sorted(storage.clean_temp(3600)) == ["d/.x.proj-tmp-1", "z.proj-tmp-3"]
    assert young.exists() and keep.exists() and not folder.exists()


# --- sniffing and checksums ----------------------------------------------------------------------


def test_type_comes_from_content_not_extension(tmp_path):
    cases = {
        "photo.csv": ff.photo(tmp_path / "photo.csv"),
        "data.jpg": ff.sample_csv(tmp_path / "data.jpg"),
        "a.txt": ff.zip_of(tmp_path / "a.txt", {"x": b"x"}),
        "b.png": ff.tar_of(tmp_path / "b.png", {"x": b"x"}),
        "c.bin": ff.tar_of(tmp_path / "c.bin", {"x": b"x"}, mode="w"),
    }
    (tmp_path / "d.zip").write_bytes(gzip.compress(b"just text"))
    (tmp_path / "e.csv").write_bytes(zstandard.ZstdCompressor().compress(b"z" * 100))
    (tmp_path / "f.csv").write_bytes(b"\x00\x01binary" * 10)
    (tmp_path / "g.zip").write_text("hello\nplain text\n")
    kinds = {name: sniff(path) for name, path in cases.items()}
    kinds |= {name: sniff(tmp_path / name) for name in ("d.zip", "e.csv", "f.csv", "g.zip")}
    assert {n: (t.kind, t.mime) for n, t in kinds.items()} == {
        "photo.csv": ("image", "image/jpeg"),
        "data.jpg": ("csv", "text/csv"),
        "a.txt": ("archive", "application/zip"),
        "b.png": ("archive", "application/x-tar+gzip"),
        "c.bin": ("archive", "application/x-tar"),
        "d.zip": ("compressed", "application/gzip"),
        "e.csv": ("compressed", "application/zstd"),
        "f.csv": ("binary", "application/octet-stream"),
        "g.zip": ("text", "text/plain"),
    }


def test_csv_with_quoted_newlines_is_a_csv(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text('id,note,n\n1,"two\nlines",3\n2,"a ""quoted"" word",4\n3,"x\ny\nz",5\n')
    assert sniff(path) == FileType("text/csv", "csv")


def test_csv_with_a_cell_over_the_sample_is_a_csv(storage):
    cell = "x" * 70 * 1024
    # The sample ends inside the long cell: the row cut there shows fewer fields than the header.
    (storage.root / "wide.csv").write_text(f'id;blob;n\n1;"{cell}";3\n2;short;4\n')
    assert sniff(storage.root / "wide.csv") == FileType("text/csv", "csv")
    result = csvimport.import_csv(storage, "wide.csv", max_field=1 << 20)  # semicolons found too
    assert (result["rows"], result["failed_rows"]) == (2, 0)
    (storage.root / "long.txt").write_text("word " * 20_000 + "\nthe end\n")
    assert sniff(storage.root / "long.txt") == FileType("text/plain", "text")


def test_v7_tar_without_the_ustar_marker_is_an_archive(storage):
    ff.v7_tar_of(storage.root / "old.tar", {"a.txt": b"alpha\n", "b/c.txt": b"gamma\n"})
    assert storage.path("old.tar").read_bytes()[257:262] != b"ustar"
    assert sniff(storage.root / "old.tar") == FileType("application/x-tar", "archive")
    keys = archives.extract_archive(storage, "old.tar", LIMITS)
    assert [storage.path(k).read_bytes() for k in keys] == [b"alpha\n", b"gamma\n"]


def test_text_with_a_broken_tar_checksum_is_not_an_archive(tmp_path):
    raw = bytearray(ff.v7_tar_of(tmp_path / "x.tar", {"a.txt": b"alpha\n"}).read_bytes())
    raw[0:1] = b"b"  # the name changes, the stored checksum does not
    (tmp_path / "y.tar").write_bytes(bytes(raw))
    assert sniff(tmp_path / "y.tar").kind == "binary"


def test_inspect_streams_the_checksum_with_progress(storage):
    data = os.urandom(3 * (1 << 20) + 17)
    (storage.root / "blob").write_bytes(data)
    seen = []
    info = checksums.inspect_file(storage, "blob", lambda done, total: seen.append((done, total)))
    assert info == {
        "key": "blob",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mime": "application/octet-stream",
        "kind": "binary",
    }
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (len(data), len(data))
    assert len(seen) == 4  # one report per 1 MiB chunk


# --- images --------------------------------------------------------------------------------------


def test_thumbnails_apply_exif_orientation(storage):
    ff.photo(storage.root / "p.jpg", (400, 200), orientation=6)  # stored landscape, shown portrait
    keys = images.make_thumbnails(storage, "p.jpg", [[320, 320], [100, 100]], max_pixels=10**7)
    assert keys == ["derived/p.jpg/thumb-320x320.jpg", "derived/p.jpg/thumb-100x100.jpg"]
    with Image.open(storage.path(keys[0])) as thumb:
        assert thumb.size == (160, 320)
        assert thumb.getexif().get(ff.ORIENTATION_TAG) in (None, 1)
        top, bottom = thumb.getpixel((80, 40)), thumb.getpixel((80, 280))
    assert top[0] > 200 and top[2] < 60, top  # the red half was on the left: rotated to the top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    with Image.open(storage.path(keys[1])) as small:
        assert small.size == (50, 100)


def test_transparent_images_become_png(storage):
    Image.new("RGBA", (64, 32), (0, 255, 0, 128)).save(storage.root / "t.png")
    [key] = images.make_thumbnails(storage, "t.png", [[16, 16]], max_pixels=10**7)
    with Image.open(storage.path(key)) as thumb:
        assert key.endswith(".png") and thumb.size == (16, 8) and thumb.mode == "RGBA"


@pytest.mark.parametrize(
    "case,message",
    [
        ("bomb", "too large"),
        ("over_limit", "too large"),
        ("truncated", "truncated or corrupt"),
        ("garbage", "not an image"),
        ("not_allowed", "not an image in an allowed format"),
    ],
)
def test_hostile_images_fail_without_output(storage, case, message):
    path = storage.root / "x.img"
    if case == "bomb":
        ff.png_bomb(path)
    elif case == "over_limit":
        Image.new("RGB", (1200, 1000)).save(path, "PNG")
    elif case == "truncated":
        ff.photo(path, (800, 600))
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    else:
        Image.new("RGB", (10, 10)).save(path, "PCX")
    with pytest.raises(InvalidFileError, match=message):
        images.make_thumbnails(storage, "x.img", max_pixels=1_000_000)
    assert not (storage.root / "derived").exists()


# --- archives ------------------------------------------------------------------------------------


def test_zip_and_tar_gz_extract_to_identical_bytes(storage):
    members = {"a.txt": b"alpha\n", "dir/b.bin": os.urandom(300_000), "dir/sub/c.csv": b"x,y\n1,2\n"}
    ff.zip_of(storage.root / "in.zip", members)
    ff.tar_of(storage.root / "in.tgz", members)
    for key in ("in.zip", "in.tgz"):
        keys = archives.extract_archive(storage, key, LIMITS)
        assert keys == [f"derived/{key}/extracted/{name}" for name in sorted(members)]
        for name, data in members.items():
            assert storage.path(f"derived/{key}/extracted/{name}").read_bytes() == data
    assert ff.temp_leftovers(storage.root) == []


def test_extraction_is_idempotent(storage):
    ff.zip_of(storage.root / "in.zip", {"a": b"1", "b/c": b"2"})
    first = archives.extract_archive(storage, "in.zip", LIMITS)
    (storage.root / "derived/in.zip/extracted/stray").write_bytes(b"from an older run")
    assert archives.extract_archive(storage, "in.zip", LIMITS) == first
    assert ff.temp_leftovers(storage.root) == []


def test_nested_archives_within_the_depth_are_extracted(storage):
    ff.nested_zip(storage.root / "n.zip", depth=2)
    keys = archives.extract_archive(storage, "n.zip", LIMITS)
    assert "derived/n.zip/extracted/level0.zip.extracted/core.txt" in keys


def _duplicate_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("same", b"1")
        archive.writestr("same", b"2")


def _corrupt_zip(path):
    data = bytearray(ff._zip_bytes({"a": os.urandom(5000)}))
    data[100:110] = b"\xff" * 10
    path.write_bytes(bytes(data))


HOSTILE_ARCHIVES = {
    "zip_slip": lambda p: ff.zip_of(p, {"ok.txt": b"ok", "../../escaped.txt": b"pwned"}),
    "absolute": lambda p: ff.zip_of(p, {"ok.txt": b"ok", "/tmp/abs.txt": b"pwned"}),
    "zip_symlink": lambda p: ff.zip_with_symlink(p, "link", "/etc/passwd"),
    "tar_symlink": lambda p: ff.tar_with_special(p, tarfile.SYMTYPE),
    "tar_hardlink": lambda p: ff.tar_with_special(p, tarfile.LNKTYPE),
    "tar_device": lambda p: ff.tar_with_special(p, tarfile.CHRTYPE),
    "tar_fifo": lambda p: ff.tar_with_special(p, tarfile.FIFOTYPE),
    "ratio_bomb": lambda p: ff.zip_of(p, {"zeros": b"\0" * (4 << 20)}),
    "size_bomb": lambda p: ff.zip_of(p, {f"r{i}": os.urandom(3 << 20) for i in range(3)}, zipfile.ZIP_STORED),
    "members": lambda p: ff.zip_of(p, {f"m{i}": b"x" for i in range(60)}),
    "depth": lambda p: ff.nested_zip(p, depth=3),
    "duplicate": _duplicate_zip,
    "corrupt": _corrupt_zip,
}


def _hostile(case, root):
    HOSTILE_ARCHIVES[case](root / "evil")
    return "evil"


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@pytest.mark.parametrize(
    "case,error,message",
    [
        ("zip_slip", UnsafePathError, "zip slip"),
        ("absolute", UnsafePathError, "absolute"),
        ("zip_symlink", InvalidFileError, "link or device"),
        ("tar_symlink", InvalidFileError, "link or device"),
        ("tar_hardlink", InvalidFileError, "link or device"),
        ("tar_device", InvalidFileError, "link or device"),
        ("tar_fifo", InvalidFileError, "link or device"),
        ("ratio_bomb", InvalidFileError, "100x"),
        ("size_bomb", InvalidFileError, "past 8388608 bytes"),
        ("members", InvalidFileError, "more than 50 members"),
        ("depth", InvalidFileError, "nested deeper than 2"),
        ("duplicate", InvalidFileError, "twice"),
        ("corrupt", InvalidFileError, "not a readable zip or tar"),
    ],
)
def test_hostile_archives_fail_with_no_partial_output(storage, tmp_path, case, error, message):
    key = _hostile(case, storage.root)
    with pytest.raises(error, match=message):
        archives.extract_archive(storage, key, LIMITS)
    assert not (storage.root / "derived" / key / "extracted").exists()
    assert ff.temp_leftovers(storage.root) == []
    assert not list(tmp_path.rglob("escaped.txt")) and not os.path.exists("/tmp/abs.txt")


def test_bomb_is_caught_while_extracting_not_from_headers(storage):
    """A tar.gz has no header telling its expanded size: the budget counts the bytes as they come."""
    ff.tar_of(storage.root / "bomb.tgz", {f"zeros{i}": b"\0" * (3 << 20) for i in range(4)})
    seen = []
    with pytest.raises(InvalidFileError, match="more than 100x"):
        archives.extract_archive(storage, "bomb.tgz", LIMITS, lambda done, total: seen.append(done))
    assert seen  # extraction was under way when the limit hit
    assert not (storage.root / "derived/bomb.tgz/extracted").exists()
    assert ff.temp_leftovers(storage.root) == []


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_statistics_and_failed_rows_report(storage):
    ff.sample_csv(storage.root / "d.csv")
    result = csvimport.import_csv(storage, "d.csv", max_field=1024)
    assert result["rows"] == 4 and result["failed_rows"] == 1
    by_name = {c["name"]: c for c in result["columns"]}
    assert by_name["id"] == {"name": "id", "count": 4, "empty": 0, "numeric": 4, "min": 1.0, "max": 5.0}
    assert by_name["price"] == {
        "name": "price",
        "count": 3,
        "empty": 1,
        "numeric": 3,
        "min": -1.0,
        "max": 12.0,
    }
    assert by_name["name"]["count"] == 3 and by_name["name"]["empty"] == 1 and by_name["name"]["numeric"] == 0
    report = list(csv.reader(io.StringIO(storage.path(result["report_key"]).read_text())))
    assert report[0] == ["line", "error", "fields"]
    assert report[1][:2] == ["5", "expected 3 fields, got 4"]
    assert json.loads(report[1][2]) == ["4", "7.25", "cherry", "extra"]


def test_csv_with_semicolons(storage):
    (storage.root / "s.csv").write_text("a;b\n1;2\n3;4\n")
    result = csvimport.import_csv(storage, "s.csv", max_field=1024)
    assert result["rows"] == 2 and [c["max"] for c in result["columns"]] == [3.0, 4.0]


def test_csv_byte_order_mark_is_not_part_of_the_header(storage):
    (storage.root / "bom.csv").write_bytes(b"\xef\xbb\xbfid,name\n1,a\n")
    result = csvimport.import_csv(storage, "bom.csv", max_field=1024)
    assert [c["name"] for c in result["columns"]] == ["id", "name"]


def test_sixteen_bit_images_get_thumbnails(storage):
    Image.new("I;16", (300, 200), 30000).save(storage.root / "deep.png")
    [key] = images.make_thumbnails(storage, "deep.png", [[100, 100]], max_pixels=10**7)
    assert Image.open(storage.path(key)).size == (100, 67)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a,b\n1,2\n3,\xff\xfe\n", "not valid UTF-8 at line 3, byte 10"),
        (b"a,b\n1," + b"x" * 5000 + b"\n", "line 2 is longer than 1024 bytes"),
        (b'a,b\n1,"' + b"y" * 900 + b"\n" + b"y" * 900 + b'"\n', "field larger than field limit"),
    ],
)
def test_hostile_csv_fails_without_report(storage, content, message):
    (storage.root / "h.csv").write_bytes(content)
    with pytest.raises(InvalidFileError, match=message):
        csvimport.import_csv(storage, "h.csv", max_field=1024)
    assert not (storage.root / "derived").exists()
    assert ff.temp_leftovers(storage.root) == []


# --- compression and summary ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_compress_round_trips(storage, fmt):
    data = b"line of text\n" * 100_000
    (storage.root / "t.txt").write_bytes(data)
    result = compress.compress(storage, "t.txt", fmt)
    out = storage.path(result["key"]).read_bytes()
    restored = gzip.decompress(out) if fmt == "gzip" else zstandard.ZstdDecompressor().decompress(out)
    assert restored == data and result["ratio"] > 50
    assert compress.compress(storage, "t.txt", fmt)["key"] == result["key"]
    assert storage.path(result["key"]).read_bytes() == out  # deterministic bytes


def test_notification_is_stable_for_the_same_file():
    info = {"key": "k", "size": 3, "sha256": "ab", "mime": "text/csv", "kind": "csv"}
    stats = {"rows": 2, "columns": [{}], "failed_rows": 0, "report_key": "r"}
    one = summary.notification(summary.summarize(info, {"import": stats}, "a@example.com"))
    two = summary.notification(summary.summarize(info, {"import": stats}, "a@example.com"))
    assert one == two and "2 rows" in one["text"] and one["subject"] == "Processed k (csv)"


def test_a_huge_format_or_size_is_refused_with_a_short_message(storage):
    # Error messages are scrubbed by a regex that takes hours over 2 MB of letters (proj.credentials).
    huge = "x" * 2_000_000
    with pytest.raises(InvalidFileError, match="unknown compression format") as info:
        compress.compress(storage, "a.bin", huge)
    assert len(str(info.value)) < 500
    with pytest.raises(InvalidFileError, match="thumbnail size") as info:
        images.make_thumbnails(storage, "a.png", [huge], max_pixels=1000)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize("sizes", [5, "ab", {"a": 1}, [5], [[True, 2]], [[1.0, 2]], [[8, 8]] * 21, []])
def test_thumbnail_sizes_of_any_other_shape_are_an_invalid_file_error(storage, sizes):
    with pytest.raises(InvalidFileError, match="thumbnail size"):
        images.make_thumbnails(storage, "a.png", sizes, max_pixels=1000)
