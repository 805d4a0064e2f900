"""Flower of the local stack in a real browser (Playwright driving Debian's Chromium)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.localstack import LocalStack
from tests.harness import IN_CI, RedisServer, flower_process, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; missing it fails in CI and skips only on a developer's machine."""
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        if IN_CI:
            pytest.fail("chromium is not installed (make browser installs it)")
        pytest.skip("chromium is not installed; `make browser` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _canary(stack: LocalStack, queue: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """Run one canary through the stack from another shell; return its id and final state."""
    run = stack.sourced(f"python -m tests.e2e.canary_client --kwargs '{json.dumps(kwargs)}' {queue}")
    assert run.returncode == 0, run.stdout + run.stderr
    task_id = json.loads(run.stdout.splitlines()[0])[queue]
    return task_id, json.loads(run.stdout.splitlines()[-1])[queue]["state"]


def test_flower_in_a_browser(local_stack: LocalStack, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import Error, expect

    ok_id, ok_state = _canary(local_stack, "files", {})
    failed_id, failed_state = _canary(local_stack, "default", {"hold": "not a number"})
    assert (ok_state, failed_state) == ("SUCCESS", "FAILURE")
    exports = local_stack.exports()
    url = exports["FLOWER_URL"]

    anonymous = browser.new_context()
    page = anonymous.new_page()
    try:
        response = page.goto(f"{url}/tasks")
        refused = response is not None and response.status == 401 and failed_id not in response.text()
    except Error as exc:  # Chromium turns a 401 with no way to log in into this navigation error
        refused = "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
    assert refused
    anonymous.close()

    context = browser.new_context(
        http_credentials={"username": exports["FLOWER_USER"], "password": exports["FLOWER_PASSWORD"]}
    )
    page = context.new_page()
    response = page.goto(f"{url}/tasks")
    assert response is not None and response.status == 200
    rows = page.locator("#tasks-table tbody tr")
    expect(rows.filter(has_text=ok_id)).to_contain_text("SUCCESS", timeout=20_000)
    expect(rows.filter(has_text=failed_id)).to_contain_text("FAILURE", timeout=20_000)
    page.screenshot(path=str(tmp_path / "flower-tasks.png"), full_page=True)

    page.get_by_role("link", name=failed_id).click()
    expect(page).to_have_url(f"{url}/task/{failed_id}")
    # The task page shows the failure as the task raised it: a permanent error naming the bad argument.
    expect(page.locator("body")).to_contain_text("hold must be a number of seconds")

    page.goto(f"{url}/workers")
    for worker in ("email-1@", "email-2@", "files@"):
        expect(page.get_by_role("link", name=worker)).to_be_visible(timeout=20_000)
    context.close()


# Messages left waiting per queue (no worker runs): distinct counts, so a swapped column shows.
WAITING = {"email": 3, "email_bulk": 0, "files": 2, "default": 1}
FLOWER_USER, FLOWER_PASSWORD = "admin", "queue-lengths"


@dataclass
class FlowerProcess:
    """`python -m proj.integration.flower` on a free port, with basic auth, against the test Redis."""

    url: str
    redis_address: str  # host:port/db, as the Broker page shows it after the scheme and credentials


def _http(url: str, method: str = "GET", body: dict[str, Any] | None = None, auth: bool = True) -> Any:
    """Status and JSON answer (or text) of one request to Flower, with or without basic auth."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(params=[False, True], ids=["proj-transport", "stock-celery"])
def own_flower(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_client: Any, tmp_path: Path
) -> Iterator[FlowerProcess]:
    """Flower as the stack runs it, with PROJ_STOCK_CELERY unset or 1; stopped by PID."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_") and k != "PROJ_STOCK_CELERY"}
    env.update(
        REDIS_URL=redis_server.url,
        CELERY_BROKER_URL=redis_server.url,
        CELERY_RESULT_BACKEND=redis_server.url,
        FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
        PYTHONUNBUFFERED="1",
    )
    if request.param:
        env["PROJ_STOCK_CELERY"] = "1"
    with flower_process(env, tmp_path / "flower.log") as url:
        yield FlowerProcess(url, f"127.0.0.1:{redis_server.port}/0")


def test_flower_shows_queue_lengths(own_flower: FlowerProcess, browser: Any, redis_client: Any) -> None:
    from playwright.sync_api import Error

    url = own_flower.url
    # Sent through Flower's own API, so by proj's app in the switch state under test.
    for queue, count in WAITING.items():
        for _ in range(count):
            status, answer = _http(f"{url}/api/task/send-task/tasks.health.canary", "POST", {"queue": queue})
            assert status == 200, answer
    wait_for(
        lambda: {q: redis_client.llen(q) for q in WAITING} == WAITING,
        timeout=10,
        what="the messages in Redis",
    )

    status, answer = _http(f"{url}/api/queues/length", auth=False)
    assert status == 401 and "active_queues" not in answer
    anonymous = browser.new_context()
    try:
        response = anonymous.new_page().goto(f"{url}/broker")
        refused = response is not None and response.status == 401 and "email_bulk" not in response.text()
    except Error as exc:  # Chromium turns a 401 with no way to log in into this navigation error
        refused = "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
    anonymous.close()
    assert refused

    status, answer = _http(f"{url}/api/queues/length")
    assert status == 200, answer
    assert {q["name"]: q["messages"] for q in answer["active_queues"]} == WAITING

    context = browser.new_context(
        http_credentials={"username": FLOWER_USER, "password": FLOWER_PASSWORD},
        viewport={"width": 1280, "height": 800},  # narrower windows hide the Messages column
    )
    page = context.new_page()
    response = page.goto(f"{url}/broker")
    assert response is not None and response.status == 200
    headers = [h.strip().lower() for h in page.locator("#queue-table thead th").all_inner_texts()]
    rows = [row.locator("td").all_inner_texts() for row in page.locator("#queue-table tbody tr").all()]
    shown = {cells[0].strip(): cells[headers.index("messages")].strip() for cells in rows}
    assert shown == {queue: str(count) for queue, count in WAITING.items()}, rows
    broker_url = page.locator(".broker-url").inner_text().strip()
    assert broker_url.startswith("redis://") and broker_url.endswith(own_flower.redis_address), broker_url
    context.close()


def test_flower_shows_pipelines_ending_under_their_name(
    own_flower: FlowerProcess, start_worker: Any, celery_app: Any, files_root: Path
) -> None:
    """Flower's task list (from events): a process_upload id ends SUCCESS or FAILURE, under its name."""
    from tasks.files import process_upload
    from tests import filefactory as ff

    start_worker("files", pool="prefork", concurrency=2)
    sent: list[str] = []

    def flower_follows() -> bool:  # Flower subscribes to events a moment after it answers
        sent.append(celery_app.send_task("tasks.health.canary", queue="files").id)
        return any(_flower_task(own_flower.url, task_id).get("state") == "SUCCESS" for task_id in sent)

    wait_for(flower_follows, timeout=30, interval=0.5, what="Flower to follow the task events")
    ff.zip_of(files_root / "slip.zip", {"../../evil": b"x"})
    ff.sample_csv(files_root / "table.csv")
    failed, done = process_upload.delay("slip.zip"), process_upload.delay("table.csv")
    failed.get(timeout=60, propagate=False)
    done.get(timeout=60)

    for result, state in ((failed, "FAILURE"), (done, "SUCCESS")):
        shown = wait_for(
            lambda r=result, s=state: (t := _flower_task(own_flower.url, r.id)).get("state") == s and t,
            timeout=20,
            what=f"Flower to show {result.id} {state}",
        )
        assert shown["name"] == "tasks.files.process_upload", shown
    assert "zip slip" in _flower_task(own_flower.url, failed.id)["exception"]


def _flower_task(url: str, task_id: str) -> dict[str, Any]:
    """Flower's record of one task (its API reads the same event state as its task list), or {}."""
    status, answer = _http(f"{url}/api/task/info/{task_id}")
    return answer if status == 200 and isinstance(answer, dict) else {}
