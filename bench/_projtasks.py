"""Benchmark tasks registered on proj's own app (workers load them with `-I bench._projtasks`).

Named `tasks.bench.*`, so proj's routes send them to the `default` queue like any short task.
"""

from __future__ import annotations

from proj.celery import app


@app.task(name="tasks.bench.noop", ignore_result=True)
def noop() -> None:
    """A fire-and-forget short task: proj turns its result off, as for every such task."""


@app.task(name="tasks.bench.echo")
def echo() -> None:
    """A short task whose caller waits for the result (`.delay().get()`)."""
