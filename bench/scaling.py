"""Scaling: drain rate against worker processes, Redis commands per task, what one Redis sustains.

The figures of docs/scaling.md. One run, against the private Redis of the runner:

1. for 1, 2 and 4 `-P solo` worker processes of the `default` queue (the Procfile's `default-N`
   command line, repeated with its own node name), in turn for each results setting: the workers
   start and answer a ping, are held off the queue (`cancel_consumer`) while one caller process
   `.delay()`s N tasks (the empty task of bench/_projtasks.py); Redis's `INFO commandstats` and
   `INFO cpu` are read before and after that enqueue and after the drain (`add_consumer`, clock
   stopped when queue, unacked set and inflight lists are empty); the commands of the drain check
   itself are counted and taken off;
2. `redis-benchmark` against the same Redis: SET, GET, LPUSH, RPOP and EVALSHA of the script proj's
   result backend runs for every result write, unpipelined and pipelined.

`python -m bench.scaling` runs it three times and prints the tables of docs/scaling.md with the
date and the machine; `python -m bench scaling` runs it as a topic of the benchmark report.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis

from bench import common, throughput
from proj.integration.result_backend import STORE_UNLESS_SUCCEEDED
from proj.stores.inflight import InflightLists

RUNS = 3
WORKER_COUNTS = (1, 2, 4)
RESULT_SETTINGS = (throughput.STORED_STARTED, throughput.IGNORED)
PROCFILE_COUNT = 2  # default-1, default-2: the layout whose commands per task give the ceilings
BENCH_TESTS = ("set", "get", "lpush", "rpop")
PIPELINES = (1, 16)
# What proj's result backend stores for a task (STARTED: the script then writes and publishes).
RESULT_VALUE = (
    '{"status": "STARTED", "result": {"pid": 4242, "hostname": "default-1@host"}, "traceback": null, '
    '"children": [], "date_done": null, "name": "tasks.bench.noop_result", "args": [], "kwargs": {}, '
    '"worker": "default-1@host", "retries": 0, "queue": "default", '
    '"task_id": "6f1c2b8e-9d1e-4a53-8f0e-3c1f5e2a7b90"}'
)
# Results on a Redis of their own: measured with the Procfile's workers, results as shipped.
SPLIT = (PROCFILE_COUNT, throughput.STORED_STARTED)
SPLIT_SUFFIX = ", on a second Redis"
IGNORED_COMMANDS = {"info", "config|resetstat", "config", "flushall", "ping"}


def setup(workers: int, results: str, results_url: str = "") -> throughput.Config:
    """`workers` copies of the Procfile's `default-N` command line, benchmark tasks loaded.

    With `results_url`, workers and caller store results there (CELERY_RESULT_BACKEND).
    """
    base = throughput.proj(results)
    line = base.workers[0]
    return dataclasses.replace(
        base,
        label=f"{workers} x solo",
        workers=[throughput._swap(line, "-n", f"default-{i}@%h") for i in range(1, workers + 1)],
        env={"CELERY_RESULT_BACKEND": results_url} if results_url else {},
        key=scenario(workers, results, bool(results_url)),
    )


def scenario(workers: int, results: str, split: bool = False) -> str:
    """The name of one measured setup in the figures."""
    return f"{workers} x solo, {results}{SPLIT_SUFFIX if split else ''}"


def per_task(before: dict[str, int], after: dict[str, int], tasks: int) -> dict[str, float]:
    """Commands run between two `INFO commandstats` readings, per task, by command name."""
    return {
        name: (after[name] - before.get(name, 0)) / tasks
        for name in sorted(after)
        if name not in IGNORED_COMMANDS and after[name] > before.get(name, 0)
    }


def round_trips(counted: float, scripts: float, inside_script: float) -> float:
    """Commands clients sent, of `counted` (Redis counts a script's own calls as commands too)."""
    return max(0.0, counted - scripts * inside_script)


def ceiling(plain: float, scripts: float, plain_rate: float, script_rate: float) -> float:
    """Tasks/s one Redis could serve if each command a task sends cost what redis-benchmark's did.

    `plain` commands and `scripts` EVALSHA calls per task; the rates are commands per second.
    """
    seconds = plain / plain_rate + scripts / script_rate
    return 1 / seconds if seconds > 0 else float("nan")


def inside_script(client: redis.Redis) -> float:
    """Commands proj's result-write script runs inside Redis per call (GET, SET, PUBLISH)."""
    client.config_resetstat()
    client.eval(STORE_UNLESS_SUCCEEDED, 1, "bench:script-probe", RESULT_VALUE, 60)
    calls = _commands(client)
    client.delete("bench:script-probe")
    return float(sum(v for k, v in calls.items() if k not in IGNORED_COMMANDS and k != "eval"))


def _commands(client: redis.Redis) -> dict[str, int]:
    """Redis commands run since the server started or the last CONFIG RESETSTAT, by name."""
    return throughput._commands(client)


def _redis_cpu(client: redis.Redis) -> float:
    """CPU seconds (user + system) the Redis server has used."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


class DrainCheck:
    """Whether every enqueued task has run (acks late: queue, unacked set, inflight lists empty).

    Counts its own calls, so the commands it sends can be taken off the drain's.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.calls = 0

    def empty(self) -> bool:
        self.calls += 1
        return not (
            self.client.llen("default") or self.client.hlen("unacked") or InflightLists(self.client).count()
        )

    def done(self) -> bool:
        return self.empty() and self.empty()

    def footprint(self) -> dict[str, int]:
        """Commands of 20 checks of the present state (the drain's end): a check's cost x 20."""
        self.client.config_resetstat()
        for _ in range(20):
            self.empty()
        self.calls -= 20
        return _commands(self.client)


def measure(config: throughput.Config, redis_url: str, n: int, results_url: str = "") -> list[common.Row]:
    """Enqueue and drain of one setup: rates, CPU and commands per task (of each Redis)."""
    urls = {"": redis_url, **({"results ": results_url} if results_url else {})}
    for url in urls.values():
        common.flush(url)
    clients = {prefix: redis.Redis.from_url(url) for prefix, url in urls.items()}
    client = clients[""]
    app = throughput._control_app(redis_url)
    procs = throughput.start_workers(config, redis_url, "scaling")
    nodes = throughput._nodes(config)
    key = config.key
    try:
        app.control.cancel_consumer("default", destination=nodes, reply=True, timeout=5)
        for each in clients.values():
            each.config_resetstat()
        cpu0 = {prefix: _redis_cpu(each) for prefix, each in clients.items()}
        fed = throughput._caller("delay", "proj", config.task, n, redis_url, config.env)
        tasks = fed["enqueued"]
        enqueue = {prefix: per_task({}, _commands(each), tasks) for prefix, each in clients.items()}
        cpu1 = {prefix: _redis_cpu(each) for prefix, each in clients.items()}
        check = DrainCheck(client)
        for each in clients.values():
            each.config_resetstat()
        started, workers_cpu = time.perf_counter(), common.tree_cpu(p.pid for p in procs)
        app.control.add_consumer("default", destination=nodes, reply=False)
        deadline = time.monotonic() + 600
        while not check.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key}: {n:,} tasks not drained in 600 s")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        workers_cpu = common.tree_cpu(p.pid for p in procs) - workers_cpu
        cpu2 = {prefix: _redis_cpu(each) for prefix, each in clients.items()}
        drain = {prefix: per_task({}, _commands(each), tasks) for prefix, each in clients.items()}
        polled = {name: calls / 20 * check.calls / tasks for name, calls in check.footprint().items()}
        drain[""] = {name: value - polled.get(name, 0) for name, value in drain[""].items()}
        drain[""] = {name: value for name, value in drain[""].items() if value > 0}
    finally:
        throughput._kill(procs)
        for each in clients.values():
            each.close()
    rows = [
        common.row(key, "drain", tasks / elapsed, "1/s"),
        common.row(key, "delay", fed["per_second"], "1/s"),
        common.row(key, "worker cpu", workers_cpu / tasks * 1e6, "µs"),
    ]
    for prefix in clients:
        rows += [
            common.row(key, f"{prefix}redis cpu", (cpu2[prefix] - cpu0[prefix]) / tasks * 1e6, "µs"),
            common.row(key, f"{prefix}redis busy", (cpu2[prefix] - cpu1[prefix]) / elapsed * 100, "%"),
            common.row(key, f"{prefix}commands enqueue", sum(enqueue[prefix].values()), "1"),
            common.row(key, f"{prefix}commands drain", sum(drain[prefix].values()), "1"),
        ]
        rows += [common.row(key, f"{prefix}enqueue {c}", v, "1") for c, v in enqueue[prefix].items()]
        rows += [common.row(key, f"{prefix}drain {c}", v, "1") for c, v in drain[prefix].items()]
        print(
            f"    {key}: {prefix or 'broker '}Redis commands per task: enqueue {enqueue[prefix]} "
            f"drain {drain[prefix]}",
            flush=True,
        )
    print(f"    {key}: {tasks / elapsed:,.0f} tasks/s ({check.calls} drain checks taken off)", flush=True)
    return rows


# --- redis-benchmark ---------------------------------------------------------------------------


def _benchmark(redis_url: str, pipeline: int, requests: int, *command: str) -> dict[str, float]:
    """Requests per second by test, from `redis-benchmark --csv` (50 clients, random keys)."""
    parts = urlsplit(redis_url)
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            parts.hostname or "127.0.0.1",
            "-p",
            str(parts.port or 6379),
            "-n",
            str(requests),
            "-r",
            "100000",
            "-P",
            str(pipeline),
            "--csv",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    reader = csv.reader(io.StringIO(out.stdout))
    header = next(reader)  # "test","rps","avg_latency_ms",...
    # Counted from the end: a custom command's name may hold commas redis-benchmark does not quote.
    rps = len(header) - header.index("rps")
    return {line[0].lower(): float(line[-rps]) for line in reader if line}


def redis_benchmark(redis_url: str, requests: int) -> list[common.Row]:
    """Plain commands and proj's result-write script, unpipelined and pipelined."""
    client = redis.Redis.from_url(redis_url)
    sha = client.script_load(STORE_UNLESS_SUCCEEDED)
    rows = []
    for pipeline in PIPELINES:
        name = f"redis-benchmark -P {pipeline}"
        found = _benchmark(redis_url, pipeline, requests, "-t", ",".join(BENCH_TESTS))
        rows += [common.row(name, test, found[test], "1/s") for test in BENCH_TESTS]
        key = "celery-task-meta-__rand_int__"
        script = _benchmark(redis_url, pipeline, requests, "evalsha", sha, "1", key, RESULT_VALUE, "86400")
        rows.append(common.row(name, "evalsha", next(iter(script.values())), "1/s"))
        common.flush(redis_url)
    client.close()
    return rows


# --- The run and the report --------------------------------------------------------------------


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every worker count under each results setting, then redis-benchmark; all against `redis_url`."""
    n, requests = (500, 20_000) if quick else (4_000, 200_000)
    os.environ["REDIS_URL"] = redis_url
    client = redis.Redis.from_url(redis_url)
    rows = [common.row("script", "commands inside", inside_script(client), "1")]
    client.close()
    results_server = common.start_redis()
    try:
        for results in RESULT_SETTINGS:
            for workers in WORKER_COUNTS:
                rows += measure(setup(workers, results), redis_url, n)
                if workers == PROCFILE_COUNT and results == SPLIT[1]:  # next to the same on one Redis
                    split = setup(*SPLIT, results_url=results_server.url)
                    rows += measure(split, redis_url, n, results_server.url)
    finally:
        results_server.stop()
    rows += redis_benchmark(redis_url, requests)
    rows.append(common.row("load", "load1", os.getloadavg()[0], "1"))
    return rows


Summary = dict[tuple[str, str], common.Row]


def _cell(summary: Summary, scenario: str, metric: str) -> str:
    """`median (min to max)` of one figure."""
    item = summary.get((scenario, metric))
    if item is None:
        return "-"
    if item["runs"] == 1:
        return common.fmt(item["median"])
    return f"{common.fmt(item['median'])} ({common.fmt(item['min'])} to {common.fmt(item['max'])})"


def _median(summary: Summary, scenario: str, metric: str) -> float:
    item = summary.get((scenario, metric))
    return float("nan") if item is None else float(item["median"])


def _workers_table(summary: Summary) -> list[str]:
    lines = [
        "| worker processes (`default` queue) | task body | results | drain tasks/s | vs 1 process "
        "| worker CPU µs/task | Redis CPU µs/task | Redis busy in the drain |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for results in RESULT_SETTINGS:
        one = _median(summary, scenario(1, results), "drain")
        for workers in WORKER_COUNTS:
            key = scenario(workers, results)
            if (key, "drain") not in summary:
                continue
            lines.append(
                f"| {workers} x `-P solo` | empty | {results} | {_cell(summary, key, 'drain')} | "
                f"{_median(summary, key, 'drain') / one:.2f}x | {_cell(summary, key, 'worker cpu')} | "
                f"{_cell(summary, key, 'redis cpu')} | {common.fmt(_median(summary, key, 'redis busy'))} % |"
            )
    return lines


def _commands_table(summary: Summary) -> list[str]:
    """Per command, per task, in the Procfile layout, for each results setting."""
    keys = [scenario(PROCFILE_COUNT, results) for results in RESULT_SETTINGS]
    names = sorted(
        {
            metric.split(" ", 1)[1]
            for (key, metric) in summary
            if key in keys and metric.startswith(("enqueue ", "drain "))
        }
    )
    head = " | ".join(f"{phase}, {results}" for results in RESULT_SETTINGS for phase in ("enqueue", "drain"))
    lines = [f"| command | {head} |", "|---|" + "---:|" * (2 * len(keys))]
    totals: list[str] = []
    for key in keys:
        totals += [
            f"**{common.fmt(_median(summary, key, 'commands enqueue'))}**",
            f"**{common.fmt(_median(summary, key, 'commands drain'))}**",
        ]
    for name in names:
        cells = []
        for key in keys:
            for phase in ("enqueue", "drain"):
                value = _median(summary, key, f"{phase} {name}")
                cells.append("" if value != value or value < 0.005 else f"{value:.2f}")
        if any(cells):
            lines.append(f"| `{name.upper()}` | {' | '.join(cells)} |")
    lines.append(f"| **all** | {' | '.join(totals)} |")
    return lines


def _benchmark_table(summary: Summary) -> list[str]:
    tests = [*BENCH_TESTS, "evalsha"]
    lines = [
        "| redis-benchmark, 50 clients | " + " | ".join(f"`{t.upper()}`" for t in tests) + " |",
        "|---|" + "---:|" * len(tests),
    ]
    for pipeline in PIPELINES:
        name = f"redis-benchmark -P {pipeline}"
        cells = [_cell(summary, name, test) for test in tests]
        lines.append(f"| `-P {pipeline}` (commands/s) | {' | '.join(cells)} |")
    return lines


def _ceiling_table(summary: Summary) -> list[str]:
    """Tasks per second one Redis could take: benchmark rates over the commands a task sends; Redis CPU."""
    lines = [
        "| results | commands per task (Redis's count) | sent by clients (of them `EVALSHA`) "
        "| from `-P 1` rates | from `-P 16` rates | from Redis CPU per task "
        f"| measured drain, {PROCFILE_COUNT} solo workers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    inside = _median(summary, "script", "commands inside")
    rates = {}
    for pipeline in PIPELINES:
        name = f"redis-benchmark -P {pipeline}"
        plain_rates = [_median(summary, name, test) for test in BENCH_TESTS]
        rates[pipeline] = (plain_rates, _median(summary, name, "evalsha"))
    for results in RESULT_SETTINGS:
        key = scenario(PROCFILE_COUNT, results)
        counted = _median(summary, key, "commands enqueue") + _median(summary, key, "commands drain")
        scripts = sum(
            summary[(key, f"{phase} evalsha")]["median"]
            for phase in ("enqueue", "drain")
            if (key, f"{phase} evalsha") in summary
        )
        sent = round_trips(counted, scripts, inside)
        plain = sent - scripts
        spans = []
        for pipeline in PIPELINES:
            plain_rates, script_rate = rates[pipeline]
            low = ceiling(plain, scripts, min(plain_rates), script_rate)
            high = ceiling(plain, scripts, max(plain_rates), script_rate)
            spans.append(f"{common.fmt(low)} to {common.fmt(high)}")
        lines.append(
            f"| {results} | {counted:.1f} | {sent:.1f} ({scripts:.1f}) | {spans[0]} | {spans[1]} | "
            f"{common.fmt(1e6 / _median(summary, key, 'redis cpu'))} | "
            f"{common.fmt(_median(summary, key, 'drain'))} |"
        )
    return lines


def _redis_cells(summary: Summary, key: str, prefix: str) -> list[str]:
    """Commands per task (Redis's count), CPU per task and the ceiling that CPU gives, of one Redis."""
    counted = sum(_median(summary, key, f"{prefix}commands {phase}") for phase in ("enqueue", "drain"))
    cpu = _median(summary, key, f"{prefix}redis cpu")
    return [f"{counted:.1f}", _cell(summary, key, f"{prefix}redis cpu"), common.fmt(1e6 / cpu)]


def _split_table(summary: Summary) -> list[str]:
    """The Procfile's workers, results as shipped: one Redis, and results on a second one."""
    lines = [
        f"| {SPLIT[0]} x `-P solo`, empty task, {SPLIT[1]} | drain tasks/s | broker Redis: commands "
        "per task (Redis's count) | broker Redis CPU µs/task | its ceiling from CPU, tasks/s "
        "| results Redis: commands per task | results Redis CPU µs/task |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, words in ((False, "one Redis for both"), (True, "results on a second Redis")):
        key = scenario(*SPLIT, split=split)
        if (key, "drain") not in summary:
            continue
        cells = [_cell(summary, key, "drain"), *_redis_cells(summary, key, "")]
        cells += [*_redis_cells(summary, key, "results ")][:2] if split else ["-", "-"]
        lines.append(f"| {words} | {' | '.join(cells)} |")
    return lines


def render_summary(items: Sequence[common.Row]) -> str:
    """The tables of docs/scaling.md."""
    summary = {(item["scenario"], item["metric"]): item for item in items}
    runs = max((item["runs"] for item in items), default=0)
    return "\n".join(
        [
            f"Median (min to max) of {runs} run(s); the task body is an empty function in every row, "
            "and each row says what is stored about it.",
            "",
            *_workers_table(summary),
            "",
            f"Redis commands per task, {PROCFILE_COUNT} solo workers (medians):",
            "",
            *_commands_table(summary),
            "",
            *_benchmark_table(summary),
            "",
            "Results on a Redis of their own (`CELERY_RESULT_BACKEND`), measured next to each other:",
            "",
            *_split_table(summary),
            "",
            "Ceiling of one Redis, tasks/s:",
            "",
            *_ceiling_table(summary),
            "",
            f"Load average (1 min) at the end of the runs: {_cell(summary, 'load', 'load1')}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.scaling [--quick] [--runs N]`: the tables, the date and the machine."""
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help=f"runs (default {RUNS}, quick 1)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else RUNS)
    server = common.start_redis()
    common.point_env_at(server.url)
    machine = common.machine()
    started = time.monotonic()
    try:
        versions = common.versions(server.url)
        results = []
        for index in range(runs):
            common.flush(server.url)
            results.append(run(server.url, quick=args.quick))
            print(f"  run {index + 1}/{runs} done", flush=True)
    finally:
        server.stop()
    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"Measured by `python -m bench.scaling{' --quick' if args.quick else ''}` on {date} "
        f"in {(time.monotonic() - started) / 60:.1f} min.",
        "",
        "- " + ", ".join(f"{k}: {v}" for k, v in machine.items()),
        "- " + ", ".join(f"{k} {v}" for k, v in versions.items() if v != "not installed"),
        "",
        render_summary(common.summarize(results)),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
