"""Session-wide test environment: a private Redis started before anything imports Celery."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import IN_CI, ROOT, RedisServer, WorkerProcess, free_port

_REDIS: RedisServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Start the private Redis and point every later import of celeryconfig at it."""
    global _REDIS
    if os.environ.get("PROJ_TEST_NO_REDIS") == "1":
        return
    _REDIS = RedisServer().start()
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ[name] = _REDIS.url
    # Short retry delays keep retry tests in seconds; production defaults stay in settings.
    os.environ.setdefault("EMAIL_RETRY_BACKOFF_MAX", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for pytest-xdist; with PROJ_STOCK_CELERY=1 skip the replacements' own tests."""
    _group_for_xdist(items)
    import celeryconfig

    if not celeryconfig.proj_stock_celery:
        return
    skip = pytest.mark.skip(reason="tests a replacement that PROJ_STOCK_CELERY=1 turns off")
    for item in items:
        if item.get_closest_marker("layer"):
            item.add_marker(skip)


def _group_for_xdist(items: list[pytest.Item]) -> None:
    """`make test` runs pytest-xdist with --dist loadgroup: a test file's tests stay in one process
    (module fixtures, a RabbitMQ virtual host, a stack), and the fault scenarios run one after
    another in one process, so no two of them load the machine at once."""
    for item in items:
        group = "faults" if item.get_closest_marker("faults") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


# The fault scenarios' lines, gathered from the test reports: with pytest-xdist they are printed in
# the worker processes, and only the reports reach the process that writes the summary.
_SCENARIO_LINES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Carry the lines a test printed with tests.faults.scenario.report in its teardown report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "teardown":
        from tests.faults.scenario import LINES

        report.user_properties.extend(("scenario", line) for line in LINES)
        LINES.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SCENARIO_LINES.extend(value for name, value in report.user_properties if name == "scenario")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault scenarios' one-line figures, together at the end of the output."""
    if _SCENARIO_LINES:
        terminalreporter.section("fault scenarios")
        for line in _SCENARIO_LINES:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _REDIS is not None:
        _REDIS.stop()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """The private Redis of this test session."""
    assert _REDIS is not None, "the private Redis did not start"
    return _REDIS


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    """A client on an empty database; flushed before and after the test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture(scope="session")
def celery_app(redis_server: RedisServer) -> Any:
    """proj's own app, configured from celeryconfig against the private Redis."""
    from proj.celery import app

    app.loader.import_default_modules()
    return app


@pytest.fixture
def files_root(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    root.mkdir()
    return root


@pytest.fixture
def worker_env(redis_server: RedisServer, tmp_path: Path, files_root: Path) -> dict[str, str]:
    """The environment a worker subprocess runs with: private Redis, temp storage."""
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_server.url,
        CELERY_BROKER_URL=redis_server.url,
        CELERY_RESULT_BACKEND=redis_server.url,
        FILES_ROOT=str(files_root),
        PROJ_LOCAL_DIR=str(tmp_path / "local"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_worker(
    celery_app: Any, worker_env: dict[str, str], redis_client: Any
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory for real `celery -A proj worker` subprocesses; every one is stopped by PID."""
    started: list[WorkerProcess] = []

    def start(
        queues: str,
        *,
        name: str | None = None,
        pool: str = "threads",
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> WorkerProcess:
        worker = WorkerProcess(
            queues=queues,
            name=name or f"w{len(started)}-{free_port()}",
            env={**worker_env, **(env or {})},
            pool=pool,
            concurrency=concurrency,
            extra=extra,
        )
        started.append(worker)
        return worker.start(celery_app)

    yield start
    for worker in started:
        if worker.stop(signal.SIGTERM, timeout=20) is None:
            continue


@pytest.fixture
def inprocess_worker(celery_app: Any, redis_client: Any) -> Iterator[Any]:
    """A fast in-process worker thread (solo pool) consuming every queue."""
    from celery.contrib.testing.worker import start_worker

    queues = [q.name for q in celery_app.conf.task_queues]
    with start_worker(
        celery_app, pool="solo", perform_ping_check=False, queues=queues, shutdown_timeout=20
    ) as worker:
        yield worker


# --- SMTP -------------------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    """A real SMTP server (aiosmtpd) on a free port; script faults with `.handler.fail_next()`."""
    from proj.stack.devsmtp import MailSink, start

    handler = MailSink()
    controller = start(handler, "127.0.0.1", free_port())
    controller.handler = handler
    yield controller
    controller.stop()


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A throwaway CA and a server certificate for 127.0.0.1 (trustme)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    ca.ca_file = str(folder / "ca.pem")
    ca.server_cert = cert
    return ca


@pytest.fixture
def smtp_server_tls(tls_ca: Any) -> Iterator[Any]:
    """An SMTP server that requires STARTTLS and then AUTH as user/secret."""
    from proj.stack.devsmtp import MailSink, start

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.server_cert.configure_cert(context)
    handler = MailSink()
    controller = start(
        handler, "127.0.0.1", free_port(), tls_context=context, require_starttls=True, auth=("user", "secret")
    )
    controller.handler = handler
    controller.ca_file = tls_ca.ca_file
    yield controller
    controller.stop()


# Email workers consume both email queues, as in the local stack and compose.
EMAIL_QUEUES = "email,email_bulk"
# A killed worker's messages come back after the lease or visibility timeout: seconds here, minutes
# in production; a redelivered copy waits out its first run's ledger window (2 x SMTP_TIMEOUT + 10 s).
FAST_REDELIVERY = {
    "TASK_TIME_LIMIT": "4",
    "TASK_SOFT_TIME_LIMIT": "3",
    "BROKER_MAX_COUNTDOWN": "1",
    "BROKER_VISIBILITY_TIMEOUT": "6",
    "BROKER_RESTORE_INTERVAL": "1",
    "BROKER_INFLIGHT_LEASE": "6",
}


def smtp_env(controller: Any) -> dict[str, str]:
    """Worker environment that sends mail to `controller`."""
    return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(controller.port)}


__all__ = ["EMAIL_QUEUES", "FAST_REDELIVERY", "IN_CI", "ROOT", "smtp_env", "socket"]
