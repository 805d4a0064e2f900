"""Celery's Redis result backend, minus two costs on the path of `.delay().get()`.

Celery glue (imports celery); `override_backends` in celeryconfig.py makes it the class for redis://
and rediss:// result URLs. Both changes apply outside gevent/eventlet only; under them this is
Celery's backend unchanged.

- Celery's result consumer calls `time.sleep(0)` after every state change and every drained event
  so that green threads can switch. In an ordinary process that only costs: Linux sleeps for the
  timer slack (50 us by default), 78 us per call measured here, five calls per `.delay().get()`.
- `.get()` first reads the result with a GET, in case it was stored before the subscription to
  its channel. For a task sent from this process that cannot be the case: `.delay()` subscribes
  before it publishes the task. Such a `.get()` waits for the published result without the GET,
  and still reads it once if nothing has arrived after `RECHECK_AFTER` seconds (a subscription
  delayed on the network past the result; a lost pub/sub connection is caught up by Celery's own
  reconnect, which reads every subscribed result).
- A worker storing a result first GETs the stored one, so that a redelivered task cannot overwrite
  a SUCCESS (Celery's guard against duplicates), then SETs and PUBLISHes: two round trips, the
  first one on the path of every `.get()`. Here one Lua script does the same check, the SET and the
  PUBLISH in one round trip, and atomically (Celery's check and write can interleave).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from celery import states
from celery.backends import asynchronous as celery_asynchronous
from celery.backends import redis as celery_redis
from celery.exceptions import BackendStoreError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.utils.serialization import bytes_to_str
from kombu.utils.compat import detect_environment

from proj.stores.refused import refused_for_now

# Any: celery-types does not describe the result consumer and backend internals used here.
_celery: Any = celery_redis
_waiting_on: Any = vars(celery_asynchronous)["_waiting_on"]

# Seconds after which a .get() that skipped the GET reads the result anyway.
RECHECK_AFTER = 1.0
# Store a result unless a SUCCESS is stored already; publish what was stored. KEYS: result key.
# ARGV: encoded meta, expiry in seconds (0: none). Returns 1 when stored, 0 when a SUCCESS was kept,
# 2 when the stored value's status cannot be read here (compressed, another serializer): nothing
# written, Celery's own check decides. Celery's JSON meta starts with its status: read it there
# rather than decode a result of any size inside Redis.
STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
  local status = string.match(current, '^{"status": *"(%u+)"')
  if not status then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' then status = meta['status'] end
  end
  if not status then return 2 end
  if status == 'SUCCESS' then return 0 end
end
local expires = tonumber(ARGV[2])
if expires > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', expires)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
STATUS_UNREADABLE = 2
# Tasks sent but not yet waited for, remembered as subscribed-before-publish (oldest forgotten first:
# a forgotten one only costs its .get() the GET).
MAX_REMEMBERED = 10_000


class ResultConsumer(_celery.ResultConsumer):  # type: ignore[misc]
    """Celery's Redis result consumer; outside green threads it never sleeps to yield."""

    green = detect_environment() != "default"
    on_message: Any  # set by Celery's consumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscribed_first: OrderedDict[str, None] = OrderedDict()

    def subscribed_before_publish(self, task_id: str) -> None:
        """Remember that `task_id`'s channel was subscribed before its task was published."""
        if self.green or self._get_key_for_task(task_id) not in self.subscribed_to:
            return
        self._subscribed_first[task_id] = None
        if len(self._subscribed_first) > MAX_REMEMBERED:
            self._subscribed_first.popitem(last=False)

    def _consume_from(self, task_id: str) -> None:
        """Celery's subscription; one made again after publish means the result may be there already.

        Celery cancels a subscription when a finished result arrives; a `.get()` that registers
        after that (another thread drained the message) subscribes again and must read the stored
        result, as Celery does, instead of waiting for a message that was already published.
        """
        key = self._get_key_for_task(task_id)
        if key not in self.subscribed_to or key in self._pending_unsubscribe:
            self._subscribed_first.pop(task_id, None)
        super()._consume_from(task_id)

    def _wait_for_pending(
        self,
        result: Any,
        timeout: float | None = None,
        on_interval: Callable[[], Any] | None = None,
        on_message: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[None]:
        """Celery's loop over drained events, without `sleep(0)` after each one."""
        if self.green:
            yield from super()._wait_for_pending(result, timeout, on_interval, on_message, **kwargs)
            return
        if self._subscribed_first.pop(getattr(result, "id", ""), False) is None:
            # Subscribed before it was published: nothing to read yet, unless it is late.
            on_interval = self._recheck_later(result, on_interval)
        else:
            self.on_wait_for_pending(result, timeout=timeout, **kwargs)  # Celery's GET first
        previous: Any = self.on_message
        self.on_message = on_message
        try:
            yield from self.drain_events_until(result.on_ready, timeout=timeout, on_interval=on_interval)
        except TimeoutError:
            raise CeleryTimeoutError("The operation timed out.") from None
        finally:
            self.on_message = previous

    def _recheck_later(self, result: Any, on_interval: Callable[[], Any] | None) -> Callable[[], Any]:
        """`on_interval` plus one GET of the result if it has not arrived by RECHECK_AFTER."""
        due = time.monotonic() + RECHECK_AFTER
        checked = False

        def interval() -> None:
            nonlocal checked
            if not checked and not result.on_ready.ready and time.monotonic() >= due:
                checked = True
                self.on_wait_for_pending(result)
            if on_interval is not None:
                on_interval()

        return interval

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        """Celery's hand-over of a finished result to its waiters, without `sleep(0)`."""
        if self.green:
            super().on_state_change(meta, message)
            return
        if self.on_message:
            self.on_message(meta)
        if meta["status"] in states.READY_STATES:
            task_id = meta["task_id"]
            waiting = _waiting_on(self._pending_results, task_id)
            if not waiting:  # arrived before its result was registered: keep it for that moment
                self._pending_messages.put(task_id, meta)
            for result in waiting:
                result._maybe_set_cache(meta)
                bucket = self.buckets.pop(result, None)
                if bucket is not None:  # a ResultSet iterating over its members waits on this one
                    bucket.append(result)
        self._maybe_cancel_ready_task(meta)


class RedisBackend(_celery.RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend with the consumer above."""

    ResultConsumer = ResultConsumer
    _store_script: Any = None

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery retries connection errors (result_backend_always_retry); also a write Redis refuses
        for now (full, read-only, no replicas in sync: proj.stores.refused), which passes."""
        return bool(super().exception_safe_to_retry(exc)) or refused_for_now(exc)

    def _store_result(
        self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        """Store the result as Celery does (a SUCCESS is never overwritten), in one round trip."""
        if self.compression or self.serializer != "json":  # the script reads JSON only
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            error: Any = BackendStoreError  # celery-types omits its state/task_id keywords
            raise error("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        stored = self.ensure(self._store_unless_succeeded, (self.get_key_for_task(task_id), value, expires))
        if stored == STATUS_UNREADABLE:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        return result

    def _store_unless_succeeded(self, key: Any, value: Any, expires: Any) -> int:
        """Run the store script (redis-py loads it into Redis on first use)."""
        if self._store_script is None:
            self._store_script = self.client.register_script(STORE_UNLESS_SUCCEEDED)
        return int(self._store_script(keys=[key], args=[value, int(expires or 0)]))

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to the result before the task is published, as Celery does; remember that."""
        super().on_task_call(producer, task_id)
        self.result_consumer.subscribed_before_publish(task_id)


class SentinelBackend(RedisBackend, _celery.SentinelBackend):  # type: ignore[misc]
    """The backend above on the master Celery's Sentinel backend finds (`sentinel://` URLs)."""
