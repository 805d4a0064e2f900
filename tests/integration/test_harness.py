"""The harness itself: the private Redis, both kinds of worker, and the scriptable SMTP server."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from proj.stack.devsmtp import DISCONNECT

pytestmark = pytest.mark.integration


def test_private_redis_is_not_the_system_one(redis_server, redis_client):
    assert redis_server.port != 6379
    assert redis_client.ping()
    assert celery_url_points_at(redis_server.url)


def celery_url_points_at(url: str) -> bool:
    from proj.celery import app

    return bool(app.conf.broker_url == url and app.conf.result_backend == url)


def test_canary_through_subprocess_worker(start_worker, celery_app):
    from tasks.health import canary

    worker = start_worker("default")
    result = canary.delay().get(timeout=20)
    assert result["hostname"] == worker.nodename
    assert result["queue"] == "default"


def test_canary_through_inprocess_worker(inprocess_worker, celery_app):
    from tasks.health import canary

    assert canary.delay().get(timeout=20)["queue"] == "default"


def _send(port: int, subject: str = "hi") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.sendmail("a@example.com", ["b@example.com"], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_smtp_server_records_and_plays_scripted_faults(smtp_server):
    handler = smtp_server.handler
    handler.fail_next("451 4.3.0 Try again later", "550 5.7.1 Rejected", DISCONNECT)
    with pytest.raises(smtplib.SMTPDataError) as first:
        _send(smtp_server.port)
    with pytest.raises(smtplib.SMTPDataError) as second:
        _send(smtp_server.port)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        _send(smtp_server.port)
    _send(smtp_server.port, "finally")
    assert (first.value.smtp_code, second.value.smtp_code) == (451, 550)
    assert [r.message["Subject"] for r in handler.received] == ["finally"]


def test_smtp_server_refuses_a_scripted_recipient(smtp_server):
    smtp_server.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    with smtplib.SMTP("127.0.0.1", smtp_server.port, timeout=5) as client:
        refused = client.sendmail("a@example.com", ["b@example.com", "nobody@example.com"], b"\r\nx\r\n")
    assert refused == {"nobody@example.com": (550, b"5.1.1 No such user")}
    assert smtp_server.handler.received[0].rcpt_tos == ["b@example.com"]


def test_tls_server_requires_starttls_then_auth(smtp_server_tls):
    context = ssl.create_default_context(cafile=smtp_server_tls.ca_file)
    with (
        smtplib.SMTP("127.0.0.1", smtp_server_tls.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPSenderRefused),
    ):
        client.sendmail("a@example.com", ["b@example.com"], b"\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", smtp_server_tls.port, timeout=5) as client:
        client.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("user", "wrong")
        client.login("user", "secret")
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: tls\r\n\r\nx\r\n")
    assert smtp_server_tls.handler.received[0].message["Subject"] == "tls"
