"""The idempotency ledger: what happened to each side effect, keyed by its idempotency key, in Redis.

States of a key: absent -> claimed (work started, nothing handed over yet) -> sending (the other side
may hold it from now on) -> sent (done; the outcome is kept for `ttl` seconds). A claim names its
owner (the task id), so a redelivery of the same task takes over at once while a second task with
the same key waits for the first. The one window a ledger cannot close is "sending": the server
accepted the message but the worker died before recording "sent"; its owner then sends again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

# Longer than the hard time limit: a live owner always finishes (or dies) within its claim.
CLAIM_SECONDS = 900

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then
  local d = cjson.decode(v)
  if d.state == 'sent' then return {'sent', v} end
  if d.owner ~= ARGV[1] then return {'busy', v} end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if v then return {'resume', v} end
return {'new', ''}
"""

_SET_IF_OWNER = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).owner ~= ARGV[1] then return 0 end
if v and cjson.decode(v).state == 'sent' then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class Claim:
    """The answer to "may I do this?": new, resume (my own earlier attempt), busy or sent."""

    status: str
    record: dict[str, Any]

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
        self._set_if_owner = client.register_script(_SET_IF_OWNER)

    def claim(self, key: str, owner: str) -> Claim:
        """Claim `key` for `owner` unless it was done or another owner holds it."""
        record = self._record("claimed", owner)
        status, raw = self._claim([self.prefix + key], [owner, record, CLAIM_SECONDS * 1000])
        return Claim(_text(status), json.loads(raw) if raw else {})

    def sending(self, key: str, owner: str) -> None:
        """Record that the side effect is being handed over right now (the ambiguous window opens)."""
        self._set_if_owner([self.prefix + key], [owner, self._record("sending", owner), CLAIM_SECONDS * 1000])

    def sent(self, key: str, owner: str, outcome: dict[str, Any]) -> None:
        """Record the outcome; from now on every claim of `key` answers "sent" with it."""
        record = json.dumps({"state": "sent", "owner": owner, "at": time.time(), "outcome": outcome})
        self.client.set(self.prefix + key, record, ex=self.ttl)

    def release(self, key: str, owner: str) -> None:
        """Forget an unfinished claim (nothing was handed over) so a retry starts clean."""
        self._set_if_owner([self.prefix + key], [owner, "", 0])

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of `key`, if any."""
        raw = self.client.get(self.prefix + key)
        return json.loads(raw) if raw else None

    @staticmethod
    def _record(state: str, owner: str) -> str:
        return json.dumps({"state": state, "owner": owner, "at": time.time()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
