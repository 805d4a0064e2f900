"""The declared policy of the file tasks and the error classification they retry on."""

from __future__ import annotations

import errno

import pytest

import celeryconfig
from proj.errors import FileNotFoundForProcessing, PermanentError, StorageUnavailableError, TransientError
from proj.files.storage import io_errors

STEPS = ("inspect_file", "make_thumbnails", "extract_archive", "import_csv", "compress", "clean_temp_files")


@pytest.fixture(scope="module")
def app():
    from proj.celery import app

    app.loader.import_default_modules()
    return app


@pytest.mark.parametrize("name", STEPS)
def test_steps_retry_transient_errors_only_with_a_bounded_backoff(app, name):
    task = app.tasks[f"tasks.files.{name}"]
    assert task.autoretry_for == (TransientError,)
    assert task.retry_backoff and task.retry_jitter and task.max_retries == 5
    assert task.retry_backoff_max <= celeryconfig.broker_max_countdown
    assert task.acks_late and task.reject_on_worker_lost


def test_every_files_task_routes_to_the_files_queue(app):
    names = [n for n in app.tasks if n.startswith("tasks.files.")]
    assert len(names) >= 10
    assert {app.amqp.router.route({}, n)["queue"].name for n in names} == {"files"}


def test_beat_runs_the_temp_cleaner():
    entry = celeryconfig.beat_schedule["files-clean-temp"]
    assert entry["task"] == "tasks.files.clean_temp_files" and entry["schedule"] > 0


@pytest.mark.parametrize(
    "exc,expected",
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), FileNotFoundForProcessing),
        (OSError(errno.EIO, "I/O error"), StorageUnavailableError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageUnavailableError),
    ],
)
def test_storage_errors_are_classified(exc, expected):
    with pytest.raises(expected) as caught, io_errors("k"):
        raise exc
    assert caught.value.__cause__ is exc
    assert isinstance(caught.value, PermanentError) != isinstance(caught.value, TransientError)
