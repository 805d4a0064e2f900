"""`proj process-file` as a user runs it: a subprocess that stores the file and draws the progress."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_process_file_reports_a_failed_pipeline(start_worker, worker_env, tmp_path):
    start_worker("files", pool="prefork", concurrency=1)
    source = tmp_path / "broken.jpg"
    source.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)  # a JPEG header and nothing after it
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "proj"), "process-file", str(source)],
        cwd=ROOT,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Pipeline failed" in proc.stdout and "is not an image" in proc.stdout
