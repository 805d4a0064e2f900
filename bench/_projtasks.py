"""Benchmark tasks registered on proj's own app (workers load them with `-I bench._projtasks`).

Named `tasks.bench.*`, so proj's routes send them to the `default` queue like any short task.
"""

from __future__ import annotations

from proj.celery import app


@app.task(name="tasks.bench.noop", ignore_result=True)
def noop() -> None:
    """A fire-and-forget short task: proj turns its result off, as for every such task."""


@app.task(name="tasks.bench.echo", track_started=False)
def echo() -> None:
    """A short task whose caller waits for the result: no STARTED state, its caller only wants the end."""


@app.task(name="tasks.bench.noop_result")
def noop_result() -> None:
    """`noop` with proj's defaults for results: stored, STARTED tracked (for the ablation rows)."""


@app.task(name="tasks.bench.echo_started")
def echo_started() -> None:
    """`echo` with the STARTED state tracked (proj's default; for the ablation rows)."""
