"""One producer process: `python -m bench._producer {delay|bulk|roundtrip} APP N`, JSON out.

APP is `stock`, `proj`, or an ablation of proj: `proj-kombu` (kombu's own Redis transport),
`proj-started` (round trip of a task that tracks STARTED), `proj-redispy-subscribe` (result
subscriptions through redis-py's pub/sub command path), `proj-kombu-declare` (kombu's own
queue re-declaration on every publish), `proj-bulk-whole` (`enqueue_many` without
copying messages: every signature through `apply_async`).

Each measurement runs in a fresh process so that result subscriptions and connection pools left
behind by one scenario cannot slow down the next.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.common import percentile


def _task(app_name: str, kind: str) -> Any:
    """The benchmark task of `app_name`: fire-and-forget `noop` or waited-for `echo`."""
    if app_name == "stock":
        from bench import _stock

        return _stock.noop
    from bench import _projtasks

    if app_name == "proj-kombu":  # ablation: kombu's own Redis transport
        _projtasks.app.conf.broker_transport = None
    if app_name == "proj-started":  # ablation: the STARTED state tracked, proj's default
        return _projtasks.echo_started
    if app_name == "proj-bulk-whole":  # ablation: enqueue_many builds every message with apply_async
        import proj.integration.enqueue_many

        proj.integration.enqueue_many.kind_of = lambda sig, app: None
    if app_name == "proj-redispy-subscribe":  # ablation: every SUBSCRIBE through redis-py's pub/sub path
        import proj.integration.result_backend

        cls = proj.integration.result_backend.ResultConsumer
        cls._consume_from = cls.__mro__[1]._consume_from  # type: ignore[method-assign]
    if app_name == "proj-kombu-declare":  # ablation: kombu's maybe_declare on every publish
        from kombu import Producer

        import proj.integration.producer

        proj.integration.producer.Producer.maybe_declare = Producer.maybe_declare  # type: ignore[method-assign]
    return _projtasks.echo if kind == "echo" else _projtasks.noop


def delay(app_name: str, n: int) -> dict[str, float]:
    """`.delay()` in a loop."""
    task = _task(app_name, "noop")
    task.delay()  # connect and declare outside the clock
    started = time.perf_counter()
    for _ in range(n):
        task.delay()
    return {"per_second": n / (time.perf_counter() - started)}


def bulk(app_name: str, n: int) -> dict[str, float]:
    """proj.integration.enqueue_many.enqueue_many over n signatures (signatures built inside the clock)."""
    from proj.integration.enqueue_many import enqueue_many

    task = _task(app_name, "noop")
    enqueue_many([task.s()])
    started = time.perf_counter()
    enqueue_many(task.s() for _ in range(n))
    return {"per_second": n / (time.perf_counter() - started)}


def roundtrip(app_name: str, n: int) -> dict[str, float]:
    """`.delay().get()` one at a time; latencies in microseconds."""
    task = _task(app_name, "echo")
    for _ in range(20):  # warm up connections, subscriptions and the worker
        task.delay().get(timeout=30)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        task.delay().get(timeout=30)
        samples.append((time.perf_counter() - started) * 1e6)
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}


def main() -> None:
    """Run one mode and print its figures as JSON."""
    mode, app_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    figures = {"delay": delay, "bulk": bulk, "roundtrip": roundtrip}[mode](app_name, n)
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
