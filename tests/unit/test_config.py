"""The Celery configuration: routing, serialisation and the timeout ordering delivery relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

import celeryconfig
from tests.harness import ROOT

DECLARED_QUEUES = {"email", "email_bulk", "files", "default"}

# The public contract: application code and routes depend on these names.
CONTRACT_TASKS = {
    "tasks.health.canary": "default",
    "tasks.email.send_email": "email",
    "tasks.email.send_bulk": "email_bulk",
    "tasks.files.inspect_file": "files",
    "tasks.files.make_thumbnails": "files",
    "tasks.files.extract_archive": "files",
    "tasks.files.import_csv": "files",
    "tasks.files.compress": "files",
    "tasks.files.process_upload": "files",
}


def _app_tasks() -> dict[str, object]:
    from proj.celery import app

    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def _queue_of(name: str) -> str:
    from proj.celery import app

    return str(app.amqp.router.route({}, name)["queue"].name)


def test_declared_queues_are_exactly_the_four_workloads():
    assert {q.name for q in celeryconfig.task_queues} == DECLARED_QUEUES
    assert celeryconfig.task_create_missing_queues is False


def test_every_registered_task_routes_to_a_declared_queue():
    for name in _app_tasks():
        assert _queue_of(name) in DECLARED_QUEUES, name


@pytest.mark.parametrize("name,queue", sorted(CONTRACT_TASKS.items()))
def test_contract_task_is_registered_and_routed(name, queue):
    assert name in _app_tasks(), f"{name} is part of the public contract but not registered"
    assert _queue_of(name) == queue


def test_only_json_is_accepted():
    from proj.celery import app

    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == app.conf.result_serializer == "json"


def test_delivery_is_at_least_once():
    assert celeryconfig.task_acks_late is True
    assert celeryconfig.task_reject_on_worker_lost is True


def test_visibility_timeout_outlasts_hard_limit_plus_longest_broker_countdown():
    visibility = celeryconfig.broker_transport_options["visibility_timeout"]
    assert celeryconfig.task_soft_time_limit < celeryconfig.task_time_limit
    assert visibility > celeryconfig.task_time_limit + celeryconfig.broker_max_countdown
    assert celeryconfig.result_backend_transport_options["visibility_timeout"] == visibility
    # Default minutes, not Celery's hour: a killed worker's tasks come back within this.
    assert visibility <= 15 * 60


def test_retry_delays_past_the_broker_countdown_are_parked_by_every_producer_of_the_app():
    from proj.celery import app
    from proj.integration.parking import ParkingProducer

    # Retries back off up to EMAIL_RETRY_BACKOFF_MAX (600 s), past what the broker holds (30 s):
    # they must leave through a producer that parks them, whichever producer publishes them.
    assert issubclass(app.amqp.Producer, ParkingProducer)
    assert issubclass(app.amqp.producer_pool.Producer, ParkingProducer)
    assert app.amqp.Producer.app_conf.broker_max_countdown == celeryconfig.broker_max_countdown


def test_task_time_limits_fit_in_the_visibility_timeout():
    visibility = celeryconfig.broker_transport_options["visibility_timeout"]
    for name, task in _app_tasks().items():
        hard = getattr(task, "time_limit", None) or celeryconfig.task_time_limit
        assert hard + celeryconfig.broker_max_countdown < visibility, name


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with only `env` (and no PATH) as its environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_inconsistent_timeouts_are_refused_at_import():
    proc = _python("import celeryconfig", {"BROKER_VISIBILITY_TIMEOUT": "100", "TASK_TIME_LIMIT": "300"})
    assert proc.returncode != 0
    assert "BROKER_VISIBILITY_TIMEOUT must exceed" in proc.stderr


def test_celeryconfig_imports_alone():
    code = "import celeryconfig, sys; assert 'proj' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


_COMPONENTS = (
    "from proj.celery import app\n"
    "conn = app.connection_for_write()\n"
    "print(conn.get_transport_cls().__module__)\n"
    "print(type(app.backend).__module__)\n"
    "print('BatchedTaskEvents' in {s.__name__ for s in app.steps['consumer']})\n"
)


@pytest.mark.parametrize(
    ("switch", "expected"),
    [
        (
            "",
            [
                "proj.integration.kombu_transport",
                "proj.integration.result_backend",
            ],
        ),
        ("1", ["kombu.transport.redis", "celery.backends.redis"]),
    ],
)
def test_proj_stock_celery_switches_every_replacement(switch, expected):
    proc = _python(_COMPONENTS, {"REDIS_URL": "redis://127.0.0.1:1/0", "PROJ_STOCK_CELERY": switch})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*expected, "False" if switch else "True"]


def test_a_mistyped_switch_is_refused_at_import():
    proc = _python("import celeryconfig", {"PROJ_STOCK_CELERY": "maybe"})
    assert proc.returncode != 0 and "PROJ_STOCK_CELERY must be 1 or 0" in proc.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CELERY_BROKER_URL": "redis://b:6379/0", "REDIS_URL": "redis://r:6379/0"}, "redis://b:6379/0"),
        (
            {"CELERY_BROKER_URL": "sentinel://s:26379/0", "REDIS_URL": "redis://r:6379/0"},
            "sentinel://s:26379/0",
        ),
        (
            {"CELERY_BROKER_URL": "amqp://guest:guest@q:5672/v", "REDIS_URL": "redis://r:6379/0"},
            "redis://r:6379/0",
        ),
        ({"CELERY_BROKER_URL": "amqp://q:5672//"}, "redis://127.0.0.1:6379/0"),
        ({"REDIS_URL": "redis://r:6379/0"}, "redis://r:6379/0"),
    ],
)
def test_proj_stores_use_the_broker_only_when_it_is_redis(env, expected):
    from proj.settings import Settings

    assert Settings.from_env(env).redis_url == expected


def test_a_rabbitmq_broker_makes_every_queue_a_quorum_queue_on_a_topic_exchange():
    code = (
        "import celeryconfig as c; "
        "print(sorted((q.name, q.exchange.type, q.queue_arguments['x-queue-type'], "
        "q.queue_arguments['x-delivery-limit']) for q in c.task_queues), c.broker_transport_options)"
    )
    env = {
        "PATH": "",
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/v",
        "BROKER_DELIVERY_LIMIT": "3",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    expected = sorted((name, "topic", "quorum", 3) for name in DECLARED_QUEUES)
    assert out.stdout.strip() == f"{expected} {{'confirm_publish': True}}"


@pytest.mark.parametrize(
    ("countdown", "eta_in", "expected"),
    [(0.4, None, (1, None)), (1.5, None, (1.5, None)), (None, 0.3, (1, None)), (0, None, (0, None))],
)
def test_a_sub_second_delay_becomes_one_second_for_native_delayed_delivery(countdown, eta_in, expected):
    from datetime import UTC, datetime, timedelta

    from proj.integration.native_delay import whole_second_delay

    now = datetime.now(UTC)
    eta = None if eta_in is None else now + timedelta(seconds=eta_in)
    assert whole_second_delay(countdown, eta, now) == expected
