"""Dead letters expire: by age and by count, on record and on list, against a real Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest

from proj.stores.deadletters import ENTRIES_KEY, INDEX_KEY, DeadLetter, DeadLetterStore

pytestmark = pytest.mark.integration


def _letter(n: int, failed_at: float, **fields: Any) -> DeadLetter:
    return DeadLetter(task_id=f"t{n:03d}", task_name="tasks.x", args=[n], failed_at=failed_at, **fields)


def test_past_the_count_the_oldest_go_on_record(redis_client: Any) -> None:
    store = DeadLetterStore(redis_client, max_age=3600, max_count=5)
    now = time.time()
    for n in range(8):
        store.record(_letter(n, now - 100 + n))
    assert store.count() == 5
    assert [letter.task_id for letter in store.list()] == ["t007", "t006", "t005", "t004", "t003"]
    # The hash holds no body of a dropped letter: the index and the entries agree.
    assert sorted(redis_client.hkeys(ENTRIES_KEY)) == [b"t003", b"t004", b"t005", b"t006", b"t007"]
    assert store.get("t000") is None


def test_older_than_the_age_go_on_record_and_on_list(redis_client: Any) -> None:
    long_lived = DeadLetterStore(redis_client, max_age=3600, max_count=100)
    now = time.time()
    long_lived.record(_letter(1, now - 600))
    long_lived.record(_letter(2, now - 10))
    short = DeadLetterStore(redis_client, max_age=60, max_count=100)
    # Not yet dropped (no write since), but neither counted nor found: it has expired.
    assert short.count() == 1 and short.get("t001") is None
    assert [letter.task_id for letter in short.list()] == ["t002"]
    assert redis_client.hkeys(ENTRIES_KEY) == [b"t002"] and redis_client.zcard(INDEX_KEY) == 1
    short.record(_letter(3, now - 120))  # already expired when it failed this long ago
    assert redis_client.hkeys(ENTRIES_KEY) == [b"t002"]


def test_both_keys_expire_after_the_age_without_another_failure(redis_client: Any) -> None:
    store = DeadLetterStore(redis_client, max_age=600, max_count=100)
    store.record(_letter(1, time.time()))
    for key in (INDEX_KEY, ENTRIES_KEY):
        assert 590 <= redis_client.ttl(key) <= 600


def test_many_expired_at_once_are_dropped_in_one_call(redis_client: Any) -> None:
    store = DeadLetterStore(redis_client, max_age=60, max_count=100_000)
    old = time.time() - 3600
    with redis_client.pipeline(transaction=False) as pipe:  # 3,000 old letters, past Lua's unpack limit
        for n in range(3000):
            pipe.hset(ENTRIES_KEY, f"old{n}", _letter(n, old).to_json())
            pipe.zadd(INDEX_KEY, {f"old{n}": old})
        pipe.execute()
    assert store.expire() == 3000
    assert redis_client.exists(ENTRIES_KEY, INDEX_KEY) == 0


def test_stored_messages_and_tracebacks_hold_no_password(redis_client: Any) -> None:
    store = DeadLetterStore(redis_client, max_age=3600, max_count=100)
    url = "redis://proj:hunter2-redis@10.0.0.5:6379/0"
    store.record(
        _letter(
            1,
            time.time(),
            message=f"Cannot connect to {url}",
            traceback=f'Traceback...\n  File "x.py"\nConnectionError: {url} (amqp://u:p4ss@h//)',
        )
    )
    raw = redis_client.hget(ENTRIES_KEY, "t001").decode()
    assert "hunter2-redis" not in raw and "p4ss" not in raw
    letter = store.get("t001")
    assert letter is not None and "redis://proj:**@10.0.0.5:6379/0" in letter.message


def test_limits_below_one_are_refused(redis_client: Any) -> None:
    with pytest.raises(ValueError, match="DLQ_MAX_AGE and DLQ_MAX_COUNT"):
        DeadLetterStore(redis_client, max_age=0)
