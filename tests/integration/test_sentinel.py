"""proj's own Redis clients on sentinel:// URLs follow a failover (master SIGKILLed, replica promoted)."""

from __future__ import annotations

import subprocess

import pytest
import redis

from proj.stores.connection import redis_client
from proj.stores.ledger import Ledger
from tests.faults.sentinel import MASTER, SentinelServer
from tests.harness import RedisServer, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_a_sentinel_url_client_follows_the_promotion_of_the_replica(monkeypatch):
    master = RedisServer().start()
    replica = RedisServer().start("--replicaof", "127.0.0.1", str(master.port))
    sentinels = [SentinelServer(master.port) for _ in range(3)]
    try:
        monkeypatch.setenv("REDIS_SENTINEL_MASTER", MASTER)
        from proj.settings import get_settings

        get_settings.cache_clear()
        url = ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in sentinels)
        client = redis_client(url)
        ledger = Ledger(client, "email", 60)
        ledger.sent("before", "t1", {"message_id": "<a@x>"})
        wait_for(lambda: replica.client().get("proj:ledger:email:before"), what="replication")

        assert master.proc is not None
        master.proc.kill()  # SIGKILL: the sentinels promote the replica
        sentinel = redis.Redis(port=sentinels[0].port)
        wait_for(
            lambda: sentinel.sentinel_get_master_addr_by_name(MASTER)[1] == replica.port,
            timeout=60,
            what="the replica promoted",
        )

        def writes_after_failover() -> bool:
            try:
                ledger.sent("after", "t2", {"message_id": "<b@x>"})
                return True
            except redis.RedisError:
                return False

        wait_for(writes_after_failover, timeout=30, what="a write through the same client")
        assert replica.client().get("proj:ledger:email:after")
        assert ledger.get("before")["state"] == "sent"  # replicated before the failover
    finally:
        get_settings.cache_clear()
        for server in sentinels:
            server.stop()
        replica.stop()
        master.stop()


PRODUCE = """
import sys
from proj.celery import app
results = [app.send_task("tasks.health.canary") for _ in range(int(sys.argv[1]))]
print(sum(1 for r in results if r.get(timeout=90)["hostname"]))
"""


@pytest.mark.layer
@pytest.mark.timeout(300)
def test_a_worker_and_a_producer_on_sentinel_urls_go_on_after_a_failover(worker_env):
    import sys

    from tests.harness import ROOT, WorkerProcess

    master = RedisServer().start()
    replica = RedisServer().start("--replicaof", "127.0.0.1", str(master.port))
    sentinels = [SentinelServer(master.port) for _ in range(3)]
    url = ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in sentinels)
    env = {
        **worker_env,
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "REDIS_SENTINEL_MASTER": MASTER,
    }
    worker = WorkerProcess(queues="default", name="sentinel", env=env, concurrency=2)

    def produce(count: int) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", PRODUCE, str(count)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr[-3000:] + worker.log()[-3000:]
        return int(proc.stdout.strip())

    try:
        worker.proc = subprocess.Popen(
            worker.command(), cwd=ROOT, env=env, stdout=worker.log_path.open("wb"), stderr=subprocess.STDOUT
        )
        assert produce(100) == 100
        # proj's takes ran on Sentinel: the master holds the worker's registered inflight list.
        assert master.client().hlen("proj.stores.inflight") == 1
        assert master.proc is not None
        master.proc.kill()
        sentinel = redis.Redis(port=sentinels[0].port)
        wait_for(
            lambda: sentinel.sentinel_get_master_addr_by_name(MASTER)[1] == replica.port,
            timeout=60,
            what="the replica promoted",
        )
        assert produce(100) == 100  # the same worker, no restart
        assert worker.proc.poll() is None
        assert "kombu_transport:SentinelTransport" in worker.log()  # proj's layer, not kombu's
    finally:
        worker.stop()
        for server in sentinels:
            server.stop()
        replica.stop()
        master.stop()
