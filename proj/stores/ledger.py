"""The idempotency ledger: what happened to each side effect, keyed by its idempotency key, in Redis.

States of a key: absent -> claimed (work started, nothing handed over yet) -> sending (the other side
may hold it from now on) -> sent (done; the outcome is kept for `ttl` seconds). A claim names its
owner (the task id) and its run (one execution of it), so a second task with the same key waits for
the first, and a redelivery of the same task takes over, but only once the earlier run's `window`
has passed: on Redis a message still running when its visibility timeout ends is delivered again
while the first run is alive, and the two must not both send. A run hands over only within its
window, and a copy takes over only after it. The one window a ledger cannot close is "sending": the
server accepted the message but the worker died before recording "sent"; its owner then sends again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

# Longer than the hard time limit: a live owner always finishes (or dies) within its claim.
CLAIM_SECONDS = 900

# Redis's clock, so the windows of runs on different machines compare.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000"

_CLAIM = (
    _NOW
    + """
local v = redis.call('GET', KEYS[1])
if v then
  local d = cjson.decode(v)
  if d.state == 'sent' then return {'sent', v, '0'} end
  if d.owner ~= ARGV[1] then return {'busy', v, '0'} end
  local left = tonumber(ARGV[3]) - (now - (d.at or 0))
  if d.run ~= ARGV[2] and d.run ~= '' and left > 0 then return {'live', v, tostring(left)} end
end
redis.call('SET', KEYS[1], cjson.encode({state='claimed', owner=ARGV[1], run=ARGV[2], at=now}), 'PX', ARGV[4])
if v then return {'resume', v, '0'} end
return {'new', '', '0'}
"""
)

# Mark "sending" only for the run holding the claim, and only within its window (0: no window).
_SENDING = (
    _NOW
    + """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local d = cjson.decode(v)
if d.state == 'sent' or d.owner ~= ARGV[1] or d.run ~= ARGV[2] then return 0 end
if tonumber(ARGV[3]) > 0 and now - d.at >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], cjson.encode({state='sending', owner=ARGV[1], run=ARGV[2], at=now}), 'PX', ARGV[4])
return 1
"""
)

# This run gave up after handing over (outcome unknown): no live run any more, the owner may resume.
_ABANDON = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local d = cjson.decode(v)
if d.state ~= 'sending' or d.owner ~= ARGV[1] or d.run ~= ARGV[2] then return 0 end
d.run = ''
redis.call('SET', KEYS[1], cjson.encode(d), 'KEEPTTL')
return 1
"""

_RELEASE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local d = cjson.decode(v)
if d.state == 'sent' or d.owner ~= ARGV[1] or d.run ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """The answer to "may I do this?": new, resume, live (an earlier run may still be at it), busy, sent."""

    status: str
    record: dict[str, Any]
    retry_after: float = 0.0

    @property
    def ambiguous(self) -> bool:
        """An earlier attempt of this owner died after handing the work over, before recording it."""
        return self.status == "resume" and self.record.get("state") == "sending"


class Ledger:
    """Before/after records of side effects, shared by every worker through Redis."""

    def __init__(self, client: redis.Redis[bytes], namespace: str, ttl: int) -> None:
        self.client = client
        self.prefix = f"proj:ledger:{namespace}:"
        self.ttl = ttl
        self._claim = client.register_script(_CLAIM)
        self._sending = client.register_script(_SENDING)
        self._release = client.register_script(_RELEASE)
        self._abandon = client.register_script(_ABANDON)

    def claim(self, key: str, owner: str, run: str = "", window: float = 0.0) -> Claim:
        """Claim `key` for this run of `owner` unless it was done, another owner holds it, or an
        earlier run of the same owner claimed it less than `window` seconds ago."""
        status, raw, left = self._claim([self.prefix + key], [owner, run, window, CLAIM_SECONDS * 1000])
        return Claim(_text(status), json.loads(raw) if raw else {}, float(_text(left)))

    def sending(self, key: str, owner: str, run: str = "", window: float = 0.0) -> bool:
        """Record that the side effect is being handed over now (the ambiguous window opens).

        False when this run no longer holds the claim or its window has passed: it must not hand over.
        """
        args = [owner, run, window, CLAIM_SECONDS * 1000]
        return bool(self._sending([self.prefix + key], args))

    def sent(self, key: str, owner: str, outcome: dict[str, Any]) -> None:
        """Record the outcome; from now on every claim of `key` answers "sent" with it."""
        record = json.dumps({"state": "sent", "owner": owner, "at": time.time(), "outcome": outcome})
        self.client.set(self.prefix + key, record, ex=self.ttl)

    def release(self, key: str, owner: str, run: str = "") -> None:
        """Forget this run's unfinished claim (nothing was handed over) so a retry starts clean."""
        self._release([self.prefix + key], [owner, run])

    def abandon(self, key: str, owner: str, run: str) -> None:
        """This run stops after handing over without knowing the outcome; its owner may resume at once."""
        self._abandon([self.prefix + key], [owner, run])

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of `key`, if any."""
        raw = self.client.get(self.prefix + key)
        return json.loads(raw) if raw else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
