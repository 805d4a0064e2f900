"""Like for like: stock Celery, proj as shipped, proj without its Celery/kombu layer, and huey.

Every setup runs the same task body (an empty function), with its result stored or ignored as the
row says, against the same private Redis, in the same run; ratios are taken inside a run between
setups that differ only in what the comparison names. Each setup in turn:

1. its workers start and answer (Celery: a ping; huey: four warm-up tasks run);
2. they are held off the queue (Celery: `cancel_consumer`; huey: the caller enqueues into a
   side list) while one caller process `.delay()`s N tasks in a loop: the `.delay()` rate;
3. the clock starts when the workers may consume those N + 1 tasks (Celery: `add_consumer`; huey:
   the side list is renamed onto its queue) and stops when every one has run: the drain rate, and
   the workers' CPU (user + system of their process trees) over the same window;
4. with results stored, one caller process runs `.delay().get()` one at a time against the idle
   workers: the round trip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench import common
from proj.stores.inflight import InflightLists

# Worker options every proj worker runs with (README, Procfile): no start-up cluster chatter.
PROJ_FLAGS = ("--without-mingle", "--without-gossip")
BENCH_TASKS = "bench._projtasks"
LOGS = Path(tempfile.gettempdir()) / "proj-bench"
PROCFILE = common.ROOT / "Procfile"
HUEY_QUEUE, HUEY_SIDE, HUEY_RESULTS = "huey.redis.bench", "bench.huey.side", "huey.results.bench"

# What is stored about each task: the three result settings.
STORED_STARTED = "results stored + STARTED"
STORED = "results stored, no STARTED"
IGNORED = "results ignored"
REPLACEMENTS = {
    "transport": "Redis transport (`kombu_transport.py` + `unawaited.py`)",
    "backend": "result backend (`result_backend.py`)",
    "events": "batched task events (`task_events.py`)",
}


@dataclass
class Config:
    """How a set of worker processes is started, fed and watched."""

    label: str
    app: str  # "proj", "stock" (bench._stock) or "huey" (bench._huey)
    workers: list[list[str]]  # arguments after `celery -A <app> worker`, or of huey's consumer
    queue: str = "default"
    acks_late: bool = True
    task: str = "noop"  # the task the caller enqueues for the drain
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""  # short name of the setup in the figures
    results: str = IGNORED
    layout: str = ""
    rt_task: str = ""  # the task of the round trip ("" when results are ignored)

    def commands(self) -> list[list[str]]:
        """Full command lines."""
        if self.app == "huey":
            return [[sys.executable, "-m", "huey.bin.huey_consumer", *args] for args in self.workers]
        module = "bench._stock" if self.app == "stock" else "proj"
        return [common.celery_worker(module, *args) for args in self.workers]


# --- The setups ------------------------------------------------------------------------------


def procfile_workers() -> dict[str, list[str]]:
    """The `celery worker` arguments of each Procfile entry: the production configuration."""
    workers = {}
    for line in PROCFILE.read_text().splitlines():
        name, _, command = line.partition(":")
        words = shlex.split(command.replace('"$FILES_CONCURRENCY"', str(os.cpu_count() or 1)))
        if line.startswith("#") or words[:4] != ["exec", "celery", "-A", "proj"] or words[4] != "worker":
            continue
        workers[name.strip()] = words[5:]
    return workers


def _default_workers() -> list[list[str]]:
    """The Procfile's workers of the short-task queue `default`, as written there."""
    return [
        args for args in procfile_workers().values() if "default" in args[args.index("-Q") + 1].split(",")
    ]


def production_config() -> Config:
    """Every Procfile worker that consumes `default` (the short-task queue), benchmark tasks loaded."""
    return Config(
        "proj Procfile short-task workers", "proj", [[*a, "-I", BENCH_TASKS] for a in _default_workers()]
    )


def _swap(args: list[str], option: str, value: str) -> list[str]:
    """`args` with the value of `option` replaced."""
    changed = list(args)
    changed[changed.index(option) + 1] = value
    return changed


def _layout() -> str:
    """The Procfile's short-task layout in words, e.g. `2 x -P solo`."""
    workers = _default_workers()
    pools = {args[args.index("-P") + 1] for args in workers}
    return f"{len(workers)} x `-P {'/'.join(sorted(pools))}` (Procfile)"


def stock(results: str) -> Config:
    """Stock Celery: `celery -A app worker`, every default (prefork, one child per core)."""
    stored = results != IGNORED
    return Config(
        "stock Celery defaults",
        "stock",
        [["-n", "stock@%h", "-l", "WARNING"]],
        queue="celery",
        acks_late=False,
        task="noop" if stored else "noop_ignored",
        key=f"stock {results}",
        results=results,
        layout=f"1 x `-P prefork -c {os.cpu_count()}` (default)",
        rt_task="noop" if stored else "",
    )


def stock_procfile_layout(results: str) -> Config:
    """Stock Celery's app and settings in the Procfile's short-task layout (the layout alone)."""
    stored = results != IGNORED
    workers = [
        _swap(_swap(args, "-Q", "celery"), "-n", f"stock-{i}@%h")
        for i, args in enumerate(_default_workers(), 1)
    ]
    return Config(
        "stock Celery, Procfile layout",
        "stock",
        workers,
        queue="celery",
        acks_late=False,
        task="noop" if stored else "noop_ignored",
        key=f"stock-solo {results}",
        results=results,
        layout=_layout(),
        rt_task="noop" if stored else "",
    )


PROJ_TASKS = {STORED_STARTED: "noop_result", STORED: "echo", IGNORED: "noop"}


def proj(results: str, without: tuple[str, ...] = (), stock_celery: bool = False) -> Config:
    """proj's workers as the Procfile starts them; optionally with its layer off, or parts of it."""
    from bench import _without

    workers = production_config().workers
    env: dict[str, str] = {}
    label, key = "proj as shipped", "proj"
    if stock_celery:
        env["PROJ_STOCK_CELERY"] = "1"
        label, key = "proj, PROJ_STOCK_CELERY=1", "proj-stock-celery"
    if without:
        workers = [_swap(args, "-I", f"{BENCH_TASKS},bench._without") for args in workers]
        env.update(_without.env(without, os.environ.get("REDIS_URL", "")))
        label, key = f"proj without {', '.join(without)}", f"proj-without-{'-'.join(without)}"
    return Config(
        label,
        "proj",
        workers,
        task=PROJ_TASKS[results],
        env=env,
        key=f"{key} {results}",
        results=results,
        layout=_layout(),
        rt_task=PROJ_TASKS[results] if results != IGNORED else "",
    )


def huey(results: str) -> Config:
    """huey's consumer with as many worker processes as the Procfile has short-task workers."""
    processes = str(len(_default_workers()))
    stored = results != IGNORED
    return Config(
        "huey",
        "huey",
        [["bench._huey.huey", "-w", processes, "-k", "process", "-q"]],
        queue=HUEY_QUEUE,
        acks_late=False,
        env={"BENCH_HUEY_RESULTS": "1" if stored else "0"},
        key=f"huey {results}",
        results=results,
        layout=f"1 consumer, `-w {processes} -k process`",
        rt_task="noop" if stored else "",
    )


def setups() -> list[Config]:
    """Every setup of one run, in the order measured: compared setups next to each other."""
    return [
        proj(STORED_STARTED),
        *(proj(STORED_STARTED, without=(name,)) for name in REPLACEMENTS),
        _again(proj(STORED_STARTED)),
        proj(STORED_STARTED, stock_celery=True),
        proj(STORED),
        stock(STORED),
        huey(STORED),
        proj(IGNORED),
        proj(IGNORED, stock_celery=True),
        stock(IGNORED),
        stock_procfile_layout(IGNORED),
        huey(IGNORED),
    ]


AGAIN = " (again)"


def _again(config: Config) -> Config:
    """`config` measured a second time in the same run; its figures are averaged with the first's."""
    config.key += AGAIN
    return config


# --- Workers ---------------------------------------------------------------------------------


def _nodes(config: Config) -> list[str]:
    """The node names of the Celery workers of `config` (each command line carries `-n name@%h`)."""
    return [args[args.index("-n") + 1].replace("%h", socket.gethostname()) for args in config.workers]


def _control_app(redis_url: str) -> Any:
    """A bare app for remote control (ping, add/cancel consumer) of any worker on `redis_url`."""
    from celery import Celery

    return Celery("bench-control", broker=redis_url)


def start_workers(config: Config, redis_url: str, tag: str) -> list[subprocess.Popen[bytes]]:
    """Start the workers of `config` and wait until every one answers (Celery) or has run tasks (huey)."""
    env = common.child_env(redis_url, **config.env)
    procs = [
        common.spawn(cmd, env, LOGS / f"{tag}-{config.key or config.label}-{i}.log".replace(" ", "_"))
        for i, cmd in enumerate(config.commands())
    ]
    try:
        if config.app == "huey":
            _huey_ready(redis_url)
        else:
            common.ping_until_ready(_control_app(redis_url), _nodes(config))
    except BaseException:
        common.stop(procs)
        raise
    return procs


def _huey_ready(redis_url: str) -> None:
    """Enqueue four warm-up tasks and wait until huey's workers have taken them all."""
    client = redis.Redis.from_url(redis_url)
    try:
        _caller("delay", "huey", "noop", 3, redis_url, {})
        common.wait_for(lambda: client.llen(HUEY_QUEUE) == 0, timeout=60, interval=0.05, what="huey workers")
        time.sleep(0.5)  # the last warm-up tasks finish
        client.delete(HUEY_RESULTS, *client.keys("huey.notify.*"))
    finally:
        client.close()


def _caller(mode: str, app: str, task: str, n: int, redis_url: str, env: dict[str, str]) -> dict[str, Any]:
    """Run bench._producer in a fresh process and return its figures."""
    out = subprocess.run(
        [sys.executable, "-m", "bench._producer", mode, app, task, str(n)],
        cwd=common.ROOT,
        env=common.child_env(redis_url, **env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"bench._producer {mode} {app} {task} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- One setup: .delay(), drain, round trip --------------------------------------------------


def _idle(app: Any, nodes: list[str]) -> bool:
    """No task is running or waiting in any of the Celery workers `nodes` (remote control)."""
    inspect = app.control.inspect(destination=nodes, timeout=2, limit=len(nodes))
    for reply in (inspect.active() or {}, inspect.reserved() or {}):
        if set(reply) < set(nodes) or any(reply.values()):
            return False
    return True


def _drain_check(
    config: Config, client: redis.Redis, app: Any, enqueued: int, tail: list[str]
) -> Callable[[], bool]:
    """A test of whether every enqueued task has run.

    acks late (proj): the queue, the unacked set and the inflight lists are empty, since a message
    is acked after its task ran (and stored its result). huey: every result is stored; results
    ignored, the queue is empty (at most one task per worker process may still be running). Stock
    Celery acks early: the last 64 results are stored; results ignored, its workers report no active
    and no reserved task.
    """
    if config.app == "huey":
        if config.results == IGNORED:
            return lambda: client.llen(HUEY_QUEUE) == 0
        return lambda: client.hlen(HUEY_RESULTS) >= enqueued

    def broker_empty() -> bool:
        return not (client.llen(config.queue) or client.hlen("unacked") or InflightLists(client).count())

    if config.acks_late:
        return lambda: broker_empty() and broker_empty()
    if config.results != IGNORED:
        keys = [f"celery-task-meta-{task_id}" for task_id in tail]
        return lambda: broker_empty() and client.exists(*keys) == len(keys)
    return lambda: broker_empty() and _idle(app, _nodes(config))


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the workers of a measured setup at once, by PID: SIGKILL to each process tree.

    Nothing is measured after this and Redis is emptied before the next setup, so a warm
    shutdown (1-2 s per setup, 17 setups per run) would only cost time.
    """
    for proc in procs:
        for member in common._tree(proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    for proc in procs:
        proc.wait(10)


def _commands(client: redis.Redis) -> dict[str, int]:
    """Redis commands run since the last CONFIG RESETSTAT, by name."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def measure(config: Config, redis_url: str, n: int, rt_n: int) -> dict[str, float]:
    """`.delay()` rate, drain and (results stored) round trip of one setup; its figures."""
    common.flush(redis_url)
    client = redis.Redis.from_url(redis_url)
    app = _control_app(redis_url)
    marks = [time.monotonic()]
    procs = start_workers(config, redis_url, "throughput")
    pids = [p.pid for p in procs]
    figures: dict[str, float] = {}
    marks.append(time.monotonic())
    try:
        env = dict(config.env)
        if config.app == "huey":
            env["BENCH_HUEY_QUEUE_KEY"] = HUEY_SIDE
        else:
            app.control.cancel_consumer(config.queue, destination=_nodes(config), reply=True, timeout=5)
        fed = _caller("delay", config.app, config.task, n, redis_url, env)
        figures["delay"] = fed["per_second"]
        marks.append(time.monotonic())
        done = _drain_check(config, client, app, fed["enqueued"], fed["tail"])
        client.config_resetstat()
        started, cpu0 = time.perf_counter(), common.tree_cpu(pids)
        if config.app == "huey":
            client.rename(HUEY_SIDE, HUEY_QUEUE)
        else:
            app.control.add_consumer(config.queue, destination=_nodes(config), reply=False)
        common.wait_for(done, timeout=600, interval=0.01, what=f"{config.key} to drain {n:,} tasks")
        elapsed, cpu = time.perf_counter() - started, common.tree_cpu(pids) - cpu0
        calls = _commands(client)
        marks.append(time.monotonic())
        figures.update(
            drain=fed["enqueued"] / elapsed,
            cpu_us=cpu / fed["enqueued"] * 1e6,
            rss=common.tree_rss(pids)["total"],
        )
        per_task = {
            k: round(v / fed["enqueued"], 2) for k, v in sorted(calls.items()) if v >= fed["enqueued"] / 50
        }
        print(f"    {config.key}: Redis commands per task during the drain {per_task}", flush=True)
        if config.rt_task:
            figures.update(_caller("roundtrip", config.app, config.rt_task, rt_n, redis_url, config.env))
        marks.append(time.monotonic())
    finally:
        _kill(procs)
        client.close()
    marks.append(time.monotonic())
    steps = " ".join(f"{b - a:.1f}" for a, b in itertools.pairwise(marks))
    print(f"    {config.key}: seconds for start, .delay(), drain, round trip, stop: {steps}", flush=True)
    return figures


# --- Extra context: the Redis floor, proj's bulk helper --------------------------------------


def broker_floor(redis_url: str, n: int) -> dict[str, float]:
    """LPUSH+BRPOP pairs per second from one redis-py connection: no task queue at all."""
    client = redis.Redis.from_url(redis_url)
    payload = b'{"task": "noop"}' * 8
    started = time.perf_counter()
    for _ in range(n):
        client.lpush("bench.floor", payload)
        client.brpop(["bench.floor"], timeout=1)
    elapsed = time.perf_counter() - started
    client.close()
    return {"pairs": n / elapsed}


# --- The run ---------------------------------------------------------------------------------


SAME_LAYOUT = "same layout"


@dataclass
class Comparison:
    """Two setups with the same task body and results setting; the first divided by the second."""

    name: str
    first: str  # setup keys
    second: str
    differs: str  # what is not the same between them


def comparisons() -> list[Comparison]:
    """Every comparison the report quotes, each between setups of the same results setting."""
    layer = "only proj's three replacements (same layout, settings, tasks): the layer's worth"
    everything = "all of proj: its settings (acks late, events, ...), its layout, its layer"
    peer = "the framework (huey: no acks, no events), same processes per core"
    return [
        Comparison(f"(b) / (c), {STORED_STARTED}", proj(STORED_STARTED).key, _c(STORED_STARTED), layer),
        Comparison(f"(b) / (a), {STORED}", proj(STORED).key, stock(STORED).key, everything),
        Comparison(f"(e) / (b), {STORED}", huey(STORED).key, proj(STORED).key, peer),
        Comparison(
            f"(e) / (a), {STORED}", huey(STORED).key, stock(STORED).key, "the framework and the layout"
        ),
        Comparison(f"(b) / (c), {IGNORED}", proj(IGNORED).key, _c(IGNORED), layer),
        Comparison(f"(b) / (a), {IGNORED}", proj(IGNORED).key, stock(IGNORED).key, everything),
        Comparison(
            f"(a') / (a), {IGNORED}",
            stock_procfile_layout(IGNORED).key,
            stock(IGNORED).key,
            "only the worker layout (same app, same settings)",
        ),
        Comparison(
            f"(b) / (a'), {IGNORED}",
            proj(IGNORED).key,
            stock_procfile_layout(IGNORED).key,
            "proj's settings and layer (same layout)",
        ),
        Comparison(
            f"(c) / (a'), {IGNORED}",
            _c(IGNORED),
            stock_procfile_layout(IGNORED).key,
            "proj's settings without its layer (same layout): what they cost",
        ),
        Comparison(f"(e) / (b), {IGNORED}", huey(IGNORED).key, proj(IGNORED).key, peer),
        Comparison(
            f"(e) / (a), {IGNORED}", huey(IGNORED).key, stock(IGNORED).key, "the framework and the layout"
        ),
    ]


def _c(results: str) -> str:
    """The key of (c), proj with PROJ_STOCK_CELERY=1."""
    return proj(results, stock_celery=True).key


def _ratio_rows(figures: dict[str, dict[str, float]]) -> list[common.Row]:
    """The ratios of every comparison, inside this run."""
    rows = []
    for item in comparisons():
        if item.first not in figures or item.second not in figures:
            continue
        x, y = figures[item.first], figures[item.second]
        rows += [
            common.ratio(item.name, "drain", x["drain"], y["drain"]),
            common.ratio(item.name, "delay", x["delay"], y["delay"]),
            common.ratio(item.name, "cpu", x["cpu_us"], y["cpu_us"]),
        ]
        if "p50" in x and "p50" in y:
            rows += [
                common.ratio(item.name, "p50", x["p50"], y["p50"]),
                common.ratio(item.name, "p99", x["p99"], y["p99"]),
            ]
    return rows


FIRST = " (first)"


def _ablations() -> list[tuple[str, str, str, str]]:
    """(gain scenario, all-on key, turned-off key, words): each replacement off alone, all three, none.

    The last row compares the two measurements of the same all-on setup in a run (the first against
    the second): what the gains of identical setups look like, the noise floor of the others.
    """
    on = proj(STORED_STARTED).key
    found = [
        (f"gain {name}", on, proj(STORED_STARTED, without=(name,)).key, words)
        for name, words in REPLACEMENTS.items()
    ]
    found += [
        (
            "gain all three",
            on,
            proj(STORED_STARTED, stock_celery=True).key,
            "all three (`PROJ_STOCK_CELERY=1`, (c))",
        ),
        ("gain nothing", on + FIRST, on + AGAIN, "none: all on, first measurement / second (noise floor)"),
    ]
    return found


def _gain_rows(figures: dict[str, dict[str, float]]) -> list[common.Row]:
    """How much more each replacement gets done than the same setup without it (%, inside this run).

    Drain and `.delay()`: rate with / rate without - 1. Round trip and CPU: without / with - 1, the
    same sense (how much longer a round trip, how much more CPU, without it).
    """
    rows: list[common.Row] = []
    for scenario, on_key, off_key, _ in _ablations():
        on, off = figures.get(on_key), figures.get(off_key)
        if on is None or off is None:
            continue
        rows += [
            common.row(scenario, "drain", (on["drain"] / off["drain"] - 1) * 100, "%"),
            common.row(scenario, "p50", (off["p50"] / on["p50"] - 1) * 100, "%"),
            common.row(scenario, "p99", (off["p99"] / on["p99"] - 1) * 100, "%"),
            common.row(scenario, "delay", (on["delay"] / off["delay"] - 1) * 100, "%"),
            common.row(scenario, "cpu", (off["cpu_us"] / on["cpu_us"] - 1) * 100, "%"),
        ]
    return rows


def run(redis_url: str, quick: bool = False) -> list[common.Row]:
    """Every setup once, then the ratios and gains between them (all inside this run)."""
    n, rt_n = (1_000, 100) if quick else (2_000, 500)
    os.environ["REDIS_URL"] = redis_url
    rows = [common.row("floor", "pairs", broker_floor(redis_url, n)["pairs"], "1/s")]
    common.flush(redis_url)
    bulk = _caller("bulk", "proj", "noop", n * 2, redis_url, {})["per_second"]
    rows.append(common.row("bulk", "enqueue_many", bulk, "1/s"))
    figures: dict[str, dict[str, float]] = {}
    only = os.environ.get("BENCH_ONLY", "")  # development: the setups whose key contains this
    for config in setups():
        if only and only not in config.key:
            continue
        started = time.monotonic()
        measured = measure(config, redis_url, n, rt_n)
        print(f"    {config.key}: {measured} ({time.monotonic() - started:.1f} s)", flush=True)
        figures[config.key] = measured
        base = config.key.removesuffix(AGAIN)
        if config.key.endswith(AGAIN) and base in figures:
            first = figures[base + FIRST] = figures[base]
            figures[base] = {k: (v + measured[k]) / 2 for k, v in first.items()}
    units = {"delay": "1/s", "drain": "1/s", "cpu_us": "µs", "rss": "MiB", "p50": "µs", "p99": "µs"}
    for key, measured in figures.items():
        rows += [common.row(key, metric, value, units[metric]) for metric, value in measured.items()]
    if proj(IGNORED).key in figures:
        rows.append(
            common.ratio("bulk", "enqueue_many / .delay()", bulk, figures[proj(IGNORED).key]["delay"])
        )
    return [*rows, *_ratio_rows(figures), *_gain_rows(figures)]


# --- The report ------------------------------------------------------------------------------

Summary = dict[tuple[str, str], common.Row]


def _cell(summary: Summary, scenario: str, metric: str, unit: str = "") -> str:
    """`median (min-max)` of one figure, or a dash where there is none."""
    item = summary.get((scenario, metric))
    if item is None:
        return "-"
    if item["runs"] == 1:
        return f"{common.fmt(item['median'])}{unit}"
    return f"{common.fmt(item['median'])}{unit} ({common.fmt(item['min'])} to {common.fmt(item['max'])})"


def _median(summary: Summary, scenario: str, metric: str) -> str:
    """The median of one figure alone."""
    item = summary.get((scenario, metric))
    return "-" if item is None else common.fmt(item["median"])


def _setup_rows() -> list[tuple[Config, str]]:
    """Each setup of the main table with the words of its first column."""
    named = [(proj(r), "(b) proj as shipped") for r in (STORED_STARTED, STORED, IGNORED)]
    named += [
        (proj(r, stock_celery=True), "(c) proj, `PROJ_STOCK_CELERY=1`")
        for r in (STORED_STARTED, STORED, IGNORED)
    ]
    named += [(stock(r), "(a) stock Celery defaults") for r in (STORED, IGNORED)]
    named += [(stock_procfile_layout(r), "(a') stock Celery, Procfile layout") for r in (STORED, IGNORED)]
    named += [(huey(r), "(e) huey") for r in (STORED, IGNORED)]
    return named


def _main_table(summary: Summary) -> list[str]:
    """One row per setup and results setting."""
    lines = [
        "| setup | worker layout | task body | results | drain tasks/s | worker CPU µs/task "
        "| `.delay()`/s | round trip p50 µs | p99 µs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for config, name in _setup_rows():
        key = config.key
        if (key, "drain") in summary:
            lines.append(
                f"| {name} | {config.layout} | empty | {config.results} | {_cell(summary, key, 'drain')} | "
                f"{_cell(summary, key, 'cpu_us')} | {_cell(summary, key, 'delay')} | "
                f"{_cell(summary, key, 'p50')} | {_cell(summary, key, 'p99')} |"
            )
    return lines


def _ratio_table(summary: Summary) -> list[str]:
    """One row per comparison."""
    lines = [
        "| comparison (same task body, same results setting) | what differs | drain | `.delay()` "
        "| worker CPU per task | round trip p50 | p99 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for item in comparisons():
        name = item.name
        if (name, "drain") in summary:
            lines.append(
                f"| {name} | {item.differs} | {_cell(summary, name, 'drain', 'x')} | "
                f"{_cell(summary, name, 'delay', 'x')} | {_cell(summary, name, 'cpu', 'x')} | "
                f"{_cell(summary, name, 'p50', 'x')} | {_cell(summary, name, 'p99', 'x')} |"
            )
    return lines


def _gain_table(summary: Summary) -> list[str]:
    """One row per replacement turned off."""
    lines = [
        "| turned off | drain tasks/s all on / without | drain gain | round trip p50 µs all on / without "
        "| round trip p50 gain | p99 gain | `.delay()` gain | worker CPU gain |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for gain, on, key, words in _ablations():
        if (gain, "drain") in summary:
            drain = f"{_median(summary, on, 'drain')} / {_median(summary, key, 'drain')}"
            p50 = f"{_median(summary, on, 'p50')} / {_median(summary, key, 'p50')}"
            lines.append(
                f"| {words} | {drain} | {_cell(summary, gain, 'drain', ' %')} | {p50} | "
                f"{_cell(summary, gain, 'p50', ' %')} | {_cell(summary, gain, 'p99', ' %')} | "
                f"{_cell(summary, gain, 'delay', ' %')} | {_cell(summary, gain, 'cpu', ' %')} |"
            )
    return lines


def render_summary(items: Sequence[common.Row]) -> str:
    """The topic's tables: setups, like-for-like ratios, and the worth of each replacement."""
    summary = {(item["scenario"], item["metric"]): item for item in items}
    runs = max((item["runs"] for item in items), default=0)
    return "\n".join(
        [
            "### Like for like",
            "",
            f"Median (min to max) of {runs} run(s). Task body: an empty function in every row. Drain: "
            "the tasks of the `.delay()` loop run by the workers held off until then; worker CPU: their "
            "process trees over the drain, per task. Round trip: `.delay().get()` one at a time (huey: "
            "`task()(blocking=True)`), only where results are stored. Setups in the notes below.",
            "",
            *_main_table(summary),
            "",
            "### Ratios, like for like",
            "",
            "Each taken inside one run between two rows above with the same task body and "
            "the same results setting; median (min to max) over the runs. Drain and `.delay()`: above 1 "
            "the first is faster. Worker CPU and round trip: below 1 the first is cheaper or faster.",
            "",
            *_ratio_table(summary),
            "",
            "### What each replacement is worth",
            "",
            f"On the shipped settings ({STORED_STARTED}, the Procfile layout): proj as shipped "
            "(b) with one of its three replacements turned off, against all on, in the same run (the "
            "bench-only `bench/_without.py`); all on is measured before and after the three, and "
            "averaged. Gain: drain and `.delay()` rate all on / without - 1; round trip and worker CPU "
            "without / all on - 1 (how much longer, how much more CPU without it). Median (min to max) of "
            "the gains of the runs; the rates and round trips shown are medians. The last row compares the "
            "two measurements of all on with each other: gains of that size are noise.",
            "",
            *_gain_table(summary),
            "",
            f"Context: redis-py LPUSH + BRPOP pairs on one connection, no task queue at all: "
            f"{_cell(summary, 'floor', 'pairs')} per second. proj's bulk helper `enqueue_many()`, results "
            f"ignored: {_cell(summary, 'bulk', 'enqueue_many')} per second, "
            f"{_cell(summary, 'bulk', 'enqueue_many / .delay()', 'x')} proj's `.delay()` (results ignored).",
        ]
    )


NOTES = """\
- Task body: `def noop(): pass` in every setup (`bench/_stock.py`, `bench/_projtasks.py`,
  `bench/_huey.py`). Results: `results stored + STARTED` is proj's configuration as shipped
  (`task_track_started = True`); `results stored, no STARTED` is Celery's default (proj's task:
  `track_started=False`); `results ignored` is `ignore_result=True` (huey: `results=False`), which
  stores no STARTED either.
- (a) stock Celery defaults: `Celery("stock", broker=url, backend=url)`, run by
  `celery -A bench._stock worker -n stock@%h -l WARNING`: prefork with one child per core,
  prefetch multiplier 4, acks early, no task events, mingle/gossip/heartbeat on.
- (a') the same app and settings in the Procfile's short-task layout: the Procfile's `default-N`
  command lines with `-Q celery` (the stock app's queue): `-P solo`, `--without-mingle
  --without-gossip`, `-l WARNING`. It separates what the layout gives from what proj gives.
- (b) proj as shipped: the Procfile's `default-N` lines as they are (`-P solo`, one per core,
  `-l WARNING`), `celeryconfig.py` as shipped (acks late, task events and `task-sent` events on,
  JSON, proj's transport with BLMOVE into inflight lists, result backend, batched
  events), plus `-I bench._projtasks`.
- (c) the same workers, settings and tasks with `PROJ_STOCK_CELERY=1`: kombu's Redis transport,
  Celery's Redis result backend and event dispatch; every proj feature stays. (b) / (c)
  is the worth of the layer alone.
- (e) huey 3 (`bench/_huey.py`): `RedisHuey` on the same Redis, its consumer with
  `-w <processes> -k process -q` (as many worker processes as the Procfile has short-task workers,
  WARNING logging). Results stored: every return value kept (`store_none=True`) and the caller
  woken by BLPOP (`notify_result=True`; huey's default polls from 50 ms). huey pops a message
  before running it (no acks: a task running in a killed worker is lost), and sends no events.
- Drain end: proj (acks late): queue, unacked set and inflight lists empty; stock Celery (acks
  early): the last 64 results stored, or with results ignored, the workers report no active and no
  reserved task; huey: every result stored, or with results ignored the queue empty (then at most
  one task per worker process is still running, < 0.1 % of the tasks).
- Per-replacement rows: `PROJ_BENCH_WITHOUT=<name>` in the environment of workers (`-I
  bench._without`) and caller alike; `backend` also points `CELERY_RESULT_BACKEND` at
  `celery.backends.redis:RedisBackend+redis://...`. Bench-only: the user-facing switch is
  `PROJ_STOCK_CELERY`, which turns all three off (last row). (b) with results stored + STARTED is
  measured twice per run, before and after the three, and its figures are the mean of the two.
- Sizes: 2,000 tasks per `.delay()` loop and drain, 500 round trips after 20 warm-up ones (quick
  mode: 1,000 and 100): 3 runs of the 15 setups take 8-9 minutes on a 2-core VM. Every setup
  starts from an emptied Redis with fresh workers, which are killed (SIGKILL, by PID) once
  measured. The log of a run prints the Redis commands per task of each drain (`INFO
  commandstats`): it shows each replacement really off (e.g. BRPOP + ZADD/HSET instead of BLMOVE;
  MULTI/SETEX instead of EVALSHA; one PUBLISH per event instead of batches).
"""


if __name__ == "__main__":
    common.standalone("throughput", run, render_summary)
