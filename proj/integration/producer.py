"""Celery's AMQP helper with proj's producer, which parks long delays (proj.integration.parking).

The app's `amqp` class (proj/celery.py), in both modes of PROJ_STOCK_CELERY: parking is a proj
feature, not a replacement. (A producer that skipped kombu's declaration path for queues already
declared was removed: +3 % on the round trip and no effect on the drain, docs/internals.md.)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery.app import amqp as celery_amqp

from proj.integration.parking import ParkingProducer


class AMQP(celery_amqp.AMQP):
    """Celery's AMQP helper making parking producers, for `.delay()` and `enqueue_many` alike."""

    @cached_property
    def Producer(self) -> Any:  # type: ignore[override]  # a class attribute in Celery
        """The producer class, reading this app's `broker_max_countdown`."""
        return type(ParkingProducer.__name__, (ParkingProducer,), {"app_conf": self.app.conf})

    @property
    def producer_pool(self) -> Any:
        """Celery's producer pool (kombu's, shared per connection), making this helper's producer."""
        pool = super().producer_pool
        pool.Producer = self.Producer
        return pool
