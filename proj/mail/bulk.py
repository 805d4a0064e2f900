"""Bulk sends: one template, many recipients, chunks sent in parallel, one SMTP connection per chunk."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from proj.errors import InvalidEmailError, PermanentError, RateLimitedError, TransientError
from proj.mail.message import MAX_KEY_LENGTH, EmailRequest, template_name, validate
from proj.mail.service import Mailer
from proj.mail.templates import check_template
from proj.mail.transport import ChunkConnection

logger = logging.getLogger(__name__)

# A round's tally lives as long as a result does; a bulk send never takes a day.
TALLY_TTL = 86400

RECIPIENT_SHAPE = "a recipient is {'to': address, 'context': {...}}"
# Each message's key is the bulk key, ":" and 32 hex digits, and must fit MAX_KEY_LENGTH.
MAX_BULK_KEY_LENGTH = MAX_KEY_LENGTH - 33


@dataclass
class Round:
    """What one pass over the recipients did; `deferred` go round again later."""

    sent: int = 0
    duplicates: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)
    retry_after: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def message_key(bulk_key: str, recipient: Mapping[str, Any]) -> str:
    """The idempotency key of one message of a bulk send: the bulk key plus recipient and context."""
    body = json.dumps([recipient.get("to"), recipient.get("context") or {}], sort_keys=True, default=str)
    return f"{bulk_key}:{hashlib.sha256(body.encode()).hexdigest()[:32]}"


@dataclass
class Prepared:
    """Messages ready to send, the ones that cannot be built, and repeats within the list."""

    ready: list[tuple[dict[str, Any], EmailRequest]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    repeats: int = 0


def prepare(template: str, recipients: Sequence[Any], bulk_key: str, mailer: Mailer) -> Prepared:
    """Render and check every recipient's message; the ones that can't be built are failures."""
    out, seen = Prepared(), set()
    for item in recipients:
        if not isinstance(item, Mapping) or "to" not in item:
            out.failures.append({"to": repr(item)[:200], "error": RECIPIENT_SHAPE})
            continue
        key = message_key(bulk_key, item)
        if key in seen:
            out.repeats += 1  # the same message twice in one list is sent once
            continue
        seen.add(key)
        try:
            request = validate(
                to=item["to"],
                template=template,
                context=item.get("context") or {},
                idempotency_key=key,
                settings=mailer.settings,
            )
        except InvalidEmailError as exc:
            out.failures.append({"to": str(item["to"])[:200], "error": str(exc)})
            continue
        out.ready.append((dict(item), request))
    return out


class _Feed:
    """The messages of a round, handed out one at a time to the connection threads."""

    def __init__(self, items: list[tuple[dict[str, Any], EmailRequest]]) -> None:
        self._items = iter(items)
        self._lock = threading.Lock()

    def next(self) -> tuple[dict[str, Any], EmailRequest] | None:
        with self._lock:
            return next(self._items, None)


def send_round(
    mailer: Mailer,
    ready: list[tuple[dict[str, Any], EmailRequest]],
    owner: str,
    on_chunk: Callable[[Round], None],
) -> Round:
    """Send every prepared message over up to EMAIL_BULK_CONNECTIONS connections at once.

    Each connection carries one chunk (at most EMAIL_BULK_CHUNK_SIZE messages) and is then closed;
    the threads pull messages from one shared feed, so none idles while another has a backlog.
    """
    outcome = Round()
    if not ready:
        return outcome
    feed = _Feed(ready)
    workers = max(1, min(mailer.settings.email_bulk_connections, len(ready)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bulk") as pool:
        for _ in pool.map(lambda _: _send_chunks(mailer, feed, owner, outcome, on_chunk), range(workers)):
            pass
    return outcome


def _send_chunks(
    mailer: Mailer, feed: _Feed, owner: str, outcome: Round, on_chunk: Callable[[Round], None]
) -> None:
    """Send chunks from the feed until it is empty, one SMTP connection per chunk."""
    size = max(1, mailer.settings.email_bulk_chunk_size)
    item = feed.next()
    while item is not None:
        conn = ChunkConnection(mailer.settings)
        try:
            for _ in range(size):
                if item is None:
                    break
                _send_one(mailer, *item, owner, conn, outcome)
                item = feed.next()
        finally:
            conn.close()
        on_chunk(outcome)


def _send_one(
    mailer: Mailer,
    item: dict[str, Any],
    request: EmailRequest,
    owner: str,
    conn: ChunkConnection,
    outcome: Round,
) -> None:
    """Send one message of a chunk and count what happened."""
    try:
        result = mailer.deliver(request, owner, conn.send)
    except RateLimitedError as exc:
        _count(outcome, deferred=item, retry_after=exc.retry_after)
    except TransientError as exc:
        _count(outcome, deferred={**item, "last_error": str(exc)})
    except PermanentError as exc:
        _count(outcome, failure={"to": ", ".join(request.to), "error": str(exc)})
    else:
        _count(outcome, duplicate=bool(result["duplicate"]))


def _count(
    outcome: Round,
    *,
    duplicate: bool | None = None,
    failure: dict[str, str] | None = None,
    deferred: dict[str, Any] | None = None,
    retry_after: float = 0.0,
) -> None:
    with outcome.lock:
        if duplicate is not None:
            outcome.duplicates += duplicate
            outcome.sent += not duplicate
        if failure is not None:
            outcome.failures.append(failure)
        if deferred is not None:
            outcome.deferred.append(deferred)
            outcome.retry_after = max(outcome.retry_after, retry_after)


class Tally:
    """Counts of a bulk send across its rounds, in Redis, so a retried round adds to the last one."""

    def __init__(self, mailer: Mailer, bulk_id: str) -> None:
        self.client = mailer.client
        self.key = f"proj:bulk:{bulk_id}"

    def start(self, total: int) -> None:
        """Remember the total of the first round (later rounds carry only the deferred)."""
        self.client.hsetnx(self.key, "total", total)
        self.client.expire(self.key, TALLY_TTL)

    def add(self, sent: int, duplicates: int, failures: list[dict[str, str]]) -> None:
        with self.client.pipeline() as pipe:
            pipe.hincrby(self.key, "sent", sent).hincrby(self.key, "duplicates", duplicates)
            pipe.hincrby(self.key, "failed", len(failures))
            for failure in failures:
                pipe.rpush(self.key + ":failures", json.dumps(failure))
            pipe.expire(self.key + ":failures", TALLY_TTL)
            pipe.execute()

    def read(self) -> dict[str, Any]:
        """{"total", "sent", "duplicates", "failed", "failures"} so far."""
        raw = {k.decode(): int(v) for k, v in self.client.hgetall(self.key).items()}
        failures = [json.loads(f) for f in self.client.lrange(self.key + ":failures", 0, -1)]
        counts = {name: raw.get(name, 0) for name in ("total", "sent", "duplicates", "failed")}
        return {**counts, "failures": failures}


@dataclass(frozen=True)
class BulkRun:
    """The result so far, plus what must go round again and when."""

    result: dict[str, Any]
    deferred: list[dict[str, Any]]
    retry_after: float
    bulk_key: str


def run(
    mailer: Mailer,
    template: str,
    recipients: Any,
    bulk_key: str | None,
    bulk_id: str,
    progress: Callable[[dict[str, int]], None],
    last_round: bool,
) -> BulkRun:
    """One round of a bulk send: every message sent once; on the last round deferred become failures."""
    if not isinstance(recipients, list) or not recipients:
        raise InvalidEmailError("recipients: expected a non-empty list of {'to': ..., 'context': {...}}")
    limit = mailer.settings.email_bulk_max_recipients
    if len(recipients) > limit:
        raise InvalidEmailError(f"recipients: {len(recipients)}, over the limit of {limit} per send_bulk")
    check_template(template_name(template), mailer.settings.mail_templates_dir)
    # Checked here, not per message: a key of another type or length made every recipient a
    # failure of a SUCCESS (too long), or was sent under its str() (a list, a number).
    if bulk_key is not None and not (
        isinstance(bulk_key, str) and 0 < len(bulk_key) <= MAX_BULK_KEY_LENGTH and bulk_key.isprintable()
    ):
        raise InvalidEmailError(f"idempotency_key: 1 to {MAX_BULK_KEY_LENGTH} printable characters")
    key = (
        bulk_key
        or "bulk:"
        + hashlib.sha256(json.dumps([template, recipients], sort_keys=True, default=str).encode()).hexdigest()
    )
    tally = Tally(mailer, bulk_id)
    tally.start(len(recipients))
    prepared = prepare(template, recipients, key, mailer)
    tally.add(0, prepared.repeats, prepared.failures)
    before = tally.read()

    def on_chunk(now: Round) -> None:
        progress(
            {
                "sent": before["sent"] + now.sent,
                "total": before["total"],
                "duplicates": before["duplicates"] + now.duplicates,
                "failed": before["failed"] + len(now.failures),
            }
        )

    done = send_round(mailer, prepared.ready, bulk_id, on_chunk)
    deferred, failures = done.deferred, done.failures
    if last_round and deferred:
        failures = failures + [
            {"to": str(d["to"]), "error": d.get("last_error", "rate limited")} for d in deferred
        ]
        deferred = []
    tally.add(done.sent, done.duplicates, failures)
    logger.info(
        "Bulk %s round: %d sent, %d duplicates, %d failed, %d deferred",
        bulk_id,
        done.sent,
        done.duplicates + prepared.repeats,
        len(failures) + len(prepared.failures),
        len(deferred),
    )
    return BulkRun({**tally.read(), "deferred": len(deferred)}, deferred, done.retry_after, key)
