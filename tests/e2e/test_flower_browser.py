"""Flower of the local stack in a real browser (Playwright driving Debian's Chromium)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.localstack import LocalStack
from tests.harness import IN_CI

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
    expect(page.locator("body")).to_contain_text("TypeError")

    page.goto(f"{url}/workers")
    for worker in ("email-1@", "email-2@", "files@"):
        expect(page.get_by_role("link", name=worker)).to_be_visible(timeout=20_000)
    context.close()
