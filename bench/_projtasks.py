"""Benchmark tasks registered on proj's own app (workers load them with `-I bench._projtasks`).

Named `tasks.bench.*`, so proj's routes send them to the `default` queue like any short task. Every
one has the same empty body as `bench._stock.noop` and `bench._huey.noop`; they differ only in what
is stored about them:

- `noop_result`: proj's defaults as shipped: result stored, STARTED tracked (`task_track_started`);
- `echo`: result stored, no STARTED (`track_started=False`): Celery's default;
- `noop`: result ignored (`ignore_result=True`, hence no STARTED either).
"""

from __future__ import annotations

from proj.celery import app


@app.task(name="tasks.bench.noop", ignore_result=True)
def noop() -> None:
    """Result ignored: a fire-and-forget task."""


@app.task(name="tasks.bench.echo", track_started=False)
def echo() -> None:
    """Result stored, no STARTED state: Celery's default for results."""


@app.task(name="tasks.bench.noop_result")
def noop_result() -> None:
    """Result stored and STARTED tracked: proj's configuration as shipped."""
