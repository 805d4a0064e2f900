"""Rate limits per recipient domain that hold across every worker: GCRA in one Redis Lua script.

`EMAIL_RATE_LIMITS="@smtp=14/s,gmail.com=20/s,*=200/s"`: each listed domain gets its own limit,
every other domain gets the `*` limit for itself, and `@smtp` limits every message together (the
provider's own sending rate). Time comes from the Redis server, so worker clocks don't matter.
A caller over the limit is told how long to wait and re-schedules; nobody sleeps holding a slot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from proj.errors import ConfigurationError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RULE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")

# The pseudo-domain for the SMTP provider's overall limit.
PROVIDER = "@smtp"

# All keys checked first, then all updated: a message to two domains takes both slots or neither.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = interval * (tonumber(ARGV[2 * i]) - 1)
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  tats[i] = tat + interval
  wait = math.max(wait, tat - tolerance - now)
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
end
return 0
"""


@dataclass(frozen=True)
class Rate:
    """`limit` messages per `period` seconds, with bursts of up to a tenth of a second's worth."""

    limit: float
    period: float

    @property
    def interval_ms(self) -> float:
        return self.period * 1000.0 / self.limit

    @property
    def burst(self) -> int:
        return max(1, int(self.limit / self.period / 10))


def parse_limits(spec: str) -> dict[str, Rate]:
    """Parse "domain=N/s,*=M/m" into {domain: Rate}; an empty spec means no limits."""
    rates: dict[str, Rate] = {}
    for rule in filter(None, (part.strip() for part in spec.split(","))):
        match = _RULE.match(rule)
        if not match or float(match.group(2)) <= 0:
            raise ConfigurationError(f"EMAIL_RATE_LIMITS: {rule!r} is not like 'gmail.com=20/s'")
        rates[match.group(1).lower()] = Rate(float(match.group(2)), _UNITS[match.group(3)])
    return rates


class DomainRateLimiter:
    """Shared per-domain limits; `acquire` answers 0 (go) or the seconds to wait."""

    def __init__(self, client: redis.Redis[bytes], rates: dict[str, Rate]) -> None:
        self.rates = rates
        self._script = client.register_script(_GCRA)

    def rate_for(self, domain: str) -> Rate | None:
        """The limit of `domain`: its own, else the `*` default, else none."""
        return self.rates.get(domain.lower()) or self.rates.get("*")

    def acquire(self, domains: Iterable[str]) -> float:
        """Take one slot in every domain's limit, or none and say how many seconds to wait."""
        keys, args = [], []
        for domain in [*sorted({d.lower() for d in domains}), PROVIDER]:
            rate = self.rates.get(PROVIDER) if domain == PROVIDER else self.rate_for(domain)
            if rate is not None:
                keys.append(f"proj:ratelimit:{domain}")
                args += [rate.interval_ms, rate.burst]
        if not keys:
            return 0.0
        return float(self._script(keys, args)) / 1000.0
