"""process_upload end to end: the canvas on an image, an archive and a CSV, its email, the beat cleaner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from tests import filefactory as ff
from tests.conftest import smtp_env
from tests.harness import ROOT, EventMonitor, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]


def _uploads(root):
    ff.photo(root / "up/photo.jpg", (1600, 1200), orientation=8)
    ff.zip_of(
        root / "up/bundle.zip",
        {
            "readme.txt": b"hello\n",
            "img/pic.jpg": ff.photo(root / "pic-src.jpg", (64, 48)).read_bytes(),
            "data.csv": b"a,b\n1,2\n",
        },
    )
    ff.sample_csv(root / "up/table.csv")
    return ["up/photo.jpg", "up/bundle.zip", "up/table.csv"]


def test_pipeline_on_an_image_an_archive_and_a_csv(start_worker, celery_app, files_root):
    from tasks.files import process_upload

    start_worker("files", pool="prefork", concurrency=2)
    photo, bundle, table = (process_upload.delay(key).get(timeout=60) for key in _uploads(files_root))

    assert (photo["kind"], photo["notified"]) == ("image", None)
    sizes = [Image.open(files_root / k).size for k in photo["outputs"]["thumbnails"]]
    assert sizes == [(240, 320), (768, 1024)]  # EXIF orientation 8: shown portrait

    members = {m["key"].rsplit("/extracted/", 1)[1]: m for m in bundle["outputs"]["members"]}
    assert {name: m["kind"] for name, m in members.items()} == {
        "readme.txt": "text",
        "img/pic.jpg": "image",
        "data.csv": "csv",
    }
    for member in members.values():
        assert member["sha256"] == hashlib.sha256((files_root / member["key"]).read_bytes()).hexdigest()

    assert table["kind"] == "csv"
    assert (table["outputs"]["import"]["rows"], table["outputs"]["import"]["failed_rows"]) == (4, 1)
    assert ff.temp_leftovers(files_root) == []


def test_a_failing_step_fails_the_pipeline_under_its_own_id_and_name(
    start_worker, celery_app, files_root, redis_client
):
    from tasks.files import process_upload

    start_worker("files", pool="prefork", concurrency=2)
    ff.zip_of(files_root / "slip.zip", {"../../evil": b"x"})
    ff.zip_of(files_root / "bad-member.zip", {"ok.txt": b"fine\n", "empty.txt": b""})
    monitor = EventMonitor(celery_app, redis_client, kind="*")
    slip, member = process_upload.delay("slip.zip"), process_upload.delay("bad-member.zip")
    for result in (slip, member):
        result.get(timeout=60, propagate=False)  # the caller is told; it does not wait forever
    events = monitor.events_for([slip.id, member.id], until="task-failed")
    assert slip.state == "FAILURE" and type(slip.result).__name__ == "UnsafePathError"
    assert "zip slip" in str(slip.result)
    # A member check of the chord failed: the pipeline fails with that check's own error.
    assert member.state == "FAILURE" and type(member.result).__name__ == "FileNotFoundForProcessing"
    assert "extracted/empty.txt' is empty" in str(member.result)
    for result in (slip, member):
        meta = json.loads(redis_client.get(f"celery-task-meta-{result.id}"))
        assert (meta["status"], meta["name"]) == ("FAILURE", "tasks.files.process_upload")

    # What Flower reads: the id was received as process_upload and ends failed, with the error.
    state = _flower_state(events)
    for result in (slip, member):
        task = state.tasks[result.id]
        assert (task.name, task.state) == ("tasks.files.process_upload", "FAILURE"), task.info()
    assert "zip slip" in state.tasks[slip.id].exception


def test_a_succeeding_pipeline_ends_success_under_its_own_id_and_name(
    start_worker, celery_app, files_root, redis_client
):
    from tasks.files import process_upload

    start_worker("files", pool="prefork", concurrency=2)
    ff.v7_tar_of(files_root / "old.tar", {"notes.csv": b'id,note\n1,"two\nlines"\n2,x\n'})
    cell = "x" * 70 * 1024
    (files_root / "wide.csv").write_text(f'id,blob,n\n1,"{cell}",3\n2,short,4\n')
    monitor = EventMonitor(celery_app, redis_client, kind="*")
    tar, wide = process_upload.delay("old.tar"), process_upload.delay("wide.csv")
    tar_summary, wide_summary = tar.get(timeout=60), wide.get(timeout=60)
    events = monitor.events_for([tar.id, wide.id], until="task-succeeded")

    assert tar.state == "SUCCESS" and tar_summary["kind"] == "archive"  # a V7 tar, no ustar marker
    [notes] = tar_summary["outputs"]["members"]
    assert notes["kind"] == "csv"  # quoted newlines: still a CSV
    assert wide_summary["kind"] == "csv" and wide_summary["outputs"]["import"]["rows"] == 2
    state = _flower_state(events)
    for result in (tar, wide):
        task = state.tasks[result.id]
        assert (task.name, task.state) == ("tasks.files.process_upload", "SUCCESS"), task.info()
        meta = json.loads(redis_client.get(f"celery-task-meta-{result.id}"))
        assert (meta["status"], meta["name"]) == ("SUCCESS", "tasks.files.process_upload")


def _flower_state(events):
    """Flower's view of the tasks: Celery's event State fed with the events, in order."""
    from celery.events.state import State

    state = State()
    for event in events:
        state.event(event)
    return state


def test_pipeline_mails_its_summary_once(start_worker, celery_app, files_root, smtp_server, redis_client):
    from tasks.files import process_upload

    start_worker("files,email", pool="prefork", concurrency=2, env=smtp_env(smtp_server))
    keys = _uploads(files_root)
    summaries = [process_upload.delay(key, notify="ops@example.com").get(timeout=60) for key in keys]
    wait_for(lambda: len(smtp_server.handler.received) >= 3, timeout=30, what="three summary emails")

    mails = {m.message["Subject"]: m for m in smtp_server.handler.received}
    assert set(mails) == {f"Processed {k} ({s['kind']})" for k, s in zip(keys, summaries, strict=True)}
    assert all(m.rcpt_tos == ["ops@example.com"] for m in mails.values())
    body = mails["Processed up/table.csv (csv)"].message.get_content()
    assert "4 rows, 3 columns, 1 failed rows" in body and summaries[2]["sha256"] in body

    # The same file again: the same idempotency key, so no second email.
    again = process_upload.delay("up/table.csv", notify="ops@example.com")
    assert again.get(timeout=60)["sha256"] == summaries[2]["sha256"]
    sends = wait_for(lambda: _finished_sends(redis_client, 4), timeout=30, what="the fourth send_email")
    assert sorted(bool(s["duplicate"]) for s in sends) == [False, False, False, True]
    assert len(smtp_server.handler.received) == 3


def _finished_sends(redis_client, count):
    """Results of the send_email tasks that finished, once there are `count` of them."""
    metas = [json.loads(redis_client.get(k) or "{}") for k in redis_client.scan_iter("celery-task-meta-*")]
    sends = [
        m["result"]
        for m in metas
        if m.get("name") == "tasks.email.send_email" and m.get("status") == "SUCCESS"
    ]
    return sends if len(sends) >= count else None


def test_beat_removes_old_temporary_files(start_worker, worker_env, files_root, tmp_path):
    start_worker("files", pool="prefork", concurrency=1)
    old = files_root / "derived/x/.thumb.jpg.proj-tmp-dead"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"orphan of a killed task")
    past = time.time() - 7200
    os.utime(old, (past, past))
    young = files_root / ".fresh.proj-tmp-running"
    young.write_bytes(b"a task is writing this right now")
    env = {**worker_env, "FILES_CLEAN_INTERVAL": "1", "FILES_TEMP_MAX_AGE": "3600"}
    beat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "beat",
            "-l",
            "INFO",
            "-s",
            str(tmp_path / "beat-schedule"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: not old.exists(), timeout=40, interval=0.2, what="beat to clean the orphan")
    finally:
        stop_process(beat)
    assert young.exists()
