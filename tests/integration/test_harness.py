"""The harness itself: canary through a real worker subprocess."""

import pytest

pytestmark = pytest.mark.integration


def test_canary_through_subprocess_worker(start_worker, celery_app):
    from tasks.health import canary

    worker = start_worker("default")
    result = canary.delay().get(timeout=20)
    assert result["hostname"] == worker.nodename
    assert result["queue"] == "default"


def test_smtp_server_records(smtp_server):
    import smtplib

    with smtplib.SMTP("127.0.0.1", smtp_server.port, timeout=5) as client:
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
    assert smtp_server.handler.received[0].message["Subject"] == "hi"
