"""The one way proj opens its own Redis clients (ledger, rate limits, dead letters, delayed set, CLI).

`redis://`, `rediss://` and `unix://` URLs as redis-py reads them; `sentinel://` URLs as Celery's
users write them (`sentinel://:password@host1:26379/0;sentinel://host2:26379`, the master's name in
REDIS_SENTINEL_MASTER): the client then asks the sentinels for the current master on every
(re)connect, so it follows a failover.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

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
    if url.startswith("sentinel://"):
        return _sentinel_master(url, settings)
    return redis.Redis.from_url(url, **settings)


def _sentinel_master(url: str, settings: dict[str, Any]) -> redis.Redis[bytes]:
    """A client of the master the sentinels of `url` name now (and after each failover)."""
    from proj.settings import get_settings

    parts = [urlsplit(part) for part in url.split(";") if part.strip()]
    first = parts[0]
    db = int((first.path or "/0").lstrip("/") or 0)
    sentinels = [(part.hostname or "127.0.0.1", part.port or 26379) for part in parts]
    sentinel = Sentinel(
        sentinels,
        socket_timeout=settings["socket_timeout"],
        socket_connect_timeout=settings["socket_connect_timeout"],
    )
    master: redis.Redis[bytes] = sentinel.master_for(
        get_settings().redis_sentinel_master,
        db=db,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        **settings,
    )
    return master
