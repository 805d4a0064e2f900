"""Sending one message exactly once: ledger claim, rate limit, SMTP transaction, ledger record."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import redis

from proj.errors import EmailDeliveryError, PermanentError, RateLimitedError, StillRunningError
from proj.mail.message import EmailRequest, message_id_for, sender_address
from proj.mail.mime import build_message, to_bytes
from proj.mail.transport import TemporaryReplyError, ThreadConnections
from proj.settings import Settings, get_settings
from proj.stores.connection import SOCKET_TIMEOUT, redis_client
from proj.stores.ledger import Ledger
from proj.stores.ratelimit import DomainRateLimiter, parse_limits

logger = logging.getLogger(__name__)

SendFn = Callable[[str, Sequence[str], bytes, Callable[[], None]], dict[str, str]]

# Waits between attempts to record "sent" while Redis does not answer; the last one repeats.
SENT_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)
# Stop retrying this long before the claim window ends (a copy may take over only after it): one
# attempt can take a whole socket timeout.
SENT_RETRY_MARGIN = SOCKET_TIMEOUT + 2.0


class Mailer:
    """The email service of one process: shared Redis client, ledger, limiter, SMTP connections."""

    def __init__(self, settings: Settings, client: redis.Redis[bytes] | None = None) -> None:
        self.settings = settings
        self.client = client or redis_client(settings.redis_url)
        self.ledger = Ledger(self.client, "email", settings.email_ledger_ttl)
        self.limiter = DomainRateLimiter(self.client, parse_limits(settings.email_rate_limits))
        self.connections = ThreadConnections(settings)

    def send(self, request: EmailRequest, owner: str) -> dict[str, Any]:
        """Send a transactional message on this thread's reused connection."""
        return self.deliver(request, owner, self.connections.send)

    def deliver(self, request: EmailRequest, owner: str, send: SendFn) -> dict[str, Any]:
        """Send `request` once per idempotency key, whoever asks and however often.

        Raises:
            RateLimitedError: a recipient domain is over its limit; come back after `retry_after`.
            EmailDeliveryError: worth retrying (4xx, connection trouble, Redis unreachable, or the
                key is in flight).
            PermanentError: the server refused for good, or the message cannot be built.
        """
        try:
            return self._deliver(request, owner, send)
        except redis.RedisError as exc:  # no ledger, no sending: try again when Redis is back
            raise EmailDeliveryError(f"Redis unavailable for the email ledger: {exc}") from exc

    @property
    def claim_window(self) -> float:
        """Seconds a run may hold a claim before handing over: every SMTP step is bounded by the timeout."""
        return 2 * self.settings.smtp_timeout + 10

    def _deliver(self, request: EmailRequest, owner: str, send: SendFn) -> dict[str, Any]:
        key, run = request.idempotency_key, uuid.uuid4().hex
        claim = self.ledger.claim(key, owner, run, self.claim_window)
        if claim.status == "sent":
            logger.info("Message %s was already sent; not sending again", key)
            return {**claim.record["outcome"], "duplicate": True}
        if claim.status == "busy":
            raise EmailDeliveryError(f"message {key!r} is being sent by task {claim.record.get('owner')}")
        if claim.status == "live":
            # Redelivered while the first run may still be sending (visibility timeout passed).
            raise StillRunningError(
                f"an earlier run of task {owner} may still be sending {key!r}", claim.retry_after + 1
            )
        if claim.ambiguous:
            logger.warning("Task %s died while the server held message %s; sending again", owner, key)
        try:
            self._take_slots(request, owner, run)
        except redis.RedisError:
            # Nothing was sent: give the claim back, or the task's retry (a new run) waits out the
            # claim window (a rate-limit write refused by a full Redis held mail up for a minute).
            self._release_if_possible(key, owner, run)
            raise
        started = time.monotonic()
        outcome = self._transact(request, owner, run, send)
        self._record_sent(key, owner, outcome, started + self.claim_window - SENT_RETRY_MARGIN)
        return {**outcome, "duplicate": False}

    def _record_sent(self, key: str, owner: str, outcome: dict[str, Any], deadline: float) -> None:
        """Record "sent" after the server's 250, retrying while Redis fails, until `deadline`.

        The server holds the message now: losing this record to a stall or a failover would make the
        retry send it again once the claim window has passed. Until then no copy can take over, so
        retrying within the window is safe; after it, the outcome is as unknown as a dead worker's.
        """
        attempt = 0
        while True:
            try:
                self.ledger.sent(key, owner, outcome)
            except redis.RedisError as exc:
                delay = SENT_RETRY_DELAYS[min(attempt, len(SENT_RETRY_DELAYS) - 1)]
                if time.monotonic() + delay >= deadline:
                    logger.error(
                        "Could not record message %s as sent before its claim window ended: %s", key, exc
                    )
                    raise
                logger.warning("Recording message %s as sent failed (%s); retrying in %.2fs", key, exc, delay)
                time.sleep(delay)
                attempt += 1
            else:
                if attempt:
                    logger.info("Recorded message %s as sent after %d retries", key, attempt)
                return

    def _release_if_possible(self, key: str, owner: str, run: str) -> None:
        """Give the claim back; if Redis cannot take even that, the claim window ends it."""
        try:
            self.ledger.release(key, owner, run)
        except redis.RedisError as exc:
            logger.warning("Could not give back the claim on %s (%s); it ends with its window", key, exc)

    def _take_slots(self, request: EmailRequest, owner: str, run: str) -> None:
        """One slot per recipient domain, or give the claim back and say when to come back."""
        wait = self.limiter.acquire(addr.rpartition("@")[2] for addr in request.recipients)
        if wait > 0:
            self.ledger.release(request.idempotency_key, owner, run)
            retry_after = wait + random.uniform(0, max(wait, 0.05))  # spread the herd
            raise RateLimitedError(f"rate limit reached; retry in {retry_after:.2f}s", retry_after)

    def _transact(self, request: EmailRequest, owner: str, run: str, send: SendFn) -> dict[str, Any]:
        """Build and send; keep the "sending" mark only when the outcome is unknown."""
        key = request.idempotency_key
        message_id = message_id_for(key, self.settings)
        try:
            data = to_bytes(build_message(request, message_id, self.settings))
        except Exception:  # e.g. an attachment gone: a replay after the fix must not find a claim
            self._release_if_possible(key, owner, run)
            raise
        handed_over = False

        def before_data() -> None:
            nonlocal handed_over
            if not self.ledger.sending(key, owner, run, self.claim_window):
                raise EmailDeliveryError(f"held the claim on {key!r} past its window; not handing over")
            handed_over = True

        try:
            refused = send(sender_address(self.settings), request.recipients, data, before_data)
        except (PermanentError, TemporaryReplyError):
            self.ledger.release(key, owner, run)  # the server answered: it does not hold the message
            raise
        except (EmailDeliveryError, redis.RedisError):  # Redis: the "sending" mark refused (full, say)
            if handed_over:
                self.ledger.abandon(key, owner, run)  # ambiguous: the owner's retry sends again
            else:
                self._release_if_possible(key, owner, run)
            raise
        accepted = [r for r in request.recipients if r not in refused]
        logger.info("Sent %s to %d recipient(s), %d refused", message_id, len(accepted), len(refused))
        return {"message_id": message_id, "accepted": accepted, "refused": refused}


@lru_cache(maxsize=1)
def get_mailer() -> Mailer:
    """The process-wide mailer, created on first use."""
    return Mailer(get_settings())
