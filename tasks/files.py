"""File tasks: thin adapters over proj.files, all routed to the `files` queue by name."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, chain, chord, group
from celery.exceptions import ChordError, Ignore
from celery.utils.log import get_task_logger
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from proj.celery import app
from proj.errors import PermanentError, TransientError
from proj.files import archives, checksums, csvimport, images, summary
from proj.files import compress as compressing
from proj.files.storage import ProgressCallback, Storage
from proj.integration import pipeline
from proj.settings import get_settings

logger = get_task_logger(__name__)
# For fail_upload, which runs inside the failing step (a task logger would name it with no id).
pipeline_logger = logging.getLogger(f"{__name__}.pipeline")

FILES_MAX_RETRIES = 5
# Backoff stays within the longest countdown the broker may hold, so a retry never outlives
# the visibility timeout (celeryconfig.broker_max_countdown, default 30 s).
FILES_RETRY_BACKOFF_MAX = min(30, int(app.conf.broker_max_countdown))
# At most one PROGRESS write per task per this many seconds: Redis is not a progress bus.
PROGRESS_INTERVAL = 0.5
SEND_EMAIL = "tasks.email.send_email"

# One retry policy for every file step: transient storage errors only, backoff with jitter, finite.
retrying = app.task(
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff=True,
    retry_backoff_max=FILES_RETRY_BACKOFF_MAX,
    retry_jitter=True,
    max_retries=FILES_MAX_RETRIES,
)


def _storage() -> Storage:
    return Storage(get_settings().files_root)


def _progress(task: Task[Any, Any], unit: str = "bytes") -> ProgressCallback:
    """A throttled callback storing PROGRESS {done, total, unit, step} on the task and its pipeline's root."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if task.request.called_directly or (done < total and now - last[0] < PROGRESS_INTERVAL):
            return
        last[0] = now
        meta: dict[str, Any] = {
            "done": done,
            "total": total,
            "unit": unit,
            "step": task.name.rsplit(".", 1)[-1],
        }
        if task.request.group:  # one of parallel steps (a chord's members): drawn together
            meta |= {"group": task.request.group, "part": task.request.group_index}
        try:
            _publish_progress(task, meta)
        except (RedisError, OperationalError) as exc:
            # Progress is for people watching; losing one report must not fail the work.
            logger.warning("Could not report progress of %s: %s", task.request.id, exc)

    return report


def _publish_progress(task: Task[Any, Any], meta: dict[str, Any]) -> None:
    """Store PROGRESS in the result backend and send it as an event."""
    task.update_state(state="PROGRESS", meta=meta)
    # Flower follows events, not the result backend: a custom event shows the task as PROGRESS.
    task.send_event("task-progress", **meta)
    root = task.request.root_id
    if root and root != task.request.id:
        # The CLI follows one id, the pipeline's; mirror the step's progress there.
        task.update_state(task_id=root, state="PROGRESS", meta=meta)


@retrying
def inspect_file(self: Task[Any, Any], key: str) -> dict[str, Any]:
    """Size, SHA-256 and sniffed type of the file at `key`."""
    return checksums.inspect_file(_storage(), key, _progress(self))


@retrying
def make_thumbnails(self: Task[Any, Any], key: str, sizes: list[list[int]] | None = None) -> list[str]:
    """Thumbnails of the image at `key`, one per [width, height] box; returns their keys."""
    limit = get_settings().files_max_image_pixels
    return images.make_thumbnails(
        _storage(),
        key,
        sizes or images.DEFAULT_SIZES,
        max_pixels=limit,
        on_progress=_progress(self, unit="thumbnails"),
    )


@retrying
def extract_archive(self: Task[Any, Any], key: str) -> list[str]:
    """Extract the zip or tar at `key` under derived/<key>/extracted/; returns the extracted keys."""
    s = get_settings()
    limits = archives.ArchiveLimits(
        s.files_archive_max_bytes,
        s.files_archive_max_members,
        s.files_archive_max_ratio,
        s.files_archive_max_depth,
    )
    return archives.extract_archive(_storage(), key, limits, _progress(self))


@retrying
def import_csv(self: Task[Any, Any], key: str) -> dict[str, Any]:
    """Column statistics of the CSV at `key` and the key of its failed-rows report."""
    limit = get_settings().files_csv_max_field
    return csvimport.import_csv(_storage(), key, max_field=limit, on_progress=_progress(self))


@retrying
def compress(self: Task[Any, Any], key: str, format: str = "gzip") -> dict[str, Any]:
    """Compress the file at `key` with gzip or zstd; returns the output key and the ratio."""
    return compressing.compress(_storage(), key, format, _progress(self))


@retrying
def clean_temp_files(self: Task[Any, Any], max_age: int | None = None) -> dict[str, Any]:
    """Remove temporary files left by killed tasks (run by beat)."""
    if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int | float)):
        raise PermanentError(
            f"clean_temp_files: max_age must be a number of seconds, got {type(max_age).__name__}"
        )
    age = get_settings().files_temp_max_age if max_age is None else max_age
    removed = _storage().clean_temp(age)
    logger.info("Removed %d orphaned temporary files", len(removed))
    return {"removed": removed}


# --- the pipeline: each step is its own task, chained by Celery's canvas -----------------------
# The id process_upload returns ends SUCCESS (summarize_upload) or FAILURE (fail_upload, the errback
# of every step) under its own name; see proj/integration/pipeline.py for why not Task.replace.


@app.task(bind=True)
def process_upload(self: Task[Any, Any], key: str, notify: str | None = None) -> Any:
    """Inspect `key`, then thumbnail / extract / import it by kind; the result is the summary."""
    started_by = pipeline.origin(self.request, self.name)
    steps = chain(inspect_file.si(key), plan_upload.s(notify=notify, started_by=started_by))
    steps.apply_async(link_error=fail_upload.s(started_by=started_by))
    raise Ignore()  # the pipeline's last step records this task's outcome


@app.task(bind=True)
def plan_upload(
    self: Task[Any, Any],
    info: dict[str, Any],
    notify: str | None = None,
    started_by: dict[str, Any] | None = None,
) -> str:
    """Start the steps for the file's kind, ending in the summary; returns the kind."""
    key, finish = info["key"], {"info": info, "notify": notify, "started_by": started_by}
    steps = {
        "image": chain(make_thumbnails.si(key), summarize_upload.s(output="thumbnails", **finish)),
        "csv": chain(import_csv.si(key), summarize_upload.s(output="import", **finish)),
        "archive": chain(extract_archive.si(key), inspect_members.s(**finish)),
    }
    chosen = steps.get(info["kind"], summarize_upload.si(None, output=None, **finish))
    chosen.apply_async(link_error=_errbacks(self))
    return str(info["kind"])


@app.task(bind=True)
def inspect_members(
    self: Task[Any, Any],
    keys: list[str],
    info: dict[str, Any],
    notify: str | None = None,
    started_by: dict[str, Any] | None = None,
) -> int:
    """Inspect every extracted member in parallel, then summarize (a chord); returns their number."""
    finish = summarize_upload.s(output="members", info=info, notify=notify, started_by=started_by)
    for errback in _errbacks(self):
        # On the body only: a chord calls its body's errbacks once when any member failed.
        finish.link_error(errback)
    if not keys:
        finish.apply_async(([],))
        return 0
    members = chord(group(inspect_file.si(k) for k in keys), finish)
    members.freeze()
    meta = {"step": "inspect_members", "unit": "files", "done": 0, "total": len(keys)}
    _publish_progress(self, {**meta, "group": members.tasks.id})
    members.apply_async()
    return len(keys)


@app.task(bind=True)
def summarize_upload(
    self: Task[Any, Any],
    result: Any,
    info: dict[str, Any],
    output: str | None,
    notify: str | None = None,
    started_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the pipeline's summary and, if asked, mail it through tasks.email.send_email."""
    done = summary.summarize(info, {output: result} if output else {}, notify)
    if notify:
        app.send_task(SEND_EMAIL, kwargs={"to": notify, **summary.notification(done)})
    if started_by:
        pipeline.record_success(app, started_by, done, self.request.hostname)
    return done


@app.task
def fail_upload(request: Any, exc: Exception, traceback: str | None, started_by: dict[str, Any]) -> None:
    """Errback of every step: the pipeline fails with the failing step's error."""
    if isinstance(exc, ChordError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__  # a chord member failed: its own error rather than Celery's wrapper
    # INFO: the failing step has logged its own failure already.
    pipeline_logger.info("Pipeline %s failed in %s[%s]", started_by["id"], request.task, request.id)
    pipeline.record_failure(app, started_by, exc, traceback, request.hostname)


def _errbacks(task: Task[Any, Any]) -> list[Any]:
    """The errbacks of the running step, for the steps it starts."""
    return [app.signature(errback) for errback in task.request.errbacks or []]
