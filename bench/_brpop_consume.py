"""Ablation: a worker loaded with `-I bench._brpop_consume` takes messages as kombu does.

BRPOP, then an unacked record (ZADD + HSET, unawaited) before the task, instead of BLMOVE into the
worker's inflight list; the rest of proj's transport is unchanged.
"""

from __future__ import annotations

from proj import broker

broker.Channel.take_into_inflight = False
