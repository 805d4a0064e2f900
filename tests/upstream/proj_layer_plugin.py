"""pytest plugin for kombu's and Celery's own integration tests: stock components, or proj's layer.

Loaded by tests/upstream/run.py with `-p proj_layer_plugin`; upstream's test files are not changed.

PROJ_UPSTREAM_LAYER=proj switches in, for every kombu connection and Celery app the tests make:

- kombu's `redis://`/`rediss://` transport alias -> proj.integration.kombu_transport:Transport
- Celery's `redis`/`rediss` result backend alias -> proj.integration.result_backend:RedisBackend
  (what `override_backends` in celeryconfig does for proj's app)
- Celery's default `amqp` class -> proj.integration.producer:AMQP (as proj/celery.py passes it)
- the worker consumer step proj.integration.task_events:BatchedTaskEvents, added to every app when
  it is finalized (as proj/celery.py adds it to proj's app)

PROJ_UPSTREAM_LAYER=stock (the default) changes none of them.

PROJ_UPSTREAM_OPTIONS=proj (the default), in BOTH modes so that the comparison is like for like, makes
the two transport options of proj's layer the defaults of kombu's Redis channel (proj's channel
inherits them): `priority_steps = [0]` (one list per queue, which proj's BLMOVE path needs) and
`retry_on_timeout = True`, as celeryconfig's `broker_transport_options` sets them. A test that passes
its own transport options still overrides them. PROJ_UPSTREAM_OPTIONS=upstream keeps kombu's defaults.

PROJ_UPSTREAM_EVIDENCE=<file> writes what was actually in use (transport, backend, amqp class,
consumer steps of Celery's session app) so the runner can check that the switch took effect.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

LAYER = os.environ.get("PROJ_UPSTREAM_LAYER", "stock")
OPTIONS = os.environ.get("PROJ_UPSTREAM_OPTIONS", "proj")
EVIDENCE = os.environ.get("PROJ_UPSTREAM_EVIDENCE", "")
SHARD = os.environ.get("PROJ_UPSTREAM_SHARD", "")  # "i/n": only every n-th test from the i-th (from 0)

PROJ_TRANSPORT = "proj.integration.kombu_transport:Transport"
PROJ_BACKEND = "proj.integration.result_backend:RedisBackend"
PROJ_AMQP = "proj.integration.producer:AMQP"
PROJ_EVENTS_STEP = "proj.integration.task_events:BatchedTaskEvents"

_evidence: dict[str, Any] = {"layer": LAYER, "options": OPTIONS}


def _apply_options() -> None:
    """proj's transport options as the defaults of kombu's Redis channel (both modes alike)."""
    from kombu.transport import redis as kombu_redis

    if OPTIONS == "proj":
        kombu_redis.Channel.priority_steps = [0]
        kombu_redis.Channel.retry_on_timeout = True
    elif OPTIONS != "upstream":
        raise pytest.UsageError(f"PROJ_UPSTREAM_OPTIONS must be proj or upstream, got {OPTIONS!r}")
    _evidence["channel_defaults"] = {
        "priority_steps": list(kombu_redis.Channel.priority_steps),
        "retry_on_timeout": kombu_redis.Channel.retry_on_timeout,
    }


def _add_events_step(app: Any) -> None:
    from proj.integration.task_events import BatchedTaskEvents

    app.steps["consumer"].add(BatchedTaskEvents)


def _switch_in_proj() -> None:
    """Point kombu's and Celery's aliases and defaults at proj's replacements."""
    import celery
    from celery import _state
    from celery.app import backends
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = PROJ_TRANSPORT
        backends.BACKEND_ALIASES[scheme] = PROJ_BACKEND
    celery.Celery.amqp_cls = PROJ_AMQP
    _state.connect_on_app_finalize(_add_events_step)


def pytest_configure(config: pytest.Config) -> None:
    # kombu's integration tests mark tests with env(...); kombu registers it only for its own CI.
    config.addinivalue_line("markers", "env(name): the broker a kombu integration test needs")
    if LAYER not in ("stock", "proj"):
        raise pytest.UsageError(f"PROJ_UPSTREAM_LAYER must be stock or proj, got {LAYER!r}")
    _apply_options()
    if LAYER == "proj":
        _switch_in_proj()
    from kombu.transport import resolve_transport

    _evidence["kombu_transport"] = {s: _qualname(resolve_transport(s)) for s in ("redis", "rediss")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this shard's tests; each test's node id goes in the junit report (to run it again)."""
    if SHARD:
        index, count = (int(part) for part in SHARD.split("/"))
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
        items[:] = [item for i, item in enumerate(items) if i % count == index]
    for item in items:
        item.user_properties.append(("nodeid", item.nodeid))


def pytest_report_header(config: pytest.Config) -> str:
    return f"proj layer plugin: layer={LAYER} options={OPTIONS} {json.dumps(_evidence, sort_keys=True)}"


_session_apps: list[Any] = []


@pytest.fixture(autouse=True)
def _proj_layer_evidence(request: pytest.FixtureRequest) -> None:
    """Keep Celery's shared session app (Celery's suite only) to record what it used at the end."""
    if not _session_apps and "celery_session_app" in request.fixturenames:
        _session_apps.append(request.getfixturevalue("celery_session_app"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for app in _session_apps:
        _evidence["celery"] = {
            "finalized": app.finalized,
            "backend": _qualname(type(app.backend)),
            "amqp": _qualname(type(app.amqp)),
            "producer": _qualname(app.amqp.Producer),
            "consumer_steps": sorted(_qualname(step) for step in app.steps["consumer"]),
        }
    if EVIDENCE:
        with open(EVIDENCE, "w", encoding="utf-8") as file:
            json.dump(_evidence, file, indent=2, sort_keys=True)


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"
