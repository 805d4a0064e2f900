"""The file tasks through a real prefork worker on real files: valid input, hostile input, crashes."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import tarfile
import threading
import zipfile

import psutil
import pytest
import zstandard
from PIL import Image

from proj.stores.deadletters import DeadLetterStore
from tests import filefactory as ff
from tests.harness import wait_for

pytestmark = pytest.mark.integration

SMALL_LIMITS = {
    "FILES_ARCHIVE_MAX_BYTES": str(8 << 20),
    "FILES_ARCHIVE_MAX_MEMBERS": "50",
    "FILES_ARCHIVE_MAX_RATIO": "100",
    "FILES_ARCHIVE_MAX_DEPTH": "2",
    "FILES_CSV_MAX_FIELD": "1024",
}


def test_each_task_on_valid_input_checked_on_disk(start_worker, files_root):
    from tasks.files import compress, extract_archive, import_csv, inspect_file, make_thumbnails

    start_worker("files", pool="prefork", concurrency=2)
    ff.photo(files_root / "photos/p.png", (2000, 1000), orientation=6)  # a JPEG named .png
    members = {"a.txt": b"alpha\n", "docs/b.bin": os.urandom(200_000)}
    ff.zip_of(files_root / "in.zip", members)
    ff.tar_of(files_root / "in.tar.gz", members)
    ff.sample_csv(files_root / "table.csv")

    info = inspect_file.delay("photos/p.png").get(timeout=30)
    assert (info["kind"], info["mime"]) == ("image", "image/jpeg")
    assert info["sha256"] == hashlib.sha256((files_root / "photos/p.png").read_bytes()).hexdigest()

    thumbs = make_thumbnails.delay("photos/p.png").get(timeout=30)
    sizes = [Image.open(files_root / key).size for key in thumbs]
    assert sizes == [(160, 320), (512, 1024)]  # portrait: the EXIF rotation was applied
    assert Image.open(files_root / thumbs[0]).getpixel((80, 20))[0] > 200  # red half now on top

    for key in ("in.zip", "in.tar.gz"):
        keys = extract_archive.delay(key).get(timeout=30)
        assert {k.rsplit("/extracted/", 1)[1]: (files_root / k).read_bytes() for k in keys} == members

    stats = import_csv.delay("table.csv").get(timeout=30)
    assert (stats["rows"], stats["failed_rows"]) == (4, 1)
    assert [(c["name"], c["numeric"], c["min"], c["max"]) for c in stats["columns"]] == [
        ("id", 4, 1.0, 5.0),
        ("price", 3, -1.0, 12.0),
        ("name", 0, None, None),
    ]
    assert "cherry" in (files_root / stats["report_key"]).read_text()

    original = (files_root / "table.csv").read_bytes()
    gz = compress.delay("table.csv").get(timeout=30)
    zst = compress.delay("table.csv", format="zstd").get(timeout=30)
    assert gzip.decompress((files_root / gz["key"]).read_bytes()) == original
    assert zstandard.ZstdDecompressor().decompress((files_root / zst["key"]).read_bytes()) == original
    assert ff.temp_leftovers(files_root) == []


def _outside_link(root):
    (root.parent / "secret.txt").write_text("not yours")
    (root / "escape").symlink_to(root.parent / "secret.txt")


HOSTILE = [
    # (task, key, setup(root, path), expected error type, words in the message)
    ("inspect_file", "missing.bin", None, "FileNotFoundForProcessing", "no file"),
    ("inspect_file", "empty.bin", lambda r, p: p.touch(), "FileNotFoundForProcessing", "empty"),
    ("inspect_file", "../secret.txt", None, "UnsafePathError", "must be relative"),
    ("inspect_file", "/etc/passwd", None, "UnsafePathError", "must be relative"),
    ("inspect_file", "escape", lambda r, p: _outside_link(r), "UnsafePathError", "outside the storage root"),
    (
        "make_thumbnails",
        "trunc.jpg",
        lambda r, p: p.write_bytes(ff.photo(r / "t.jpg", (800, 600)).read_bytes()[:2500]),
        "InvalidFileError",
        "truncated or corrupt",
    ),
    (
        "make_thumbnails",
        "corrupt.png",
        lambda r, p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(400)),
        "InvalidFileError",
        "not an image",
    ),
    ("make_thumbnails", "bomb.png", lambda r, p: ff.png_bomb(p), "InvalidFileError", "too large to decode"),
    (
        "extract_archive",
        "slip.zip",
        lambda r, p: ff.zip_of(p, {"ok": b"1", "../../evil.sh": b"x"}),
        "UnsafePathError",
        "zip slip",
    ),
    (
        "extract_archive",
        "abs.zip",
        lambda r, p: ff.zip_of(p, {"ok": b"1", "/etc/cron.d/x": b"x"}),
        "UnsafePathError",
        "absolute name",
    ),
    (
        "extract_archive",
        "link.tar",
        lambda r, p: ff.tar_with_special(p, tarfile.SYMTYPE),
        "InvalidFileError",
        "link or device",
    ),
    (
        "extract_archive",
        "dev.tar",
        lambda r, p: ff.tar_with_special(p, tarfile.CHRTYPE),
        "InvalidFileError",
        "link or device",
    ),
    (
        "extract_archive",
        "ratio.zip",
        lambda r, p: ff.zip_of(p, {"zeros": b"\0" * (4 << 20)}),
        "InvalidFileError",
        "more than 100x",
    ),
    (
        "extract_archive",
        "size.tar",
        lambda r, p: ff.tar_of(p, {f"r{i}": os.urandom(3 << 20) for i in range(3)}, mode="w"),
        "InvalidFileError",
        "past 8388608 bytes",
    ),
    (
        "extract_archive",
        "many.zip",
        lambda r, p: ff.zip_of(p, {f"m{i}": b"x" for i in range(60)}),
        "InvalidFileError",
        "more than 50 members",
    ),
    (
        "extract_archive",
        "deep.zip",
        lambda r, p: ff.nested_zip(p, depth=3),
        "InvalidFileError",
        "nested deeper than 2",
    ),
    (
        "import_csv",
        "latin1.csv",
        lambda r, p: p.write_bytes("a,b\n1,café\n".encode("latin-1")),
        "InvalidFileError",
        "not valid UTF-8 at line 2",
    ),
    (
        "import_csv",
        "huge.csv",
        lambda r, p: p.write_bytes(b"a,b\n1," + b"x" * 100_000 + b"\n"),
        "InvalidFileError",
        "longer than 1024 bytes",
    ),
]


def test_hostile_input_fails_permanently_into_dead_letters(
    start_worker, celery_app, files_root, redis_client
):
    worker = start_worker("files", pool="prefork", concurrency=2, env=SMALL_LIMITS)
    results = []
    for task, key, setup, _, _ in HOSTILE:
        if setup is not None:
            setup(files_root, files_root / key)
        results.append(celery_app.send_task(f"tasks.files.{task}", args=[key]))
    letters = {}
    for result, (task, key, _, error, words) in zip(results, HOSTILE, strict=True):
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE", (task, key, result.result)
        assert type(result.result).__name__ == error and words in str(result.result), (key, result.result)
        letters = letters or wait_for(lambda: _letters(redis_client, len(HOSTILE)), what="dead letters")
        letter = letters[result.id]
        assert (letter.task_name, letter.args, letter.exc_type, letter.retries) == (
            f"tasks.files.{task}",
            [key],
            error,
            0,
        )
    assert [p for p in files_root.glob("derived/**/*") if not p.is_dir()] == []  # no partial output
    assert ff.temp_leftovers(files_root) == [] and not (files_root.parent / "evil.sh").exists()
    assert worker.proc.poll() is None
    _assert_one_line_each(worker.log(), [r.id for r in results])
    ff.zip_of(files_root / "fine.zip", {"ok.txt": b"fine"})
    assert celery_app.send_task("tasks.files.extract_archive", args=["fine.zip"]).get(timeout=30) == [
        "derived/fine.zip/extracted/ok.txt"
    ]


def _assert_one_line_each(log, ids):
    """Permanent failures are expected ones: one WARNING line each, no ERROR, no traceback."""
    assert "Traceback" not in log and "raised unexpected" not in log, log
    for task_id in ids:
        lines = [line for line in log.splitlines() if task_id in line]
        loud = [line for line in lines if "WARNING/" in line or "ERROR/" in line]
        assert len(loud) == 1 and "failed for good" in loud[0], (task_id, loud)


def _letters(redis_client, count):
    letters = {d.task_id: d for d in DeadLetterStore(redis_client).list(limit=200)}
    return letters if len(letters) >= count else None


def test_sigkill_mid_extraction_redelivers_to_the_same_complete_output(start_worker, files_root):
    from tasks.files import extract_archive

    worker = start_worker("files", pool="prefork", concurrency=1)
    members = {f"part/{i:03}.bin": os.urandom(512 << 10) for i in range(200)}
    ff.zip_of(files_root / "big.zip", members, zipfile.ZIP_STORED)
    result = extract_archive.delay("big.zip")

    partial = wait_for(
        lambda: [p for p in files_root.rglob("*.bin") if ".proj-tmp-" in str(p)],
        timeout=30,
        interval=0.01,
        what="extraction to be under way",
    )
    [child] = psutil.Process(worker.proc.pid).children()
    child.send_signal(signal.SIGKILL)

    keys = result.get(timeout=120)
    assert len(partial) < len(members)  # it really was killed mid-way
    assert "SIGKILL" in worker.log()
    assert len(keys) == len(members)
    for key in keys:
        name = key.rsplit("/extracted/", 1)[1]
        assert (files_root / key).read_bytes() == members[name]
    assert ff.temp_leftovers(files_root) == []
    assert worker.proc.poll() is None


def test_soft_time_limit_removes_temporary_files_before_failing(
    start_worker, celery_app, files_root, redis_client
):
    worker = start_worker("files", pool="prefork", concurrency=1)
    block = os.urandom(1 << 20)  # incompressible, so gzip takes seconds
    with (files_root / "slow.bin").open("wb") as handle:
        for _ in range(160):
            handle.write(block)
    # Per message: a sender stamps its own configured limits on the message, and those win.
    result = celery_app.send_task("tasks.files.compress", args=["slow.bin"], soft_time_limit=1)
    result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE" and type(result.result).__name__ == "SoftTimeLimitExceeded", worker.log()
    assert ff.temp_leftovers(files_root) == []
    assert not (files_root / "derived").exists()
    letters = wait_for(lambda: DeadLetterStore(redis_client).list(), what="the dead letter")
    assert [(d.task_name, d.exc_type) for d in letters] == [("tasks.files.compress", "SoftTimeLimitExceeded")]
    # Not a permanent error: Celery's own report, with the traceback, stays.
    assert "raised unexpected: SoftTimeLimitExceeded" in worker.log() and "Traceback" in worker.log()


def test_progress_is_visible_to_event_monitors_like_flower(start_worker, celery_app, files_root):
    """Flower builds its task table from events; the custom task-progress event shows PROGRESS there."""
    from celery.events.state import State

    start_worker("files", pool="prefork", concurrency=1)
    with (files_root / "big.bin").open("wb") as handle:
        handle.truncate(256 << 20)
    state, seen = State(), []

    def on_event(event):
        state.event(event)
        if event["type"] == "task-progress":
            seen.append((event["uuid"], state.tasks[event["uuid"]].state, event["done"], event["total"]))

    with celery_app.connection_for_read() as connection:
        receiver = celery_app.events.Receiver(connection, handlers={"*": on_event})
        thread = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True
        )
        thread.start()
        with celery_app.events.default_dispatcher() as probe:

            def listening():
                probe.send("task-progress", uuid="probe", done=0, total=0)
                return seen

            wait_for(listening, timeout=20, interval=0.2, what="the event receiver to listen")
        result = celery_app.send_task("tasks.files.inspect_file", args=["big.bin"])
        assert result.get(timeout=60)["size"] == 256 << 20
        final = (result.id, "PROGRESS", 256 << 20, 256 << 20)
        wait_for(lambda: final in seen, timeout=20, what="the final progress event")
        receiver.should_stop = True
        thread.join(10)
    assert state.tasks[result.id].state in ("PROGRESS", "SUCCESS")
