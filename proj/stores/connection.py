"""The one way proj opens its own Redis clients (ledger, rate limits, dead letters, delayed set, CLI)."""

from __future__ import annotations

from typing import Any

import redis

# A command that gets no answer in this long fails instead of hanging: a stalled or unreachable
# Redis (SIGSTOP, a dropped network path) is then a RedisError the caller handles, never a thread
# blocked for the kernel's TCP timeout (hours). Longer than any command proj sends should take.
SOCKET_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
# An idle pooled connection is PINGed before reuse after this long: a restarted Redis is noticed.
HEALTH_CHECK_INTERVAL = 10


def redis_client(url: str, **options: Any) -> redis.Redis[bytes]:
    """A client for `url` with proj's timeouts, keepalive and health checks (`options` override)."""
    settings: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        **options,
    }
    return redis.Redis.from_url(url, **settings)
