"""`proj dlq` as an operator reads it: dead letters from real workers, listed, filtered, shown, replayed."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from proj.stores.deadletters import (
    ENTRIES_KEY,
    REPLAYED_ENTRIES_KEY,
    DeadLetter,
    DeadLetterStore,
)
from tests.conftest import EMAIL_QUEUES
from tests.harness import free_port, run_proj, wait_for

pytestmark = pytest.mark.integration

CANARY = "tasks.health.canary"
INSPECT = "tasks.files.inspect_file"
# A missing file whose name makes an error message longer than any terminal line.
LONG_KEY = "uploads/quarterly report for the northern region sales team, final version, really final.pdf"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _dead(store: DeadLetterStore, ids: list[str]) -> dict[str, DeadLetter]:
    """Wait for the dead letter of every id (Celery stores the result before task_failure runs)."""

    def letters() -> dict[str, DeadLetter] | None:
        found = {tid: store.get(tid) for tid in ids}
        return {tid: d for tid, d in found.items() if d} if all(found.values()) else None

    return wait_for(letters, timeout=20, what="the dead letters")  # type: ignore[no-any-return]


def _fail(celery_app: Any, name: str, **kwargs: Any) -> str:
    result = celery_app.send_task(name, kwargs=kwargs)
    with pytest.raises(Exception):  # noqa: B017 - any failure: the dead letter is what is checked
        result.get(timeout=30)
    return str(result.id)


@pytest.fixture
def failures(start_worker: Any, celery_app: Any, redis_client: Any) -> dict[str, str]:
    """Three tasks failed for good in a real worker: two canaries with a bad argument, one missing file."""
    start_worker("default,files", concurrency=2)
    ids = {
        "canary-kwarg": _fail(celery_app, CANARY, holdd=1),
        "canary-hold": _fail(celery_app, CANARY, hold="soon"),
        "missing-file": _fail(celery_app, INSPECT, key=LONG_KEY),
    }
    _dead(DeadLetterStore(redis_client), list(ids.values()))
    return ids


def test_list_fits_80_columns_with_whole_ids_task_names_and_iso_times(failures, worker_env):
    listed = run_proj({**worker_env, "COLUMNS": "80"}, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    lines = out.splitlines()
    assert lines[0] == "Dead letters: 3 of 3 shown (newest first, times in UTC)"
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    # Three lines a letter: when and which id, which task on which queue, the error.
    for task_id in failures.values():
        assert re.search(rf"^{ISO}  {task_id}$", out, re.MULTILINE), out
    assert out.count(f"\n  {CANARY} on default\n") == 2 and f"\n  {INSPECT} on files\n" in out
    assert "\n  PermanentError: canary: hold must be a number of seconds, got str\n" in out
    assert "\n  TypeError: canary() got an unexpected keyword argument 'holdd'\n" in out
    # The long message ends in an ellipsis after a whole word of it.
    [long_line] = [line for line in lines if "FileNotFoundForProcessing" in line]
    assert long_line.startswith("  FileNotFoundForProcessing: no file at key 'uploads/quarterly report for")
    assert long_line.endswith("…") and len(long_line) >= 70
    kept = long_line.removeprefix("  FileNotFoundForProcessing: no file at key '").removesuffix("…")
    assert LONG_KEY.startswith(kept) and LONG_KEY[len(kept)] in " ,", kept
    assert not re.search(r"\b1[0-9]{9}(\.\d+)?\b", out)  # no epoch seconds anywhere


def test_list_filters_by_task_error_and_age(failures, worker_env, redis_client):
    store = DeadLetterStore(redis_client)
    store.record(
        DeadLetter(
            task_id="old-letter",
            task_name=CANARY,
            exc_type="TransientError",
            message="gave up",
            failed_at=time.time() - 2 * 3600,
        )
    )

    def ids(*args: str) -> set[str]:
        done = run_proj(worker_env, "dlq", "list", "--json", *args)
        assert done.returncode == 0, done.stderr
        return {record["task_id"] for record in json.loads(done.stdout)}

    canaries = {failures["canary-kwarg"], failures["canary-hold"]}
    assert ids("--task", "canary") == canaries | {"old-letter"}
    assert ids("--task", "inspect_file") == {failures["missing-file"]}
    assert ids("--error", "must be a number") == {failures["canary-hold"]}
    assert ids("--error", "typeerror") == {failures["canary-kwarg"]}  # the type, any case
    assert ids("--since", "1h") == set(failures.values())
    assert ids("--since", "3h") == set(failures.values()) | {"old-letter"}
    assert ids("--since", "90m", "--task", "canary", "--error", "PermanentError") == {failures["canary-hold"]}

    filtered = run_proj(worker_env, "dlq", "list", "--task", "canary", "--since", "2d")
    assert filtered.stdout.splitlines()[:2] == [
        "Dead letters: 3 of 4 shown (newest first, times in UTC)",
        "Matching: --task canary --since 2d",
    ]
    wrong = run_proj(worker_env, "dlq", "list", "--since", "an hour")
    assert wrong.returncode == 2
    assert "'an hour' is not an age: use a number and s, m, h or d (1h, 2d)" in wrong.stderr


def test_wide_and_json_forms_carry_every_column(failures, worker_env):
    wide = run_proj(worker_env, "dlq", "list", "--wide")
    assert wide.returncode == 0, wide.stderr
    header = next(line for line in wide.stdout.splitlines() if line.startswith("FAILED AT"))
    assert re.split(r"  +", header) == [
        *("FAILED AT (UTC)", "TASK ID", "TASK", "QUEUE", "RETRIES", "REPLAY OF", "ERROR")
    ]
    for name, task_id in failures.items():
        [row] = [line for line in wide.stdout.splitlines() if task_id in line]
        assert re.match(rf"{ISO}  {task_id}  tasks\.", row), row
        assert (INSPECT if name == "missing-file" else CANARY) in row
    records = json.loads(run_proj(worker_env, "dlq", "list", "--json").stdout)
    by_id = {record["task_id"]: record for record in records}
    missing = by_id[failures["missing-file"]]
    assert missing["message"] == f"no file at key {LONG_KEY!r}"  # whole, not shortened
    assert missing["queue"] == "files" and missing["kwargs"] == {"key": LONG_KEY}
    assert re.fullmatch(ISO, missing["failed_at"]) and "traceback" not in missing


def test_show_prints_iso_time_and_the_traceback(failures, worker_env):
    task_id = failures["canary-hold"]
    shown = run_proj(worker_env, "dlq", "show", task_id[:8])  # a prefix is enough
    assert shown.returncode == 0, shown.stderr
    fields = dict(re.findall(r"^([a-z ]+):\s+(.*)$", shown.stdout, re.MULTILINE))
    assert fields["task id"] == task_id and fields["task"] == CANARY and fields["queue"] == "default"
    assert re.fullmatch(rf"{ISO} \(UTC\)", fields["failed at"])
    assert fields["kwargs"] == '{"hold": "soon"}'
    assert fields["error"] == "PermanentError: canary: hold must be a number of seconds, got str"
    assert fields["replay of"] == "-" and fields["replayed as"] == "- (not replayed)"
    assert "Traceback (most recent call last)" in shown.stdout
    assert (
        json.loads(run_proj(worker_env, "dlq", "show", task_id, "--json").stdout)["failed_at"]
        == (fields["failed at"].split()[0])
    )


def test_replay_links_the_old_and_the_new_letter(start_worker, celery_app, redis_client, worker_env):
    start_worker("default", concurrency=1)
    store = DeadLetterStore(redis_client)
    old_id = _fail(celery_app, CANARY, holdd=1)
    _dead(store, [old_id])

    replay = run_proj(worker_env, "dlq", "replay", old_id)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith(f"Replayed {CANARY}[{old_id}] as ")
    new_id = replay.stdout.split()[-1]
    # The replay runs and fails the same way: a dead letter of its own, carrying the old id.
    new_letter = _dead(store, [new_id])[new_id]
    assert new_letter.replay_of == old_id and new_letter.kwargs == {"holdd": 1}
    assert json.loads(redis_client.hget(ENTRIES_KEY, new_id))["replay_of"] == old_id
    # The old letter left the list but keeps the new id.
    assert redis_client.hget(ENTRIES_KEY, old_id) is None
    assert json.loads(redis_client.hget(REPLAYED_ENTRIES_KEY, old_id))["replayed_as"] == new_id
    assert [d.task_id for d in store.list()] == [new_id] and store.count() == 1

    old_shown = run_proj(worker_env, "dlq", "show", old_id).stdout
    new_shown = run_proj(worker_env, "dlq", "show", new_id).stdout
    assert re.search(rf"^replayed as: +{new_id}$", old_shown, re.MULTILINE), old_shown
    assert re.search(rf"^replay of: +{old_id}$", new_shown, re.MULTILINE), new_shown
    listed = run_proj(worker_env, "dlq", "list").stdout
    assert re.search(rf"^{ISO}  {new_id}\n  {CANARY} on default, a replay\n", listed, re.MULTILINE), listed
    assert old_id not in listed

    again = run_proj(worker_env, "dlq", "replay", old_id)
    assert again.returncode == 1
    assert again.stdout == f"{old_id} was replayed already, as {new_id} (proj dlq show has both)\n"


def test_a_replay_that_retries_and_fails_again_still_names_the_letter_it_replays(
    start_worker, celery_app, redis_client, worker_env
):
    from tasks.email import send_email

    # Nothing listens on the SMTP port: every send is retried once, then fails for good.
    smtp = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "EMAIL_MAX_RETRIES": "1"}
    start_worker(EMAIL_QUEUES, env=smtp, concurrency=1)
    store = DeadLetterStore(redis_client)
    first = send_email.delay(to="ann@example.com", subject="hello", text="body")
    with pytest.raises(Exception):  # noqa: B017 - the dead letter is what is checked
        first.get(timeout=60)
    assert _dead(store, [first.id])[first.id].retries == 1

    replay = run_proj(worker_env, "dlq", "replay", first.id)
    assert replay.returncode == 0, replay.stderr
    new_id = replay.stdout.split()[-1]
    again = wait_for(lambda: store.get(new_id), timeout=60, what="the replay's dead letter")
    assert again.retries == 1 and again.replay_of == first.id  # the retry's message kept the link
    assert again.kwargs["to"] == "ann@example.com"
    listed = run_proj(worker_env, "dlq", "list").stdout
    assert "  tasks.email.send_email on email, after 1 retry, a replay\n" in listed, listed
