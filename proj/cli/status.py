"""`proj status`: queue depths, the age of the oldest waiting message, workers, and per-queue probes."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from proj.settings import REDIS_BROKER_SCHEMES, get_settings
from proj.stores.canary import CanaryProbe, CanaryRecords
from proj.stores.connection import redis_client
from proj.stores.consumption import stalled_queues
from proj.stores.readings import Readings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the status options."""
    parser.add_argument(
        "--probe", action="store_true", help="send tasks.health.canary to every queue and time the answer"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for workers and probes")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check for stalled queues (a health check): print each and exit 1, else exit 0",
    )
    parser.add_argument(
        "--queues",
        help="with --check or --probe: the comma-separated queues to check or probe (default: every queue)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the state of queues and workers; exit 1 when no worker answers or a probe fails.

    With --check, only look for stalled queues and exit 1 when one is.
    """
    import celeryconfig

    names = [queue.name for queue in celeryconfig.task_queues]
    chosen = args.queues.split(",") if args.queues else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"not a declared queue: {', '.join(unknown)}")
        return 1
    if args.check:
        if not celeryconfig.broker_url.startswith(REDIS_BROKER_SCHEMES):
            print("stall check not available: it reads Redis queue lists and the broker is not Redis")
            return 0
        return _check(chosen, args.timeout)
    from proj.celery import app
    from proj.integration.metrics import readings

    client = redis_client(get_settings().redis_url)
    found = readings(app, client)  # before probing: a probe nobody answers stays in its queue
    if args.probe:
        records = CanaryRecords(client)
        probes = {name: _probe(app, name, args.timeout) for name in chosen}
        for probe in probes.values():
            records.record(probe)
        found = replace(found, canaries=records.last())
    report = _report(found, _workers(app, args.timeout))
    if args.probe:
        report["probes"] = {name: _probe_json(probe) for name, probe in probes.items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(Console(), report)
    probes_ok = all(p["ok"] for p in report.get("probes", {}).values())
    return 0 if report["workers"] and probes_ok else 1


def _check(names: list[str], timeout: float) -> int:
    """Print one line per stalled queue and return 1, or 0 when none is (docs/operations.md)."""
    window = get_settings().stall_window
    if window <= 0:
        print("stall check off (PROJ_STALL_WINDOW=0)")
        return 0
    # Only Redis, no broadcast to workers: cheap enough for a container health check.
    client = redis_client(get_settings().redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    now = time.time()
    try:
        stalls = stalled_queues(client, names, window, now)
    except redis.RedisError as exc:
        print(f"cannot check for stalled queues: {exc}")
        return 1
    for stall in stalls:
        print(f"stalled: {stall.describe(now, window)} (window {window:g} s)")
    if stalls:
        return 1
    print(f"no stalled queue: {', '.join(names)} (window {window:g} s)")
    return 0


def _workers(app: Any, timeout: float) -> dict[str, list[str]]:
    active = app.control.inspect(timeout=min(timeout, 2.0)).active_queues() or {}
    return {name: sorted(q["name"] for q in queues) for name, queues in sorted(active.items())}


def _probe(app: Any, queue: str, timeout: float) -> CanaryProbe:
    """Send a canary to `queue` and wait for its answer (tasks.health.canary)."""
    from celery.exceptions import TimeoutError as NoAnswer

    started = time.monotonic()
    result = app.send_task("tasks.health.canary", queue=queue)
    try:
        answer = result.get(timeout=timeout)
    except NoAnswer:
        result.revoke()  # a late worker should not run a probe nobody waits for
        return CanaryProbe(queue, False, time.time(), error=f"no answer within {timeout:g}s")
    except Exception as exc:  # a probe reports whatever went wrong instead of raising
        return CanaryProbe(queue, False, time.time(), error=f"{type(exc).__name__}: {exc}")
    seconds = round(time.monotonic() - started, 4)
    return CanaryProbe(queue, True, time.time(), seconds, error="", worker=answer["hostname"])


def _report(found: Readings, workers: dict[str, list[str]]) -> dict[str, Any]:
    """The figures as `--json` prints them (the same ones /metrics exports)."""
    return {
        "queues": [asdict(q) for q in found.queues],
        "unacked": found.unacked,
        "dead_letters": found.dead_letter_total,
        "dead_letters_by_task": [asdict(d) for d in found.dead_letters],
        "set_aside": found.set_aside,
        "canaries": [asdict(p) for p in found.canaries],
        "workers": workers,
    }


def _probe_json(probe: CanaryProbe) -> dict[str, Any]:
    if probe.ok:
        return {"ok": True, "seconds": probe.seconds, "worker": probe.worker}
    return {"ok": False, "error": probe.error}


def _canary_cell(probe: dict[str, Any] | None, now: float) -> str:
    """The last canary of a queue: round trip and who answered, or why not; and how long ago."""
    if probe is None:
        return ""
    ago = f"{max(0.0, now - probe['at']):.0f}s ago"
    if probe["ok"]:
        return f"{probe['seconds'] * 1000:.0f} ms by {probe['worker']}, {ago}"
    return f"{probe['error']}, {ago}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _print(console: Console, report: dict[str, Any]) -> None:
    now = time.time()
    queues = Table(title="Queues")
    for column in ("queue", "waiting", "oldest", "unacked", "parked", "last canary"):
        queues.add_column(column)
    canaries = {probe["queue"]: probe for probe in report["canaries"]}
    for stat in report["queues"]:
        age = "-" if stat["oldest_age"] is None else f"{stat['oldest_age']:.1f}s"
        queues.add_row(
            stat["name"],
            str(stat["depth"]),
            age,
            _count(stat["unacked"]),
            _count(stat["parked"]),
            _canary_cell(canaries.get(stat["name"]), now),
        )
    console.print(queues)
    console.print(
        f"Delivered but not yet acknowledged: {report['unacked']}   Dead letters: {report['dead_letters']}"
        f"   Set aside: {report['set_aside']}"
    )
    if report["dead_letters_by_task"]:
        letters = Table(title="Dead letters")
        for column in ("task", "error", "count"):
            letters.add_column(column)
        for row in report["dead_letters_by_task"]:
            letters.add_row(row["task"], row["error"], str(row["count"]))
        console.print(letters)
    workers = Table(title="Workers")
    workers.add_column("worker")
    workers.add_column("consumes")
    for name, consumed in report["workers"].items():
        workers.add_row(name, ", ".join(consumed))
    console.print(workers if report["workers"] else "[bold red]No worker answered.[/]")
