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
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

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


class _StepProgress:
    """One rich progress bar per pipeline step, fed by the PROGRESS states of the task."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.steps: dict[str, TaskID] = {}
        self.totals: dict[TaskID, float | None] = {}

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
        step, total = str(meta.get("step", "working")), meta.get("total") or None
        if step not in self.steps:
            for earlier, earlier_total in self.totals.items():  # a new step: the earlier ones are done
                self.progress.update(earlier, completed=earlier_total or 0)
            self.steps[step] = self.progress.add_task(step, total=total)
        self.totals[self.steps[step]] = total
        self.progress.update(self.steps[step], completed=meta.get("done", 0), total=total)
