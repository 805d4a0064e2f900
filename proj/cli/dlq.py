"""`proj dlq`: list, show, replay or purge the tasks that failed for good."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from rich.console import Console
from rich.table import Table

from proj.settings import get_settings
from proj.stores.connection import redis_client
from proj.stores.deadletters import DeadLetter, DeadLetterStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the dlq actions."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the most recent dead letters")
    listing.add_argument("--limit", type=int, default=50)
    actions.add_parser("show", help="one dead letter in full").add_argument("task_id")
    replay = actions.add_parser("replay", help="enqueue a dead letter again and forget it")
    replay.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    actions.add_parser("purge", help="forget every dead letter").add_argument("--yes", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Carry out one dlq action."""
    store = DeadLetterStore(redis_client(get_settings().redis_url))
    console = Console()
    if args.action == "list":
        console.print(_table(store.list(args.limit), store.count()))
        return 0
    if args.action == "show":
        return _show(console, store.get(args.task_id), args.task_id)
    if args.action == "replay":
        return _replay(console, store, args)
    if not args.yes:
        console.print("Refusing to purge without --yes.")
        return 2
    console.print(f"Purged {store.purge()} dead letters.")
    return 0


def _table(letters: list[DeadLetter], total: int) -> Table:
    table = Table(title=f"Dead letters ({len(letters)} of {total})")
    for column in ("failed at", "task id", "task", "queue", "error"):
        table.add_column(column)
    for letter in letters:
        when = dt.datetime.fromtimestamp(letter.failed_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            when,
            letter.task_id,
            letter.task_name,
            letter.queue or "-",
            f"{letter.exc_type}: {letter.message}"[:120],
        )
    return table


def _show(console: Console, letter: DeadLetter | None, task_id: str) -> int:
    if letter is None:
        console.print(f"No dead letter with task id {task_id!r}.")
        return 1
    console.print_json(json.dumps({k: v for k, v in vars(letter).items() if k != "traceback"}, default=repr))
    console.print(letter.traceback, markup=False, highlight=False)
    return 0


def _replay(console: Console, store: DeadLetterStore, args: argparse.Namespace) -> int:
    from proj.celery import app

    letters = store.list(limit=1_000_000) if args.all else [store.get(t) for t in args.task_ids]
    missing = [tid for tid, letter in zip(args.task_ids, letters, strict=False) if letter is None]
    for letter in filter(None, letters):
        # Routing by name, as for any caller: the replay lands on the task's own queue.
        new = app.send_task(letter.task_name, args=letter.args, kwargs=letter.kwargs)
        store.remove(letter.task_id)
        console.print(f"Replayed {letter.task_name}[{letter.task_id}] as {new.id}")
    for task_id in missing:
        console.print(f"No dead letter with task id {task_id!r}.")
    return 1 if missing else 0
