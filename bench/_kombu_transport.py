"""Ablation: a worker loaded with `-I bench._kombu_transport` uses kombu's own Redis transport."""

from __future__ import annotations

from proj.celery import app

app.conf.broker_transport = None
