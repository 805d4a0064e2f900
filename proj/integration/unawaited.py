"""Redis commands sent on one connection without waiting for each reply; refusals kept for the caller.

Used by proj's kombu transport for the writes around a task that nothing needs to wait for in
order: unacked records, acks, inflight moves and task events. Redis answers a connection's
commands in order, so what is sent here is applied in the order it was sent; only the wait for each
reply is skipped. Replies are read in bulk (COLLECT_AT) while sending, and all of them by `check`,
which the consumer calls before it takes its next message: a refused write (OOM under noeviction,
READONLY after a failover, NOAUTH, an ACL) is then sent again until Redis takes it, and no message
is taken meanwhile. Giving up on an ack instead would run its task again; giving up on a record
would leave a running message only in memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proj.stores.refused import REFUSED_RETRY_DELAYS, REFUSED_RETRY_SECONDS, RefusedWriteError

logger = logging.getLogger(__name__)

# Replies left unread until this many are outstanding, then read together: reading them one by
# one as they arrive cost a solo worker two receive syscalls per task, before each task ran.
COLLECT_AT = 256
# Replies allowed to be outstanding before the sender waits for them (bounds socket buffers).
MAX_PENDING_REPLIES = 1000

_BROKEN = (RedisConnectionError, RedisTimeoutError, OSError)

# Writes a lost connection took with it unanswered (per Redis server), in the order they were sent.
# They may or may not have been applied; all are safe to apply again, so the next connection of the
# process sends them again before it takes anything, and a closing channel before it gives back
# what it took: an ack lost this way would otherwise let that give-back run a finished task again.
_UNCONFIRMED: dict[tuple[Any, ...], deque[list[tuple[Any, ...]]]] = {}
_UNCONFIRMED_LOCK = threading.Lock()

__all__ = ["RefusedWriteError", "UnawaitedWriter"]


def _server(pool: Any) -> tuple[Any, ...]:
    """Which Redis a connection pool talks to (the unconfirmed writes belong to it)."""
    kwargs = getattr(pool, "connection_kwargs", {})
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0), kwargs.get("path"))


@dataclass
class _Batch:
    """Commands sent together, their replies still to read, and the first refusal among them."""

    commands: list[tuple[Any, ...]]
    resend: bool
    unread: int = 0
    refused: str | None = field(default=None)


class UnawaitedWriter:
    """Commands on one pooled connection, replies read when they are there; thread- and fork-safe."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = 0
        self._pending: deque[tuple[str, _Batch]] = deque()  # (command, its batch) per unread reply
        self._refused: list[_Batch] = []  # batches to send again (all their replies read)

    def send(self, commands: list[tuple[Any, ...]], resend: bool = True) -> None:
        """Send the commands (one reply each) and read the replies that have already arrived.

        `resend`: send them again if Redis refuses one (idempotent writes; a MULTI/EXEC block with a
        refused command was not applied at all). Events are not: they are best-effort.
        """
        with self._lock:
            batch = _Batch(commands, resend, unread=len(commands))
            try:
                connection = self._acquire()  # connecting can fail too: the batch is kept then
                connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                self._pending.extend((str(command[0]), batch) for command in commands)
                self._collect(connection)
            except _BROKEN:
                self._drop(
                    also=batch if batch.unread == len(commands) and not self._pending_has(batch) else None
                )
                raise

    def flush(self) -> None:
        """Wait for every outstanding reply: what was sent has been applied or refused."""
        with self._lock:
            if self._connection is None or self._pid != os.getpid():
                return
            try:
                while self._pending:
                    self._read(self._connection)
            except _BROKEN:
                self._drop()
                raise

    def check(self) -> None:
        """Flush; send refused writes again until Redis takes them (logged once), or raise after a while.

        Raises:
            RefusedWriteError: Redis still refused them after REFUSED_RETRY_SECONDS.
        """
        self._send_unconfirmed()
        self.flush()
        if not self._refused:
            return
        logger.error(
            "Stopped taking messages: Redis refused %s; sending it again until Redis takes it (up to %g s)",
            self._refused[0].refused,
            REFUSED_RETRY_SECONDS,
        )
        deadline = time.monotonic() + REFUSED_RETRY_SECONDS
        for attempt in range(10_000):
            time.sleep(REFUSED_RETRY_DELAYS[min(attempt, len(REFUSED_RETRY_DELAYS) - 1)])
            batches, self._refused = self._refused, []
            self._send_in_order(deque(batch.commands for batch in batches))
            self.flush()
            if not self._refused:
                logger.warning("Redis took the refused write(s); taking messages again")
                return
            if time.monotonic() >= deadline:
                break
        raise RefusedWriteError(f"Redis still refuses {self._refused[0].refused}")

    def settle_unconfirmed(self) -> bool:
        """Send again what lost connections left unanswered and wait for it; False if Redis is away
        or refuses some of it (kept for the next connection of this process to send again)."""
        try:
            self._send_unconfirmed()
            self.flush()
        except _BROKEN:
            return False
        self._keep_refused()
        with _UNCONFIRMED_LOCK:
            return not _UNCONFIRMED.get(_server(self._pool))

    def _send_unconfirmed(self) -> None:
        """Send the unconfirmed writes of this Redis again, oldest first (they become pending here)."""
        with _UNCONFIRMED_LOCK:
            batches = _UNCONFIRMED.pop(_server(self._pool), None)
        if not batches:
            return
        logger.warning("Sending again %d write(s) a lost connection left unanswered", len(batches))
        self._send_in_order(batches)

    def _send_in_order(self, batches: deque[list[tuple[Any, ...]]]) -> None:
        """Send each batch again; when the connection breaks, keep the unsent rest unconfirmed, in order.

        `send` keeps the batch it was sending (and what was pending); dropping the rest would let a
        give-back run a finished task again (its ack among them).
        """
        while batches:
            commands = batches.popleft()
            try:
                self.send(commands)
            except _BROKEN:
                with _UNCONFIRMED_LOCK:
                    _UNCONFIRMED.setdefault(_server(self._pool), deque()).extend(batches)
                raise

    def close(self) -> None:
        """Flush and give the connection back to the pool; refused writes stay to be sent again."""
        try:
            self.flush()
        except _BROKEN:
            return
        finally:
            self._keep_refused()
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._pool.release(self._connection)
            self._connection = None

    def _keep_refused(self) -> None:
        """Hand refused writes to the next connection of this process, which sends them before it
        takes anything: an ack dropped with a closing channel would let its message run again."""
        with self._lock:
            refused, self._refused = self._refused, []
        if refused:
            logger.warning(
                "Redis refused %d write(s) before the close; sending them again later", len(refused)
            )
            with _UNCONFIRMED_LOCK:
                _UNCONFIRMED.setdefault(_server(self._pool), deque()).extend(b.commands for b in refused)

    def _acquire(self) -> Any:
        if self._connection is None or self._pid != os.getpid():  # a forked child needs its own
            self._pending.clear()
            self._connection, self._pid = self._pool.get_connection(), os.getpid()
        return self._connection

    def _collect(self, connection: Any) -> None:
        """Once COLLECT_AT are outstanding, read the replies already there; wait only past the limit."""
        if len(self._pending) < COLLECT_AT:
            return
        while self._pending and (len(self._pending) > MAX_PENDING_REPLIES or connection.can_read(timeout=0)):
            self._read(connection)

    def _read(self, connection: Any) -> None:
        command, batch = self._pending[0]  # popped once answered: a lost reply leaves it unconfirmed
        try:
            connection.read_response()
        except ResponseError as exc:
            logger.debug("Redis refused an unawaited %s: %s", command, exc)
            batch.refused = batch.refused or f"{command} ({exc})"
        self._pending.popleft()
        batch.unread -= 1
        if batch.unread == 0 and batch.refused and batch.resend:
            self._refused.append(batch)

    def _pending_has(self, batch: _Batch) -> bool:
        return any(pending is batch for _, pending in self._pending)

    def _drop(self, also: _Batch | None = None) -> None:
        """Forget the broken connection; keep the writes it left unanswered (and `also`) to send again."""
        if self._connection is not None:
            self._connection.disconnect()
        self._connection = None
        lost: list[_Batch] = []
        for _, batch in self._pending:
            if batch.resend and not any(batch is seen for seen in lost):
                lost.append(batch)
        if also is not None and also.resend:
            lost.append(also)
        self._pending.clear()
        if lost:
            with _UNCONFIRMED_LOCK:
                _UNCONFIRMED.setdefault(_server(self._pool), deque()).extend(b.commands for b in lost)
