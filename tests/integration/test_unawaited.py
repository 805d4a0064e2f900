"""Writes sent without waiting (acks among them) survive a Redis that is away, and land once it is back."""

from __future__ import annotations

import contextlib

import pytest
import redis

from proj.integration.unawaited import UnawaitedWriter
from tests.harness import RedisServer

pytestmark = [pytest.mark.integration]


@pytest.fixture
def server():
    server = RedisServer().start()
    yield server
    server.stop()


def test_a_write_sent_while_redis_is_away_lands_after_tries_that_could_not_connect(server):
    client = server.client()
    writer = UnawaitedWriter(redis.ConnectionPool.from_url(server.url, socket_timeout=2))
    writer.send([("SET", "first", "1")])
    writer.flush()
    server.stop()

    # Sent into a connection Redis has closed, then tried again twice while nothing listens: the
    # second try cannot even connect. An ack lost there would let a give-back run its task again.
    with pytest.raises(redis.ConnectionError):
        writer.send([("SET", "ack", "1")])
        writer.flush()
    assert writer.settle_unconfirmed() is False
    assert writer.settle_unconfirmed() is False

    server.start()
    assert client.get("ack") is None  # this Redis kept nothing: only a resend can set it
    assert writer.settle_unconfirmed() is True
    assert client.get("ack") == b"1"


def test_writes_left_unanswered_are_sent_again_in_the_order_they_were_sent(server):
    client = server.client()
    writer = UnawaitedWriter(redis.ConnectionPool.from_url(server.url, socket_timeout=2))
    writer.send([("PING",)])
    writer.flush()
    server.stop()
    for value in ("a", "b", "c"):
        with contextlib.suppress(redis.ConnectionError):  # the first goes into the closed socket
            writer.send([("RPUSH", "order", value)])
    assert writer.settle_unconfirmed() is False

    server.start()
    assert writer.settle_unconfirmed() is True
    assert client.lrange("order", 0, -1) == [b"a", b"b", b"c"]
