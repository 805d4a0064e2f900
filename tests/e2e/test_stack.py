"""`proj up` end to end: what a user does in another shell once the stack says it is ready."""

from __future__ import annotations

import json
import smtplib
import stat
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from email.message import EmailMessage
from typing import Any

import pytest

from tests.e2e.localstack import LocalStack
from tests.harness import wait_for

pytestmark = pytest.mark.e2e

QUEUES = ("email", "email_bulk", "files", "default")


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + b64encode(":".join(auth).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_stack_env_says_where_everything_is(local_stack: LocalStack) -> None:
    exports = local_stack.exports()
    env = local_stack.env
    assert exports["REDIS_URL"] == f"redis://127.0.0.1:{env['REDIS_PORT']}/0"
    assert exports["CELERY_BROKER_URL"] == exports["REDIS_URL"]
    assert exports["FLOWER_URL"] == f"http://127.0.0.1:{env['FLOWER_PORT']}"
    assert exports["SMTP_HOST"] == "127.0.0.1" and exports["SMTP_PORT"] == env["SMTP_PORT"]
    assert exports["FLOWER_USER"] and len(exports["FLOWER_PASSWORD"]) >= 16
    # It holds the Flower password: readable by its owner only, like the stored credentials.
    for path in (local_stack.env_file, local_stack.local_dir / "flower-credentials.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The output says where the generated password is kept, never the password itself.
    assert exports["FLOWER_PASSWORD"] not in local_stack.log(), "the Flower password is printed"
    assert f"password in {local_stack.local_dir / 'flower-credentials.json'}" in local_stack.log()
    # ...but never on a command line, where `ps` would show it to every user of the machine.
    for process in local_stack.tree():
        assert exports["FLOWER_PASSWORD"] not in " ".join(process.cmdline()), process


def test_inspect_ping_answers_from_every_worker(local_stack: LocalStack) -> None:
    result = local_stack.sourced("celery -A proj inspect ping --timeout 5")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("email-1@", "email-2@", "default-1@", "default-2@", "files@"):
        assert node in result.stdout, result.stdout


def test_canary_returns_on_every_queue(local_stack: LocalStack) -> None:
    # Application code in a shell that sourced stack.env: proj's own app, configured by the variables.
    run = local_stack.sourced(f"python -m tests.e2e.canary_client {' '.join(QUEUES)}")
    assert run.returncode == 0, run.stdout + run.stderr
    answers = json.loads(run.stdout.splitlines()[-1])
    assert {q: a["state"] for q, a in answers.items()} == {q: "SUCCESS" for q in QUEUES}
    assert {q: a["result"]["queue"] for q, a in answers.items()} == {q: q for q in QUEUES}
    assert answers["files"]["result"]["hostname"].startswith("files@")
    assert answers["default"]["result"]["hostname"].startswith("default-")
    for queue in ("email", "email_bulk"):
        assert answers[queue]["result"]["hostname"].startswith(("email-1@", "email-2@"))


def test_flower_requires_credentials_and_lists_every_worker(local_stack: LocalStack) -> None:
    exports = local_stack.exports()
    url = exports["FLOWER_URL"] + "/api/workers?refresh=1"
    assert _get(url)[0] == 401
    assert _get(url, (exports["FLOWER_USER"], "wrong"))[0] == 401

    def workers() -> Any:
        status, body = _get(url, (exports["FLOWER_USER"], exports["FLOWER_PASSWORD"]))
        assert status == 200
        names = sorted(json.loads(body))
        expected = ["default-1", "default-2", "email-1", "email-2", "files"]
        return names if [n.split("@")[0] for n in names] == expected else None

    assert wait_for(workers, timeout=30, interval=0.5, what="Flower to list every worker")


def test_flower_metrics_require_credentials_too(local_stack: LocalStack) -> None:
    exports = local_stack.exports()
    metrics = exports["FLOWER_URL"] + "/metrics"
    assert _get(metrics)[0] == 401
    assert _get(metrics, (exports["FLOWER_USER"], "wrong"))[0] == 401
    status, body = _get(metrics, (exports["FLOWER_USER"], exports["FLOWER_PASSWORD"]))
    assert status == 200 and b"flower_events_total" in body
    # proj's own series, read from the stack's Redis (tests/integration/test_metrics.py checks values).
    assert b"proj_redis_up 1.0" in body and b'proj_queue_messages{queue="email"}' in body
    assert _get(exports["FLOWER_URL"] + "/healthcheck") == (200, b"OK")


def test_mail_sent_with_smtplib_lands_under_local_mail(local_stack: LocalStack) -> None:
    exports = local_stack.exports()
    subject = f"e2e {uuid.uuid4()}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.test", "user@example.test", subject
    message.set_content("Hello from the end-to-end test.")
    with smtplib.SMTP(exports["SMTP_HOST"], int(exports["SMTP_PORT"]), timeout=10) as client:
        client.send_message(message)
    mail_dir = local_stack.local_dir / "mail"

    def stored() -> list[str]:
        return [p.name for p in mail_dir.glob("*.eml") if subject in p.read_text(errors="replace")]

    assert wait_for(stored, timeout=10, what="the message as an .eml file")
