"""`proj process-file`: copy a file into storage, run the pipeline, follow its progress."""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from proj.files.storage import CHUNK_SIZE, Storage
from proj.settings import get_settings

PROCESS_UPLOAD = "tasks.files.process_upload"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of process-file."""
    parser.add_argument("path", type=Path, help="the file to process")
    parser.add_argument("--notify", metavar="ADDR", help="email the summary to this address")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the pipeline")


def run(args: argparse.Namespace) -> int:
    """Store the file, enqueue the pipeline by name, draw its progress, print the summary."""
    console = Console(soft_wrap=True)  # keys and paths stay on one line, also in logs
    source: Path = args.path
    if not source.is_file():
        console.print(f"[red]No such file: {source}[/red]")
        return 2
    key = store_upload(Storage(get_settings().files_root), source)
    console.print(f"Stored {source} as [bold]{key}[/bold]")
    from celery.exceptions import TimeoutError as ResultTimeout  # imported here: `proj --help` stays fast

    from proj.celery import app

    result = app.send_task(PROCESS_UPLOAD, kwargs={"key": key, "notify": args.notify})
    console.print(f"Pipeline {result.id} enqueued")
    try:
        with _StepProgress(console) as progress:
            outcome = result.get(on_message=progress.update, propagate=False, timeout=args.timeout)
    except ResultTimeout:
        console.print(f"[yellow]Still running after {args.timeout:g} s: {result.id}[/yellow]")
        return 1
    if result.state != "SUCCESS":
        console.print(f"[red]Pipeline failed: {outcome!r}[/red]")
        return 1
    console.print_json(data=outcome)
    return 0


def store_upload(storage: Storage, source: Path) -> str:
    """Copy `source` to uploads/<sha256 prefix>/<name>: the same content always lands at the same key."""
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    name = _UNSAFE_NAME.sub("_", source.name).lstrip(".") or "upload"
    key = f"uploads/{digest.hexdigest()[:16]}/{name}"
    with source.open("rb") as handle, storage.writer(key) as out:
        shutil.copyfileobj(handle, out, CHUNK_SIZE)
    return key


class _AmountColumn(ProgressColumn):
    """Bytes as sizes (12.3/45.6 MB); other units as counts (2/2 thumbnails)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes = DownloadColumn()

    def render(self, task: Task) -> Text:
        """The amount done of the row's task, in its unit."""
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return self.sizes.render(task)
        total = "?" if task.total is None else f"{task.total:g}"
        return Text(f"{task.completed:g}/{total} {unit}", style="progress.download")


class _StepProgress:
    """One rich progress row per pipeline step, fed by the PROGRESS states of the pipeline's id.

    A step's messages carry {done, total, unit, step}; the members of a parallel step (a chord's
    checks of extracted files) also carry their group and part, and share one row counting the
    members done, announced by the step that started them with the number of members.
    """

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            TaskProgressColumn(),
            _AmountColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.rows: dict[str, TaskID] = {}
        self.totals: dict[TaskID, float | None] = {}  # of the rows of single steps
        self.parts_done: dict[str, set[Any]] = {}

    def __enter__(self) -> _StepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, message: dict[str, Any]) -> None:
        """Handle one state message of the pipeline's task."""
        meta = message.get("result")
        if message.get("status") != "PROGRESS" or not isinstance(meta, dict):
            return
        step = str(meta.get("step", "working"))
        done, total = meta.get("done", 0), meta.get("total") or None
        row_key = str(meta.get("group") or step)
        if "part" in meta:  # one member of a parallel step: count it once it is done
            row = self._row(row_key, step, None, "files")
            if total is None or done >= total:
                self.parts_done.setdefault(row_key, set()).add(meta["part"])
            self.progress.update(row, completed=len(self.parts_done.get(row_key, ())))
            return
        row = self._row(row_key, step, total, str(meta.get("unit", "bytes")))
        self.totals[row] = total
        self.progress.update(row, completed=done, total=total)

    def _row(self, key: str, step: str, total: float | None, unit: str) -> TaskID:
        """The row for `key`, added on its first message; a new row means the earlier ones are done."""
        if key not in self.rows:
            for earlier, earlier_total in self.totals.items():
                self.progress.update(earlier, completed=earlier_total or 0)
            self.rows[key] = self.progress.add_task(step, total=total, unit=unit)
        return self.rows[key]
