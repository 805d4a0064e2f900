"""`proj dlq`: list, show, replay or purge the tasks that failed for good."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

from proj.settings import get_settings
from proj.stores.connection import redis_client
from proj.stores.deadletters import REPLAY_OF_HEADER, DeadLetter, DeadLetterStore

ELLIPSIS = "…"
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The error line of the default listing never gets narrower than this, whatever the task name.
MIN_ERROR_WIDTH = 30
WIDE_ERROR_WIDTH = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the dlq actions."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="the most recent dead letters", description="The most recent dead letters, newest first."
    )
    listing.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
    listing.add_argument("--task", metavar="T", help="only tasks whose name contains T")
    listing.add_argument("--error", metavar="E", help="only errors whose type or message contains E")
    listing.add_argument(
        "--since", metavar="AGE", type=_age, help="only those that failed within AGE: 30s, 15m, 1h, 2d"
    )
    form = listing.add_mutually_exclusive_group()
    form.add_argument("--wide", action="store_true", help="one line per dead letter, every column")
    form.add_argument("--json", action="store_true", help="the records as JSON, tracebacks aside")
    show = actions.add_parser("show", help="one dead letter in full")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true", help="the record as JSON")
    replay = actions.add_parser("replay", help="enqueue a dead letter again, linked to the new task")
    replay.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    actions.add_parser("purge", help="forget every dead letter").add_argument("--yes", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Carry out one dlq action."""
    store = DeadLetterStore(redis_client(get_settings().redis_url))
    if args.action == "list":
        return _list(store, args)
    if args.action == "show":
        return _show(store.get(args.task_id), args)
    if args.action == "replay":
        return _replay(store, args)
    if not args.yes:
        print("Refusing to purge without --yes.")
        return 2
    print(f"Purged {store.purge()} dead letters.")
    return 0


def age_seconds(text: str) -> int:
    """`30s`, `15m`, `1h` or `2d` as seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: use a number and s, m, h or d (1h, 2d)")
    return int(match[1]) * SINCE_UNITS[match[2]]


def _age(text: str) -> str:
    """argparse type: an age as given, once known to be one."""
    age_seconds(text)
    return text.strip()


def iso(timestamp: float) -> str:
    """Epoch seconds as ISO 8601 in UTC, to the second: 2026-12-01T09:08:03Z."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shorten(text: str, width: int) -> str:
    """`text` on one line in at most `width` characters, cut at a word if one ends late enough."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    cut = flat[: width - 1]
    space = cut.rfind(" ")
    if space >= width // 2:  # a word boundary that keeps at least half the room
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + ELLIPSIS


def _error(letter: DeadLetter) -> str:
    return f"{letter.exc_type}: {letter.message}" if letter.exc_type else letter.message


def _matcher(args: argparse.Namespace) -> Callable[[DeadLetter], bool]:
    task = (args.task or "").lower()
    error = (args.error or "").lower()
    return lambda letter: task in letter.task_name.lower() and error in _error(letter).lower()


def _list(store: DeadLetterStore, args: argparse.Namespace) -> int:
    since = time.time() - age_seconds(args.since) if args.since else 0.0
    letters = store.list(args.limit, since=since, where=_matcher(args))
    if args.json:
        print(json.dumps([_record(letter, traceback=False) for letter in letters], indent=2, default=repr))
        return 0
    print(f"Dead letters: {len(letters)} of {store.count()} shown (newest first, times in UTC)")
    filters = [f"--{name} {value}" for name in ("task", "error", "since") if (value := getattr(args, name))]
    if filters:
        print(f"Matching: {' '.join(filters)}")
    if letters:
        print()
        print("\n".join(_wide(letters) if args.wide else _blocks(letters)))
        print("\nproj dlq show TASK_ID: the whole record and its traceback")
    return 0


def _blocks(letters: list[DeadLetter]) -> list[str]:
    """Three lines per letter that fit the terminal; ids and task names are never cut."""
    width = shutil.get_terminal_size((80, 24)).columns
    lines = []
    for letter in letters:
        about = [f"on {letter.queue or '-'}"]
        if letter.retries:
            about.append(f"after {letter.retries} {'retry' if letter.retries == 1 else 'retries'}")
        if letter.replay_of:
            about.append("a replay")
        lines.append(f"{iso(letter.failed_at)}  {letter.task_id}")
        lines.append(f"  {letter.task_name} {', '.join(about)}")
        lines.append(f"  {shorten(_error(letter), max(MIN_ERROR_WIDTH, width - 3))}")  # a spare column
    return lines


def _wide(letters: list[DeadLetter]) -> list[str]:
    """One line per letter, columns aligned, for wide terminals and grep."""
    header = ("FAILED AT (UTC)", "TASK ID", "TASK", "QUEUE", "RETRIES", "REPLAY OF", "ERROR")
    rows = [
        (
            iso(d.failed_at),
            d.task_id,
            d.task_name,
            d.queue or "-",
            str(d.retries),
            d.replay_of or "-",
            shorten(_error(d), WIDE_ERROR_WIDTH),
        )
        for d in letters
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
        for row in (header, *rows)
    ]


def _record(letter: DeadLetter, traceback: bool = True) -> dict[str, Any]:
    record = {**vars(letter), "failed_at": iso(letter.failed_at)}
    if not traceback:
        del record["traceback"]
    return record


def _show(letter: DeadLetter | None, args: argparse.Namespace) -> int:
    if letter is None:
        print(f"No dead letter with task id {args.task_id!r}.")
        return 1
    if args.json:
        print(json.dumps(_record(letter), indent=2, default=repr))
        return 0
    fields = [
        ("task id", letter.task_id),
        ("task", letter.task_name),
        ("queue", letter.queue or "-"),
        ("failed at", f"{iso(letter.failed_at)} (UTC)"),
        ("retries", str(letter.retries)),
        ("replay of", letter.replay_of or "-"),
        ("replayed as", letter.replayed_as or "- (not replayed)"),
        ("args", json.dumps(letter.args, default=repr)),
        ("kwargs", json.dumps(letter.kwargs, default=repr)),
        ("error", _error(letter)),
    ]
    for name, value in fields:
        print(f"{name + ':':<13}{value}")
    print(f"\n{letter.traceback.rstrip()}" if letter.traceback else "\n(no traceback)")
    return 0


def _replay(store: DeadLetterStore, args: argparse.Namespace) -> int:
    from proj.celery import app

    letters = store.list(limit=1_000_000) if args.all else [store.get(t) for t in args.task_ids]
    missing = [tid for tid, letter in zip(args.task_ids, letters, strict=False) if letter is None]
    done = [letter for letter in letters if letter is not None and not letter.replayed_as]
    for letter in letters:
        if letter is not None and letter.replayed_as:
            print(f"{letter.task_id} was replayed already, as {letter.replayed_as} (proj dlq show has both)")
    for letter in done:
        # Routing by name, as for any caller: the replay lands on the task's own queue.
        new = app.send_task(
            letter.task_name,
            args=letter.args,
            kwargs=letter.kwargs,
            headers={REPLAY_OF_HEADER: letter.task_id},
        )
        store.mark_replayed(letter, new.id)
        print(f"Replayed {letter.task_name}[{letter.task_id}] as {new.id}")
    for task_id in missing:
        print(f"No dead letter with task id {task_id!r}.")
    return 1 if len(done) < len(letters) else 0
