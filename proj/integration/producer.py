"""Celery's AMQP helper with proj's producer: long delays parked, declared queues not re-declared.

The app's `amqp` class (proj/celery.py). `AMQP` makes `ParkingProducer`s (proj.integration.parking),
which every proj feature needs whatever PROJ_STOCK_CELERY says. `FastAMQP` adds one replacement:
every `.delay()` asks kombu to declare the task's queue (and the event exchange for its `task-sent`
event) with publish retries on, and kombu binds a copy of the queue to the channel and wraps the
declaration in a retry closure before it looks in its cache of what this connection already
declared. `CachedDeclarationProducer` looks in the same cache first; what is not there goes
through kombu unchanged.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery.app import amqp as celery_amqp

from proj.integration.parking import ParkingProducer


class CachedDeclarationProducer(ParkingProducer):
    """An entity this connection has declared is not declared again."""

    def maybe_declare(self, entity: Any, retry: bool = False, **retry_policy: Any) -> Any:
        """kombu's declaration cache, looked up before the bound copy and the retry wrapper."""
        connection: Any = self.connection
        if entity and entity.can_cache_declaration and hash(entity) in connection.declared_entities:
            return False
        return super().maybe_declare(entity, retry, **retry_policy)


class AMQP(celery_amqp.AMQP):
    """Celery's AMQP helper making parking producers, for `.delay()` and `enqueue_many` alike."""

    producer_class: type[ParkingProducer] = ParkingProducer

    @cached_property
    def Producer(self) -> Any:  # type: ignore[override]  # a class attribute in Celery
        """The producer class, reading this app's `broker_max_countdown`."""
        return type(self.producer_class.__name__, (self.producer_class,), {"app_conf": self.app.conf})

    @property
    def producer_pool(self) -> Any:
        """Celery's producer pool (kombu's, shared per connection), making this helper's producer."""
        pool = super().producer_pool
        pool.Producer = self.Producer
        return pool


class FastAMQP(AMQP):
    """`AMQP` whose producers skip kombu's costly path for entities already declared."""

    producer_class = CachedDeclarationProducer
