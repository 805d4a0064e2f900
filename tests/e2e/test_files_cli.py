"""`proj process-file` as a user runs it: a subprocess that stores the file and draws the progress."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import filefactory as ff
from tests.harness import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_process_file_shows_progress_and_prints_the_summary(start_worker, worker_env, files_root, tmp_path):
    start_worker("files", pool="prefork", concurrency=1)
    source = tmp_path / "dump.bin"
    with source.open("wb") as handle:
        handle.truncate(256 << 20)  # sparse: quick to make, real bytes to read
    digest = hashlib.sha256(b"\0" * (256 << 20)).hexdigest()

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "proj"), "process-file", str(source)],
        cwd=ROOT,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    key = f"uploads/{digest[:16]}/dump.bin"
    assert f"Stored {source} as {key}" in out
    progress_line = next(line for line in out.splitlines() if line.startswith("inspect_file"))
    assert "100%" in progress_line and "268.4/268.4 MB" in progress_line
    summary = json.loads(out[out.index("{") :])
    assert summary == {
        "key": key,
        "size": 256 << 20,
        "sha256": digest,
        "mime": "application/octet-stream",
        "kind": "binary",
        "outputs": {},
        "notified": None,
    }
    assert (files_root / key).stat().st_size == 256 << 20


def test_process_file_reports_a_failed_pipeline(start_worker, worker_env, tmp_path, redis_client):
    start_worker("files", pool="prefork", concurrency=1)
    source = tmp_path / "broken.jpg"
    source.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)  # a JPEG header and nothing after it
    proc = _process_file(worker_env, source)
    assert proc.returncode == 1
    assert "Pipeline failed" in proc.stdout and "is not an image" in proc.stdout
    # The id it printed ends FAILURE, under the pipeline's name, with the failing step's error.
    pipeline_id = re.search(r"Pipeline (\S+) enqueued", proc.stdout).group(1)
    meta = json.loads(redis_client.get(f"celery-task-meta-{pipeline_id}"))
    assert (meta["status"], meta["name"]) == ("FAILURE", "tasks.files.process_upload")
    assert "is not an image" in meta["result"]["exc_message"][0]


def test_progress_rows_carry_their_unit_one_row_per_step(start_worker, worker_env, tmp_path):
    start_worker("files", pool="prefork", concurrency=2)
    photo = ff.photo(tmp_path / "photo.jpg", (800, 600))
    bundle = ff.zip_of(
        tmp_path / "bundle.zip", {"a.txt": b"alpha\n", "b.csv": b"x,y\n1,2\n", "c.jpg": photo.read_bytes()}
    )

    image_rows = _rows(_process_file(worker_env, photo))
    assert list(image_rows) == ["inspect_file", "make_thumbnails"]
    assert "100% 2/2 thumbnails" in image_rows["make_thumbnails"]  # counted in thumbnails, not bytes

    zip_rows = _rows(_process_file(worker_env, bundle))
    # The member checks have a row of their own, counting files; the first row stays the zip's.
    assert list(zip_rows) == ["inspect_file", "extract_archive", "inspect_members"]
    assert "3/3 files" in zip_rows["inspect_members"] and "100%" in zip_rows["inspect_members"]
    size = bundle.stat().st_size  # under 1 kB: rich shows it in bytes
    assert size < 1000 and f"100% {size}/{size} bytes" in zip_rows["inspect_file"]


def _process_file(env, source):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "proj"), "process-file", str(source)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc


def _rows(proc):
    """The progress rows `proj process-file` left on screen, by step; every row appears once."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = ("inspect_file", "make_thumbnails", "extract_archive", "inspect_members", "import_csv")
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in steps]
    rows = {line.split(" ", 1)[0]: line for line in lines}
    assert len(rows) == len(lines), lines
    return rows
