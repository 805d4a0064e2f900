"""kombu's Redis transport with one Redis client per channel instead of one per command.

Celery glue, selected by `broker_transport` in celeryconfig. kombu 5.7's Redis channel builds a new
`redis.Redis` object for every command it sends outside the consumer's BRPOP (the unacked
bookkeeping of each message, its ack, every event publish, every `.delay()`), and with redis-py 8
building one costs more than sending the command (py-spy: ~17 % of a worker's time, see
docs/benchmarks.md). The client is only a view of the channel's connection pool, so one per channel
is enough; it is thread-safe like any redis-py client, and pipelines stay per call.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

# Any: kombu's type stubs do not describe the channel's private client factory overridden here.
_RedisChannel: Any = kombu_redis.Channel


class Channel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel that reuses its synchronous client."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """The channel's one synchronous client; a fresh one for the async (BRPOP) side."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._sync_client is None:
            self._sync_client = super()._create_client()
        return self._sync_client


class Transport(kombu_redis.Transport):
    """The Redis transport with the channel above."""

    Channel = Channel
