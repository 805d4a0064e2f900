"""The Redis-backed pieces of email on the private Redis: ledger, rate limiter, delayed set, mailer."""

from __future__ import annotations

import time

import pytest

from proj.errors import EmailDeliveryError, InvalidEmailError, RateLimitedError
from proj.mail import Mailer, validate
from proj.settings import Settings
from proj.stores.delayed import DelayedSet
from proj.stores.ledger import Ledger
from proj.stores.ratelimit import DomainRateLimiter, parse_limits
from tests.harness import wait_for

pytestmark = pytest.mark.integration


def test_ledger_states(redis_client):
    ledger = Ledger(redis_client, "test", ttl=60)
    assert ledger.claim("k", "task-1").status == "new"
    assert ledger.claim("k", "task-2").status == "busy"  # another task with the same key waits
    assert ledger.claim("k", "task-1").status == "resume"  # a redelivery of the owner takes over
    ledger.sending("k", "task-1")
    assert ledger.claim("k", "task-1").ambiguous  # died inside the window the ledger cannot close
    ledger.sent("k", "task-1", {"message_id": "<m>"})
    for owner in ("task-1", "task-2"):
        claim = ledger.claim("k", owner)
        assert claim.status == "sent" and claim.record["outcome"] == {"message_id": "<m>"}
    ledger.release("k", "task-1")  # a finished record is never released
    assert ledger.get("k")["state"] == "sent"
    assert 0 < redis_client.ttl("proj:ledger:test:k") <= 60
    assert ledger.claim("j", "task-3").status == "new"
    ledger.release("j", "task-4")  # not the owner: no effect
    assert ledger.claim("j", "task-5").status == "busy"
    ledger.release("j", "task-3")
    assert ledger.claim("j", "task-5").status == "new"


def test_ledger_keeps_a_redelivered_copy_away_from_a_live_run(redis_client):
    """On Redis a message still running past its visibility timeout is delivered again, same task id."""
    ledger = Ledger(redis_client, "test", ttl=60)
    assert ledger.claim("k", "task-1", "run-a", window=30).status == "new"
    copy = ledger.claim("k", "task-1", "run-b", window=30)
    assert copy.status == "live" and 29 < copy.retry_after <= 30  # the copy comes back later
    assert ledger.sending("k", "task-1", "run-a", window=30)  # the first run still hands over
    assert ledger.claim("k", "task-1", "run-b", window=30).status == "live"
    ledger.sent("k", "task-1", {"message_id": "<m>"})
    assert ledger.claim("k", "task-1", "run-b", window=30).status == "sent"


def test_ledger_lets_a_copy_take_over_once_the_window_passed(redis_client):
    ledger = Ledger(redis_client, "test", ttl=60)
    assert ledger.claim("k", "task-1", "run-a", window=0.2).status == "new"
    wait_for(lambda: ledger.claim("k", "task-1", "run-b", window=0.2).status == "resume", timeout=5)
    # The first run woke up too late: it must not hand over, and cannot release the copy's claim.
    assert not ledger.sending("k", "task-1", "run-a", window=0.2)
    ledger.release("k", "task-1", "run-a")
    assert ledger.get("k")["run"] == "run-b"
    assert ledger.sending("k", "task-1", "run-b", window=0.2)


def test_ledger_abandoned_send_is_resumed_at_once_by_the_owner(redis_client):
    ledger = Ledger(redis_client, "test", ttl=60)
    ledger.claim("k", "task-1", "run-a", window=30)
    assert ledger.sending("k", "task-1", "run-a", window=30)
    ledger.abandon("k", "task-1", "run-a")  # connection dropped inside DATA: outcome unknown
    claim = ledger.claim("k", "task-1", "run-b", window=30)
    assert claim.status == "resume" and claim.ambiguous


def test_rate_limiter_is_shared_and_all_or_nothing(redis_client):
    rates = parse_limits("slow.example=2/s,*=1000/s")
    one, two = DomainRateLimiter(redis_client, rates), DomainRateLimiter(redis_client, rates)
    assert one.acquire(["slow.example"]) == 0
    wait = two.acquire(["slow.example", "other.example"])  # a second worker sees the same bucket
    assert 0 < wait <= 0.5
    assert redis_client.get("proj:ratelimit:other.example") is None  # no slot taken on a refusal
    assert one.acquire(["unlisted.example"]) == 0  # the * limit, per domain
    assert DomainRateLimiter(redis_client, {}).acquire(["slow.example"]) == 0
    provider = DomainRateLimiter(redis_client, parse_limits("@smtp=2/s"))
    assert provider.acquire(["a.example"]) == 0
    assert provider.acquire(["b.example"]) > 0  # another domain, same provider budget


def test_delayed_set_releases_due_messages_in_order_once(redis_client):
    delayed = DelayedSet(redis_client)
    now = time.time()
    delayed.add("q1", '{"headers": {"id": "a"}}', now - 1)
    delayed.add("q1", '{"headers": {"id": "b"}}', now + 100)
    delayed.add("q2", '{"headers": {"id": "c"}}', now - 2)
    assert delayed.release_due(now) == 2
    assert delayed.release_due(now) == 0
    assert [r.decode() for r in redis_client.lrange("q1", 0, -1)] == ['{"headers": {"id": "a"}}']
    assert redis_client.llen("q2") == 1
    assert [p["id"] for p in delayed.pending()] == ["b"]


def test_mailer_with_nothing_listening_releases_its_claim(redis_client):
    from tests.harness import free_port

    settings = Settings(smtp_port=free_port(), smtp_timeout=2)
    mailer = Mailer(settings, redis_client)
    request = validate(to="a@example.com", subject="s", text="t", idempotency_key="down-1", settings=settings)
    with pytest.raises(EmailDeliveryError, match="ConnectionRefusedError"):
        mailer.send(request, owner="t1")
    assert mailer.ledger.get("down-1") is None  # nothing was handed over: a retry starts clean


def test_mailer_over_the_limit_asks_to_come_back(redis_client, smtp_server):
    settings = Settings(smtp_port=smtp_server.port, email_rate_limits="example.com=1/m")
    mailer = Mailer(settings, redis_client)
    first = validate(to="a@example.com", subject="s", text="1", settings=settings)
    second = validate(to="b@example.com", subject="s", text="2", settings=settings)
    assert mailer.send(first, owner="t1")["duplicate"] is False
    with pytest.raises(RateLimitedError) as caught:
        mailer.send(second, owner="t2")
    assert 30 < caught.value.retry_after <= 120
    assert mailer.ledger.get(second.idempotency_key) is None
    assert len(smtp_server.handler.received) == 1


def test_a_redis_error_before_anything_is_sent_gives_the_claim_back(redis_client, smtp_server):
    # Redis refuses the rate limiter (here by ACL; a full Redis refuses its write the same way)
    # after the claim was taken. Nothing was sent: the retry must not wait out the claim window.
    settings = Settings(smtp_port=smtp_server.port, email_rate_limits="example.com=100/s")
    mailer = Mailer(settings, redis_client)
    request = validate(
        to="a@example.com", subject="s", text="t", idempotency_key="limit-1", settings=settings
    )
    acl = redis_client.execute_command
    acl("ACL", "SETUSER", "default", "resetkeys", "~proj:ledger:*")
    try:
        with pytest.raises(EmailDeliveryError, match="Redis unavailable"):
            mailer.send(request, owner="t1")
    finally:
        acl("ACL", "SETUSER", "default", "allkeys")
    assert mailer.ledger.get("limit-1") is None
    assert mailer.send(request, owner="t1")["duplicate"] is False  # a new run, at once
    assert len(smtp_server.handler.received) == 1


def test_a_refused_sending_mark_gives_the_claim_back(redis_client, smtp_server):
    # The claim is taken, then Redis refuses the "sending" mark before DATA (a full Redis refuses
    # it the same way): nothing reached the server, so the retry must not wait out the window.
    import threading

    settings = Settings(smtp_port=smtp_server.port)
    mailer = Mailer(settings, redis_client)
    request = validate(to="a@example.com", subject="s", text="t", idempotency_key="mark-1", settings=settings)
    acl = redis_client.execute_command
    failures: list[Exception] = []

    def send() -> None:
        try:
            mailer.send(request, owner="t1")
        except Exception as exc:
            failures.append(exc)

    smtp_server.handler.hold_rcpt.set()  # the client waits at RCPT: claimed, not yet marked
    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: smtp_server.handler.held == 1, timeout=10, what="the client at RCPT")
        acl("ACL", "SETUSER", "default", "-set")
        smtp_server.handler.hold_rcpt.clear()
        sender.join(10)
    finally:
        smtp_server.handler.hold_rcpt.clear()
        acl("ACL", "SETUSER", "default", "+set")
    assert [type(e).__name__ for e in failures] == ["EmailDeliveryError"], failures
    assert mailer.ledger.get("mark-1") is None and smtp_server.handler.received == []
    assert mailer.send(request, owner="t1")["duplicate"] is False  # a new run, at once
    assert len(smtp_server.handler.received) == 1


def test_an_attachment_gone_before_sending_gives_the_claim_back(redis_client, smtp_server, tmp_path):
    settings = Settings(smtp_port=smtp_server.port, files_root=tmp_path)
    (tmp_path / "r.txt").write_text("receipt")
    request = validate(
        to="a@example.com",
        subject="s",
        text="t",
        attachments=["r.txt"],
        idempotency_key="gone-1",
        settings=settings,
    )
    (tmp_path / "r.txt").unlink()  # after the check, before the message is built
    mailer = Mailer(settings, redis_client)
    with pytest.raises(InvalidEmailError, match=r"attachment .r\.txt."):
        mailer.send(request, owner="t1")
    assert mailer.ledger.get("gone-1") is None

    (tmp_path / "r.txt").write_text("receipt")  # put back: a replay (another task) sends at once
    assert mailer.send(request, owner="t2")["duplicate"] is False
    assert len(smtp_server.handler.received) == 1


def test_tls_modes_auth_and_certificate_failures(redis_client, smtp_server_tls, tls_ca):
    import ssl

    from aiosmtpd.controller import Controller

    from proj.errors import EmailRejectedError
    from proj.stack.devsmtp import MailSink
    from tests.harness import free_port

    def send(settings: Settings, key: str) -> dict:
        request = validate(to="a@example.com", subject="s", text=key, idempotency_key=key, settings=settings)
        return Mailer(settings, redis_client).send(request, owner=key)

    starttls = Settings(
        smtp_port=smtp_server_tls.port,
        smtp_security="starttls",
        smtp_username="user",
        smtp_password="secret",
        smtp_ca_file=tls_ca.ca_file,
    )
    assert send(starttls, "starttls-ok")["duplicate"] is False
    with pytest.raises(EmailRejectedError, match="authentication failed") as caught:
        send(Settings(**{**starttls.__dict__, "smtp_password": "wrong"}), "bad-password")
    assert "wrong" not in str(caught.value)
    with pytest.raises(EmailDeliveryError, match="SSL"):  # unknown CA: a handshake failure, retried
        send(Settings(**{**starttls.__dict__, "smtp_ca_file": ""}), "unknown-ca")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.server_cert.configure_cert(context)
    handler = MailSink()
    implicit = Controller(handler, hostname="127.0.0.1", port=free_port(), ssl_context=context)
    implicit.start()
    try:
        send(Settings(smtp_port=implicit.port, smtp_security="tls", smtp_ca_file=tls_ca.ca_file), "tls-ok")
        assert len(handler.received) == 1
    finally:
        implicit.stop()


def test_a_refused_sent_record_after_the_servers_250_is_retried_not_sent_again(redis_client, smtp_server):
    import threading

    settings = Settings(smtp_port=smtp_server.port)
    mailer = Mailer(settings, redis_client)
    request = validate(
        to="a@example.com", subject="s", text="t", idempotency_key="known-1", settings=settings
    )
    acl = redis_client.execute_command

    # The moment the server stores the message, Redis refuses SET (the ledger's "sent" record)
    # for a second, as a stall or failover would make it fail.
    def refuse_set_for_a_second(item):
        acl("ACL", "SETUSER", "default", "-set")
        threading.Timer(1.0, acl, ("ACL", "SETUSER", "default", "+set")).start()

    smtp_server.handler.on_stored = refuse_set_for_a_second
    try:
        assert mailer.send(request, owner="t1")["duplicate"] is False
    finally:
        smtp_server.handler.on_stored = None
        acl("ACL", "SETUSER", "default", "+set")
    assert mailer.ledger.get("known-1")["state"] == "sent"
    assert mailer.send(request, owner="t1")["duplicate"] is True  # the owner's retry sends nothing
    assert len(smtp_server.handler.received) == 1
