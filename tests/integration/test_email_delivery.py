"""Email through a real worker subprocess to a real SMTP server: content, TLS, retries, refusals."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from proj.settings import Settings
from proj.stack.devsmtp import MailSink, start
from tests.conftest import smtp_env
from tests.harness import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.stock_too]

EMAIL_QUEUES = "email,email_bulk"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_delivered_content_parts_headers_attachment_and_message_id(start_worker, smtp_server, files_root):
    from proj.mail import message_id_for
    from tasks.email import send_email

    png = _png()
    (files_root / "reports").mkdir()
    (files_root / "reports" / "chart.txt").write_bytes(png)  # a lying extension: the type is sniffed
    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))

    result = send_email.delay(
        to=["Ann@Example.com"],
        cc="bob@example.org",
        bcc=["carol@example.net"],
        template="welcome",
        context={"name": "Ann <b>", "product": "Proj", "url": "https://example.com/?a=1&b=2"},
        headers={"List-Unsubscribe": "<mailto:unsub@example.com>", "X-Campaign": "welcome-1"},
        attachments=["reports/chart.txt"],
        idempotency_key="welcome:ann",
    ).get(timeout=30)

    assert result["message_id"] == message_id_for("welcome:ann", Settings())
    assert result["refused"] == {} and result["duplicate"] is False
    assert sorted(result["accepted"]) == ["Ann@example.com", "bob@example.org", "carol@example.net"]
    [received] = smtp_server.handler.received
    assert sorted(received.rcpt_tos) == sorted(result["accepted"])
    msg = received.message
    assert msg["Message-ID"] == result["message_id"]
    assert msg["Subject"] == "Welcome to Proj, Ann <b>"
    assert msg["To"] == "Ann@example.com" and msg["Cc"] == "bob@example.org"
    assert msg["Bcc"] is None  # blind copies travel in the envelope only
    assert msg["List-Unsubscribe"] == "<mailto:unsub@example.com>" and msg["X-Campaign"] == "welcome-1"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "Hello Ann <b>," in text and "https://example.com/?a=1&b=2" in text
    assert "Hello Ann &lt;b&gt;," in html and "https://example.com/?a=1&amp;b=2" in html
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_content_type() == "image/png"
    assert attachment.get_filename() == "chart.txt"
    assert attachment.get_content() == png


def test_starttls_and_auth(start_worker, smtp_server_tls):
    from tasks.email import send_email

    env = {
        **smtp_env(smtp_server_tls),
        "SMTP_SECURITY": "starttls",
        "SMTP_USERNAME": "user",
        "SMTP_PASSWORD": "secret",
        "SMTP_CA_FILE": smtp_server_tls.ca_file,
    }
    worker = start_worker(EMAIL_QUEUES, env=env)
    result = send_email.delay(to="dan@example.com", subject="over TLS", text="hi").get(timeout=30)
    [received] = smtp_server_tls.handler.received
    assert received.message["Message-ID"] == result["message_id"]
    assert "secret" not in worker.log()  # the password never reaches the log


def test_451_then_250_delivers_once_after_one_retry(start_worker, smtp_server):
    from tasks.email import send_email

    smtp_server.handler.fail_next("451 4.3.0 Try again later")
    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    async_result = send_email.delay(to="eve@example.com", subject="retry", text="body")
    result = async_result.get(timeout=30)
    assert len(smtp_server.handler.received) == 1
    assert smtp_server.handler.received[0].message["Message-ID"] == result["message_id"]
    assert async_result.retries == 1


def test_a_connection_dropped_during_data_is_replaced_and_the_message_sent_once(start_worker, smtp_server):
    from proj.stack.devsmtp import DISCONNECT
    from tasks.email import send_email

    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server), concurrency=1)
    first = send_email.delay(to="ola@example.com", subject="warm", text="t").get(timeout=30)
    smtp_server.handler.fail_next(DISCONNECT)  # the reused connection breaks inside DATA
    async_result = send_email.delay(to="pia@example.com", subject="after", text="t")
    second = async_result.get(timeout=30)
    assert async_result.retries == 1
    assert [r.message["Message-ID"] for r in smtp_server.handler.received] == [
        first["message_id"],
        second["message_id"],
    ]


def test_550_fails_at_once_with_the_reply(start_worker, smtp_server, redis_client):
    from proj.stores.deadletters import DeadLetterStore
    from tasks.email import send_email

    smtp_server.handler.fail_next("550 5.7.1 Rejected by policy")
    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    async_result = send_email.delay(to="frank@example.com", subject="no", text="body")
    with pytest.raises(Exception, match=r"550 5\.7\.1 Rejected by policy"):
        async_result.get(timeout=30)
    assert async_result.state == "FAILURE" and async_result.retries == 0
    assert smtp_server.handler.received == []
    [letter] = wait_for(lambda: DeadLetterStore(redis_client).list(), what="dead letter")
    assert letter.exc_type == "EmailRejectedError" and "550" in letter.message


def test_server_down_then_up_delivers_once(start_worker):
    from tasks.email import send_email

    port = free_port()
    start_worker(EMAIL_QUEUES, env={"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port)})
    async_result = send_email.delay(to="gina@example.com", subject="later", text="body")
    wait_for(lambda: async_result.state == "RETRY", what="a retry after connection refused")
    handler = MailSink()
    controller = start(handler, "127.0.0.1", port)
    try:
        result = async_result.get(timeout=40)
        assert [r.message["Message-ID"] for r in handler.received] == [result["message_id"]]
    finally:
        controller.stop()


def test_partly_refused_recipients_are_reported_not_resent(start_worker, smtp_server):
    from tasks.email import send_email

    smtp_server.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    kwargs = {
        "to": ["hal@example.com", "nobody@example.com"],
        "subject": "s",
        "text": "t",
        "idempotency_key": "partial-1",
    }
    result = send_email.delay(**kwargs).get(timeout=30)
    assert result["accepted"] == ["hal@example.com"]
    assert result["refused"] == {"nobody@example.com": "550 5.1.1 No such user"}
    again = send_email.delay(**kwargs).get(timeout=30)
    assert again["duplicate"] is True and again["message_id"] == result["message_id"]
    assert [r.rcpt_tos for r in smtp_server.handler.received] == [["hal@example.com"]]


def test_same_key_twice_and_same_content_twice_send_once(start_worker, smtp_server):
    from tasks.email import send_email

    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    ivy = {"to": "ivy@example.com", "idempotency_key": "k-1"}
    first = send_email.delay(**ivy, subject="a", text="x").get(timeout=30)
    second = send_email.delay(**ivy, subject="b", text="y").get(timeout=30)
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    third = send_email.delay(to="ivy@example.com", subject="c", text="z").get(timeout=30)
    fourth = send_email.delay(to="ivy@example.com", subject="c", text="z").get(timeout=30)
    assert fourth["duplicate"] is True and fourth["message_id"] == third["message_id"]
    assert len(smtp_server.handler.received) == 2


def test_header_injection_and_bad_addresses_fail_permanently_and_the_worker_stays_up(
    start_worker, smtp_server
):
    from tasks.email import send_email

    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    bad = [
        {"to": "jo@example.com", "subject": "hi\r\nBcc: victim@example.com", "text": "t"},
        {"to": "jo@example.com", "subject": "s", "text": "t", "headers": {"X-A": "v\nBcc: x@example.com"}},
        {"to": "jo@example.com", "subject": "s", "text": "t", "headers": {"Bcc": "x@example.com"}},
        {"to": "jo@example.com\r\nBcc: x@example.com", "subject": "s", "text": "t"},
        {"to": "not-an-address", "subject": "s", "text": "t"},
        {"to": "jo@example.com", "subject": "s", "text": ""},
        {"to": "jo@example.com", "template": "no-such-template"},
        {"to": "jo@example.com", "template": "welcome", "context": {"name": "x"}},
        {"to": "jo@example.com", "subject": "s", "text": "t", "attachments": ["../../etc/passwd"]},
        {"to": "jo@example.com", "subject": "s", "text": "t", "attachments": ["missing.pdf"]},
    ]
    results = [send_email.delay(**kwargs) for kwargs in bad]
    for async_result in results:
        with pytest.raises(Exception, match=r"\S"):
            async_result.get(timeout=30)
        assert async_result.state == "FAILURE" and async_result.retries == 0
        assert type(async_result.result).__name__ == "InvalidEmailError"
    assert send_email.delay(to="jo@example.com", subject="fine", text="t").get(timeout=30)
    assert len(smtp_server.handler.received) == 1


def test_a_long_countdown_waits_in_the_delayed_set_not_in_the_broker(
    start_worker, smtp_server, redis_client, celery_app, monkeypatch
):
    from proj.stores.delayed import DelayedSet
    from tasks.email import send_email

    monkeypatch.setitem(celery_app.conf, "broker_max_countdown", 1)  # production: 30 s
    delayed = DelayedSet(redis_client)
    async_result = send_email.apply_async(
        kwargs={"to": "kim@example.com", "subject": "s", "text": "t"}, countdown=4
    )
    [parked] = delayed.pending()
    assert parked["id"] == async_result.id and parked["queue"] == "email"
    assert parked["due"] > time.time() + 2
    assert redis_client.llen("email") == 0  # nothing for a worker to hold past the visibility timeout
    assert delayed.release_due() == 0  # not due yet
    worker = start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    result = async_result.get(timeout=30)  # the worker's release step moved it onto the queue
    assert [r.message["Message-ID"] for r in smtp_server.handler.received] == [result["message_id"]]
    assert smtp_server.handler.received[0].received_at >= parked["due"]
    assert delayed.pending() == []
    assert "Released 1 delayed message" in worker.log()


def test_send_bulk_chunks_progress_counts_and_no_resend(start_worker, smtp_server):
    from tasks.email import send_bulk

    handler = smtp_server.handler
    handler.rcpt_replies["gone@example.com"] = "550 5.1.1 No such user"
    ctx = {"product": "Proj", "url": "https://example.com"}
    recipients = [{"to": f"r{i}@example.com", "context": {**ctx, "name": f"R{i}"}} for i in range(40)]
    recipients += [
        recipients[3],
        {"to": "not an address", "context": {**ctx, "name": "X"}},
        {"to": "gone@example.com", "context": {**ctx, "name": "Gone"}},
    ]
    start_worker(
        EMAIL_QUEUES,
        env={**smtp_env(smtp_server), "EMAIL_BULK_CHUNK_SIZE": "10", "EMAIL_BULK_CONNECTIONS": "2"},
    )
    # Hold the server after the first chunks so the PROGRESS state is there to be seen.
    handler.on_stored = lambda item: handler.hold_rcpt.set() if len(handler.received) == 20 else None
    async_result = send_bulk.delay(template="welcome", recipients=recipients, idempotency_key="news-1")
    wait_for(
        lambda: async_result.state == "PROGRESS" and async_result.info["sent"] >= 10,
        what="PROGRESS with sent/total",
    )
    assert async_result.info["total"] == 43
    handler.on_stored = None
    handler.hold_rcpt.clear()

    result = async_result.get(timeout=60)
    assert {k: result[k] for k in ("total", "sent", "duplicates", "failed", "deferred")} == {
        "total": 43,
        "sent": 40,
        "duplicates": 1,
        "failed": 2,
        "deferred": 0,
    }
    errors = {f["to"]: f["error"] for f in result["failures"]}
    assert "not a valid email address" in errors["not an address"]
    assert "550 5.1.1 No such user" in errors["gone@example.com"]
    assert sorted(r.rcpt_tos[0] for r in handler.received) == sorted(f"r{i}@example.com" for i in range(40))
    assert handler.received[0].message["Subject"].startswith("Welcome to Proj, R")

    again = send_bulk.delay(template="welcome", recipients=recipients, idempotency_key="news-1")
    again = again.get(timeout=60)
    assert (again["sent"], again["duplicates"]) == (0, 41)
    assert len(handler.received) == 40


def test_proj_send_email_cli(start_worker, smtp_server, worker_env):
    import json
    import subprocess
    import sys

    from tests.harness import ROOT

    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))
    command = [
        sys.executable,
        "-m",
        "proj.cli.main",
        "send-email",
        "--to",
        "max@example.com",
        "--subject",
        "from the CLI",
        "--text",
        "hello",
    ]
    done = subprocess.run(command, cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    [received] = smtp_server.handler.received
    assert received.message["Message-ID"] == printed["message_id"]
    assert printed["accepted"] == ["max@example.com"]

    bad = subprocess.run(
        [*command[:5], "max@example.com\nBcc: x@example.com", *command[6:]],
        cwd=ROOT,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a valid email address" in bad.stderr


def test_property_any_input_through_a_worker_is_sent_or_fails_at_once(start_worker, smtp_server):
    from email import message_from_bytes, policy

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tasks.email import send_email

    start_worker(EMAIL_QUEUES, env=smtp_env(smtp_server))

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        to=st.one_of(st.emails(), st.text(max_size=30)),
        subject=st.text(max_size=80),
        text=st.text(max_size=200),
    )
    def check(to, subject, text):
        before = len(smtp_server.handler.received)
        async_result = send_email.delay(to=to, subject=subject, text=text)
        try:
            value = async_result.get(timeout=30)
        except Exception:
            assert type(async_result.result).__name__ == "InvalidEmailError"
            assert async_result.retries == 0  # a clear permanent error, never a retry loop
            return
        if value["duplicate"]:
            return  # hypothesis may repeat an example: the ledger answers it
        raw = smtp_server.handler.received[before].data
        parsed = message_from_bytes(raw, policy=policy.default)
        assert parsed["Message-ID"] == value["message_id"]
        assert " ".join(parsed["Subject"].split()) == " ".join(subject.split())

    check()


def test_send_bulk_defers_a_4xx_to_its_next_round_and_reports_the_total(start_worker, smtp_server):
    from tasks.email import send_bulk

    ctx = {"product": "Proj", "url": "https://example.com", "name": "N"}
    recipients = [{"to": f"b{i}@example.com", "context": ctx} for i in range(6)]
    smtp_server.handler.fail_next("451 4.3.0 Mailbox busy")  # the first DATA of the round
    start_worker(EMAIL_QUEUES, env={**smtp_env(smtp_server), "EMAIL_BULK_CONNECTIONS": "1"})
    async_result = send_bulk.delay(template="welcome", recipients=recipients, idempotency_key="round-1")
    result = async_result.get(timeout=60)
    assert (result["total"], result["sent"], result["failed"], result["deferred"]) == (6, 6, 0, 0)
    assert async_result.retries == 1  # one more round, for the deferred message only
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == sorted(
        f"b{i}@example.com" for i in range(6)
    )


@dataclass
class _OptionsSink(MailSink):
    """A MailSink that also keeps each accepted message's MAIL FROM parameters (RFC 6152's BODY)."""

    options: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # A server without 8BITMIME (decode_data) hands over text; the bytes on the wire are these.
        envelope.content = envelope.original_content
        self.options.append((list(envelope.mail_options), bytes(envelope.original_content)))
        return await super().handle_DATA(server, session, envelope)


GREETING = "Grüße aus Köln, ½ € für alle"


def test_an_8bit_body_is_declared_with_body_8bitmime_and_arrives_intact(start_worker):
    from tasks.email import send_email

    handler = _OptionsSink()
    controller = start(handler, "127.0.0.1", free_port())  # aiosmtpd offers 8BITMIME
    try:
        start_worker(EMAIL_QUEUES, env=smtp_env(controller))
        html = f"<p>{GREETING}</p>"
        send_email.delay(to="uma@example.com", subject="8bit", text=GREETING, html=html).get(timeout=30)
        send_email.delay(to="uma@example.com", subject="ascii", text="plain ASCII").get(timeout=30)
    finally:
        controller.stop()
    [(options, data), (ascii_options, ascii_data)] = handler.options
    assert options == ["BODY=8BITMIME"] and ascii_options == []
    assert GREETING.encode() in data and b"Content-Transfer-Encoding: 8bit" in data  # sent as UTF-8 bytes
    assert ascii_data.isascii()
    msg = handler.received[0].message
    assert msg.get_body(("plain",)).get_content().rstrip() == GREETING
    assert msg.get_body(("html",)).get_content().rstrip() == f"<p>{GREETING}</p>"


def test_a_server_without_8bitmime_gets_the_8bit_parts_base64_encoded(start_worker):
    from aiosmtpd.controller import Controller

    from tasks.email import send_email

    handler = _OptionsSink()
    # decode_data: aiosmtpd then leaves 8BITMIME out of its EHLO reply and refuses 8-bit bytes.
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), decode_data=True)
    controller.start()
    try:
        start_worker(EMAIL_QUEUES, env=smtp_env(controller))
        send_email.delay(to="val@example.com", subject="7bit", text=GREETING).get(timeout=30)
    finally:
        controller.stop()
    [(options, data)] = handler.options
    assert options == [] and data.isascii() and b"Content-Transfer-Encoding: base64" in data
    assert handler.received[0].message.get_body(("plain",)).get_content().rstrip() == GREETING
