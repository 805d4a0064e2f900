"""Ablation: a worker loaded with `-I bench._per_turn_events` flushes task events every loop turn."""

from __future__ import annotations

from proj.celery import app
from proj.integration.task_events import BatchedTaskEvents

app.steps["consumer"].discard(BatchedTaskEvents)
