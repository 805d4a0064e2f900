"""RabbitMQ for the tests: a virtual host of its own, proj's app on it, real workers consuming it.

The machine's RabbitMQ at 127.0.0.1:5672 (RABBITMQ_PORT) as guest; without one the tests skip,
except under CI=true, where they fail. A test module imports the fixture_* functions to use the
fixtures by their names (vhost, amqp_url, amqp_app, amqp_worker).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import IN_CI, ROOT, WorkerProcess, free_port

AMQP_HOST, AMQP_PORT = "127.0.0.1", int(os.environ.get("RABBITMQ_PORT", "5672"))


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def rabbitmq_missing() -> str | None:
    """Why the tests cannot run here, or None."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl not on PATH"
    try:
        socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=2).close()
    except OSError as exc:
        return f"no RabbitMQ at {AMQP_HOST}:{AMQP_PORT}: {exc}"
    return None


@pytest.fixture(scope="module", name="vhost")
def fixture_vhost() -> Iterator[str]:
    """A virtual host of its own, deleted afterwards; skip without RabbitMQ, fail in CI."""
    missing = rabbitmq_missing()
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true and {missing}")
        pytest.skip(missing)
    name = f"proj-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module", name="amqp_url")
def fixture_amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


@pytest.fixture(scope="module", name="amqp_app")
def fixture_amqp_app(amqp_url: str, redis_server: Any) -> Any:
    """proj's app as a process on RabbitMQ builds it: celeryconfig read afresh with the AMQP URL."""
    from proj.integration.native_delay import Celery

    # For this module's tests: Celery reads CELERY_BROKER_URL before its configuration, every time.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELERY_BROKER_URL", amqp_url)
        spec = importlib.util.spec_from_file_location("celeryconfig_rabbitmq", ROOT / "celeryconfig.py")
        assert spec is not None and spec.loader is not None
        config = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config)
        app = Celery("proj", amqp="proj.integration.producer:AMQP", set_as_current=False)
        app.config_from_object(config)
        app.loader.override_backends = dict(config.override_backends)
        yield app
        app.close()


@pytest.fixture(name="amqp_worker")
def fixture_amqp_worker(
    amqp_app: Any, amqp_url: str, worker_env: dict[str, str], redis_client: Any
) -> Iterator[Callable[..., WorkerProcess]]:
    """Real `celery -A proj worker` subprocesses on RabbitMQ; every one is stopped by PID."""
    started: list[WorkerProcess] = []

    def start(
        queues: str,
        *,
        pool: str = "threads",
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        """Start one; with wait=False return at once (see ready()) so several start side by side."""
        worker = WorkerProcess(
            queues=queues,
            name=f"rmq{len(started)}-{free_port()}",
            env={**worker_env, "CELERY_BROKER_URL": amqp_url, **(env or {})},
            pool=pool,
            concurrency=concurrency,
        )
        started.append(worker)
        if wait:
            return worker.start(amqp_app)
        worker.proc = subprocess.Popen(
            worker.command(),
            cwd=ROOT,
            env=worker.env,
            stdout=worker.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGTERM, timeout=20)


def ready(worker: WorkerProcess) -> bool:
    """The worker logged that it consumes; raise if it exited first."""
    assert worker.proc is not None
    if worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited early:\n{worker.log()[-3000:]}")
    return " ready." in worker.log()
