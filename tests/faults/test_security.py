"""Redis with `requirepass` and an ACL user: every process works with the URL's credentials, refuses
wrong ones with one line, and no secret (Redis, SMTP, Flower passwords) shows up anywhere.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proj.settings import Settings
from proj.stack.plan import banner, plan
from tests.e2e.localstack import LocalStack, stack_environ
from tests.faults.scenario import Outcome, report
from tests.harness import ROOT, RedisServer, WorkerProcess, free_port, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

VENV_BIN = Path(sys.executable).parent
# Distinct, unguessable strings: any occurrence in captured output is a leak, never a coincidence.
REDIS_PASSWORD = f"redispw-{secrets.token_hex(8)}"
DEFAULT_PASSWORD = f"defaultpw-{secrets.token_hex(8)}"  # requirepass: the `default` user's
SMTP_PASSWORD = f"smtppw-{secrets.token_hex(8)}"
FLOWER_PASSWORD = f"flowerpw-{secrets.token_hex(8)}"
WRONG_PASSWORD = f"wrongpw-{secrets.token_hex(8)}"
SECRETS = (REDIS_PASSWORD, DEFAULT_PASSWORD, SMTP_PASSWORD, FLOWER_PASSWORD, WRONG_PASSWORD)
PROJ_ACL = ("ACL", "SETUSER", "proj", "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all")
# Bounded: a process that retries wrong credentials forever fails the test instead of hanging it.
REFUSAL_TIMEOUT = 60


def leaks(*texts: str) -> list[str]:
    """Each secret found in the texts (with the text's start, to tell where)."""
    return [f"{secret} in {text[:80]!r}" for text in texts for secret in SECRETS if secret in text]


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[RedisServer]:
    """A private Redis: the default user needs a password, proj logs in as the ACL user `proj`."""
    server = RedisServer().start()
    client = server.client()
    client.execute_command(*PROJ_ACL)
    client.config_set("requirepass", DEFAULT_PASSWORD)
    client.close()
    yield server
    server.stop()


def redis_url(server: RedisServer, credentials: str = f"proj:{REDIS_PASSWORD}@", db: int = 0) -> str:
    return f"redis://{credentials}127.0.0.1:{server.port}/{db}"


def proj_env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of one scenario: only the URL's credentials reach Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "SMTP_", "REDIS_"))}
    env.update(
        REDIS_URL=url,
        CELERY_BROKER_URL=url,
        CELERY_RESULT_BACKEND=url,
        FILES_ROOT=str(tmp_path / "files"),
        PROJ_LOCAL_DIR=str(tmp_path / "local"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def authed_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_url(server))


def redis_contents(client: redis.Redis) -> str:
    """Every key and value of the database as text: results, dead letters, queues, events, beat."""
    parts = []
    readers = {
        "string": lambda k: client.get(k),
        "list": lambda k: client.lrange(k, 0, -1),
        "hash": lambda k: client.hgetall(k),
        "set": lambda k: client.smembers(k),
        "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
    }
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value = readers.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {kind} {value!r}")
    return "\n".join(parts)


def http(url: str, password: str | None = FLOWER_PASSWORD) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if password is not None:
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def flower_command(port: int) -> list[str]:
    return [sys.executable, "-m", "proj.integration.flower", "--address=127.0.0.1", f"--port={port}"]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command that must end by itself within the bound; stdout and stderr together."""
    return subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=REFUSAL_TIMEOUT,
    )


# --- wrong credentials --------------------------------------------------------------------------


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    celery = [sys.executable, "-m", "celery", "-A", "proj"]
    return {
        "worker": [
            *celery,
            "worker",
            "-Q",
            "default",
            "-P",
            "solo",
            "-n",
            f"refused-{free_port()}@%h",
            "-l",
            "INFO",
        ],
        "beat": [*celery, "beat", "-s", str(tmp_path / "beat-schedule"), "-l", "INFO"],
        "flower": flower_command(free_port()),
        "status": [str(VENV_BIN / "proj"), "status", "--json"],
        "dlq": [str(VENV_BIN / "proj"), "dlq", "list"],
        "up": [str(VENV_BIN / "proj"), "up"],
    }


@pytest.mark.parametrize("kind", ["worker", "beat", "flower", "status", "dlq", "up"])
@pytest.mark.parametrize(
    ("credentials", "code"), [(f"proj:{WRONG_PASSWORD}@", "WRONGPASS"), ("", "NOAUTH")], ids=["wrong", "none"]
)
def test_wrong_credentials_end_the_process_with_one_clear_line(
    secured_redis: RedisServer, tmp_path: Path, kind: str, credentials: str, code: str
) -> None:
    url = redis_url(secured_redis, credentials)
    env = proj_env(
        url,
        tmp_path,
        FLOWER_BASIC_AUTH=f"admin:{FLOWER_PASSWORD}",
        SMTP_PASSWORD=SMTP_PASSWORD,
        FLOWER_PORT=str(free_port()),
        SMTP_PORT=str(free_port()),
    )
    done = run(_commands(tmp_path)[kind], env)
    assert done.returncode != 0, done.stdout
    masked = redis_url(secured_redis, "proj:**@" if credentials else "")
    [line] = [line for line in done.stdout.splitlines() if "refused the credentials" in line]
    assert masked in line and code in line, line
    assert "Traceback" not in done.stdout, done.stdout
    assert not leaks(done.stdout)


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = _commands(log.parent)["worker"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_until_waiting(log: Path) -> None:
    """Until the worker says it cannot reach Redis and will ask again (its step, signal handlers set)."""
    wait_for(
        lambda: "checking the credentials again" in log.read_text(errors="replace"),
        timeout=60,
        interval=0.2,
        what="the worker to wait for Redis",
    )


def test_a_worker_waiting_for_redis_refuses_wrong_credentials_once_redis_answers(tmp_path: Path) -> None:
    server = RedisServer()  # its port is chosen, nothing listens there yet
    log = tmp_path / "worker.log"
    worker = _worker(proj_env(redis_url(server, f"proj:{WRONG_PASSWORD}@"), tmp_path), log)
    try:
        _wait_until_waiting(log)
        server.start()
        server.client().execute_command(*PROJ_ACL)
        assert worker.wait(REFUSAL_TIMEOUT) == 1
    finally:
        stop_process(worker)
        server.stop()
    assert "refused the credentials: WRONGPASS" in log.read_text() and not leaks(log.read_text())


def test_a_worker_waiting_for_redis_stops_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = _worker(proj_env(f"redis://proj:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0", tmp_path), log)
    try:
        _wait_until_waiting(log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(REFUSAL_TIMEOUT) == 0, log.read_text()  # a warm shutdown, not a SIGKILL
    finally:
        stop_process(worker)
    assert not leaks(log.read_text())


@pytest.mark.parametrize(
    "auth",
    [{"FLOWER_BASIC_AUTH": "admin:"}, {}, {"FLOWER_BASIC_AUTH": ":pw"}],
    ids=["empty", "none", "no-user"],
)
def test_flower_refuses_to_start_without_a_password(
    secured_redis: RedisServer, tmp_path: Path, auth: dict[str, str]
) -> None:
    done = run(flower_command(free_port()), proj_env(redis_url(secured_redis), tmp_path, **auth))
    assert done.returncode == 2, done.stdout
    assert done.stdout.startswith("flower: refusing to start:") and len(done.stdout.splitlines()) == 1


def test_the_stack_banner_says_where_secrets_are_kept_not_what_they_are(tmp_path: Path) -> None:
    url = f"redis://proj:{REDIS_PASSWORD}@10.0.0.5:6379/0"
    settings = Settings.from_env(
        {"PROJ_LOCAL_DIR": str(tmp_path), "FLOWER_PORT": str(free_port()), "SMTP_PORT": str(free_port())}
        | {"REDIS_URL": url, "FLOWER_PASSWORD": FLOWER_PASSWORD}
    )
    text = banner(plan(settings, tmp_path))
    assert not leaks(text), text
    assert "redis://proj:**@10.0.0.5:6379/0" in text and "password from FLOWER_PASSWORD" in text


# --- the right credentials ------------------------------------------------------------------------


@pytest.fixture
def secured_app(secured_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A client app of proj's configuration on the secured Redis."""
    from celery import Celery

    # Celery reads these two variables before its configuration: this test's, not the session's.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.setenv(name, redis_url(secured_redis))
    app = Celery("proj-security", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=redis_url(secured_redis), result_backend=redis_url(secured_redis))
    authed_client(secured_redis).flushdb()
    yield app
    app.close()


@pytest.fixture
def smtp_with_auth(tls_ca: Any) -> Iterator[Any]:
    """An SMTP server that requires STARTTLS and AUTH as mailer/SMTP_PASSWORD."""
    from proj.stack.devsmtp import MailSink, start

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.server_cert.configure_cert(context)
    handler = MailSink()
    controller = start(
        handler,
        "127.0.0.1",
        free_port(),
        tls_context=context,
        require_starttls=True,
        auth=("mailer", SMTP_PASSWORD),
    )
    controller.handler = handler
    yield controller
    controller.stop()


def test_every_process_works_with_the_credentials_and_no_secret_leaks(
    secured_redis: RedisServer, secured_app: Any, smtp_with_auth: Any, tls_ca: Any, tmp_path: Path
) -> None:
    env = proj_env(
        redis_url(secured_redis),
        tmp_path,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_with_auth.port),
        SMTP_SECURITY="starttls",
        SMTP_USERNAME="mailer",
        SMTP_PASSWORD=SMTP_PASSWORD,
        SMTP_CA_FILE=tls_ca.ca_file,
        FILES_CLEAN_INTERVAL="1",
    )
    client = authed_client(secured_redis)
    outputs: dict[str, str] = {}
    worker = WorkerProcess(queues="default,email", name=f"secure-{free_port()}", env=env, concurrency=2)
    flower_port, flower_log = free_port(), tmp_path / "flower.log"
    flower = beat = None
    try:
        worker.start(secured_app)
        flower = subprocess.Popen(
            flower_command(flower_port),
            cwd=ROOT,
            env={**env, "FLOWER_BASIC_AUTH": f"admin:{FLOWER_PASSWORD}"},
            stdout=flower_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        flower_url = f"http://127.0.0.1:{flower_port}"
        wait_for(lambda: _flower_lists(flower_url, worker, flower), timeout=60, interval=0.2, what="Flower")

        canary = secured_app.send_task("tasks.health.canary")
        mail = secured_app.send_task(
            "tasks.email.send_email", kwargs={"to": "ann@example.com", "subject": "secured", "text": "hi"}
        )
        bad = secured_app.send_task("tasks.email.send_email", kwargs={"to": "not an address", "text": "x"})
        assert canary.get(timeout=30)["queue"] == "default"
        assert mail.get(timeout=30)["message_id"]
        bad.get(timeout=30, propagate=False)
        assert bad.state == "FAILURE"
        [received] = smtp_with_auth.handler.received
        assert received.message["Subject"] == "secured"  # sent after STARTTLS and AUTH as mailer

        beat_log = tmp_path / "beat.log"
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "proj", "beat", "-s", str(tmp_path / "beat-schedule")],
            cwd=ROOT,
            env=env,
            stdout=beat_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        # Nothing consumes `files`: the schedule entry's message waits there, sent through the ACL user.
        wait_for(lambda: client.llen("files") >= 1, timeout=60, interval=0.2, what="beat's message in Redis")
        assert b"tasks.files.clean_temp_files" in client.lindex("files", 0)

        wait_for(
            lambda: _flower_has_task(flower_url, bad.id), timeout=30, interval=0.2, what="Flower's tasks"
        )
        assert http(f"{flower_url}/api/workers", password=None)[0] == 401
        assert http(f"{flower_url}/metrics", password="wrong")[0] == 401
        for page in (
            "/",
            "/workers",
            "/tasks",
            "/broker",
            f"/worker/{worker.nodename}",
            "/api/workers?refresh=1",
            "/api/tasks",
            f"/api/task/info/{bad.id}",
            "/api/queues/length",
            "/metrics",
        ):
            status, body = http(flower_url + page)
            assert status == 200, (page, status, body[:300])
            outputs[f"flower {page}"] = body
        assert f"redis://proj:**@127.0.0.1:{secured_redis.port}/0" in outputs["flower /broker"]

        for command in (["status", "--json"], ["dlq", "list"], ["dlq", "show", bad.id]):
            done = run([str(VENV_BIN / "proj"), *command], env)
            assert done.returncode == 0, done.stdout
            outputs[f"proj {' '.join(command)}"] = done.stdout
        status = json.loads(outputs["proj status --json"])
        assert status["dead_letters"] == 1 and worker.nodename in status["workers"]
        assert bad.id in outputs["proj dlq show " + bad.id]
    finally:
        for proc in (beat, flower):
            if proc is not None:
                stop_process(proc, signal.SIGTERM)
        worker.stop()
    outputs["worker log"] = worker.log()
    outputs["beat log"] = beat_log.read_text(errors="replace")
    outputs["flower log"] = flower_log.read_text(errors="replace")
    outputs["redis"] = redis_contents(client)
    client.close()
    assert "Connected to" in outputs["worker log"] and "proj:**@" in outputs["worker log"]
    assert canary.id in outputs["redis"] and "proj:dlq:entries" in outputs["redis"]
    found = [f"{where}: {leak}" for where, text in outputs.items() for leak in leaks(text)]
    report(Outcome("security", sent=3, done=3, lost=0, duplicated=0, note=f"secrets found: {len(found)}"))
    assert not found, found


def _flower_lists(url: str, worker: WorkerProcess, flower: subprocess.Popen[bytes] | None) -> bool:
    assert flower is not None
    if flower.poll() is not None:
        raise RuntimeError(f"flower exited with {flower.returncode}")
    try:
        status, body = http(f"{url}/api/workers?refresh=1")
    except OSError:
        return False
    return status == 200 and worker.nodename in body


def _flower_has_task(url: str, task_id: str) -> bool:
    status, body = http(f"{url}/api/tasks")
    return status == 200 and task_id in body


@pytest.mark.e2e
@pytest.mark.slow
def test_the_local_stack_runs_on_the_secured_redis_and_prints_no_secret(
    secured_redis: RedisServer, tmp_path: Path
) -> None:
    # Database 3: the stack's workers answer only pings of this test.
    url = redis_url(secured_redis, db=3)
    local_dir = tmp_path / "local"
    env = stack_environ(
        local_dir, REDIS_URL=url, FLOWER_PASSWORD=FLOWER_PASSWORD, SMTP_PASSWORD=SMTP_PASSWORD
    )
    stack = LocalStack(local_dir, env).start()
    try:
        run_canary = stack.sourced("python -m tests.e2e.canary_client default email")
        assert run_canary.returncode == 0, run_canary.stdout + run_canary.stderr
        states = json.loads(run_canary.stdout.splitlines()[-1])
        assert {q: r["state"] for q, r in states.items()} == {"default": "SUCCESS", "email": "SUCCESS"}
    finally:
        assert not stack.stop(), stack.log()[-3000:]
    log = stack.log()
    assert "redis://proj:**@" in log and "password from FLOWER_PASSWORD" in log
    assert not leaks(log), log[-3000:]
