"""Master SIGKILLed under 2,000 default tasks and 200 emails; a master, a replica, three sentinels.

Workers, the producer and Flower run on the sentinel:// URL and must follow the promotion without a
restart. Redis replicates asynchronously: writes the master acknowledged but had not yet sent to the
replica are gone after the promotion, so lost and duplicated work is measured and reported, not
forbidden. The second run gives both servers `min-replicas-to-write 1`: after the promotion the new
master refuses writes until the old one is back as its replica; no worker may exit (docs/sentinel.md).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import redis

from proj.mail import message_id_for
from proj.settings import Settings
from proj.stores.connection import redis_client
from proj.stores.ledger import Ledger
from tests.conftest import EMAIL_QUEUES, smtp_env
from tests.faults.scenario import Outcome, report, runs_by_id, scaled
from tests.faults.sentinel import MASTER, SentinelServer, sentinel_url
from tests.harness import ROOT, RedisServer, WorkerProcess, free_port, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.layer]

FLOWER_AUTH = "watch:failover-pass"
MIN_REPLICAS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")


def _flower_workers(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1")
    request.add_header("Authorization", "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return str(response.read().decode()) if response.status == 200 else ""
    except OSError:
        return ""


def _in_sync(server: RedisServer) -> bool:
    """The master `server` has a replica that is online and acknowledges."""
    info = server.client().info("replication")
    return info.get("connected_slaves", 0) >= 1 and info.get("slave0", {}).get("state") == "online"


def _refuses_writes(server: RedisServer) -> str:
    try:
        server.client().set("proj:failover:probe", "1")
        return ""
    except redis.ResponseError as exc:
        return f"; the new master alone refused writes ({str(exc).split()[0]})"


def _ready(worker: WorkerProcess) -> bool:
    assert worker.proc is not None
    if worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited early:\n{worker.log()[-3000:]}")
    return " ready." in worker.log()


@pytest.mark.timeout(600)
# With MIN_REPLICAS the promoted replica refuses every write (NOREPLICAS) until the old master is
# back as its replica: workers wait that out like any refused write (proj.stores.refused).
@pytest.mark.parametrize("master_args", [(), MIN_REPLICAS], ids=["async", "min-replicas"])
def test_workers_producer_and_flower_follow_a_sentinel_failover(
    worker_env, smtp_server, tmp_path: Path, master_args: tuple[str, ...]
):
    master = RedisServer().start(*master_args)
    replica = RedisServer().start("--replicaof", "127.0.0.1", str(master.port), *master_args)
    # With min-replicas-to-write the master refuses writes until the replica has synced and acks.
    wait_for(lambda: _in_sync(master), timeout=30, what="the replica in sync")
    sentinels = [SentinelServer(master.port) for _ in range(3)]
    url = sentinel_url(sentinels)
    env = {
        **worker_env,
        **smtp_env(smtp_server),
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "REDIS_SENTINEL_MASTER": MASTER,
        "BROKER_RESTORE_INTERVAL": "1",
    }
    workers = [
        WorkerProcess(queues="default", name=f"failover-default-{i}", env=env, pool="solo", concurrency=1)
        for i in range(2)
    ] + [WorkerProcess(queues=EMAIL_QUEUES, name=f"failover-email-{i}", env=env) for i in range(2)]
    flower_port, ids_file = free_port(), tmp_path / "ids.json"
    canaries, emails = scaled(2000), scaled(200)
    flower = producer = None
    try:
        for worker in workers:  # Popen each, then wait: the four start side by side
            worker.proc = subprocess.Popen(
                worker.command(),
                cwd=ROOT,
                env=env,
                stdout=worker.log_path.open("wb"),
                stderr=subprocess.STDOUT,
            )
        for worker in workers:
            wait_for(lambda w=worker: _ready(w), timeout=60, interval=0.2, what=f"{worker.nodename} ready")
        flower = subprocess.Popen(
            [sys.executable, "-m", "proj.integration.flower", "--address=127.0.0.1", f"--port={flower_port}"],
            cwd=ROOT,
            env={**env, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
            stdout=(tmp_path / "flower.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        producer = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.sentinel", str(ids_file), str(canaries), str(emails), "300"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "producer.log").open("wb"),
            text=True,
        )

        def default_runs() -> int:
            return sum(runs_by_id(*(w.log() for w in workers[:2])).values())

        wait_for(
            lambda: default_runs() >= canaries // 3, timeout=180, interval=0.1, what="a third of the tasks"
        )
        replica_info = replica.client().info("replication")
        lag = master.client().info("replication")["master_repl_offset"] - replica_info["slave_repl_offset"]
        assert master.proc is not None
        master.proc.kill()  # SIGKILL: whatever the replica had not received is gone
        killed = time.monotonic()
        wait_for(lambda: sentinels[0].master_port() == replica.port, timeout=60, what="the replica promoted")
        promoted_in = time.monotonic() - killed
        refused = ""
        if master_args:
            # The promoted replica has the same setting and no replica of its own: it refuses every
            # write until the old master is back, and the sentinels make that one its replica.
            refused = _refuses_writes(replica)
            # Only once every sentinel has the new master: an old master started again (empty, no
            # persistence) before they agree was once made master again, the data-holding replica
            # its replica (docs/sentinel.md).
            wait_for(
                lambda: all(s.master_port() == replica.port for s in sentinels),
                timeout=30,
                what="every sentinel on the new master",
            )
            master.start(*master_args)
            wait_for(lambda: _in_sync(replica), timeout=60, what="the old master a replica of the new")
            refused += f", writes again {time.monotonic() - killed:.1f} s after the kill"
        before = default_runs()
        wait_for(
            lambda: default_runs() > before, timeout=120, interval=0.1, what="a task after the promotion"
        )
        resumed_in = time.monotonic() - killed

        out, _ = producer.communicate(timeout=400)
        assert producer.returncode == 0, (tmp_path / "producer.log").read_text()[-3000:]
        wait_for(
            lambda: all(w.nodename in _flower_workers(flower_port) for w in workers),
            timeout=90,
            interval=1,
            what="Flower listing the workers after the failover",
        )
        alive = all(w.proc is not None and w.proc.poll() is None for w in workers)

        produced = json.loads(ids_file.read_text())
        states: dict[str, str] = produced["states"]
        canary_ids, email_keys = produced["ids"]["canary"], produced["ids"]["email"]
        runs = runs_by_id(*(w.log() for w in workers))
        inbox = Counter(m.message["Message-ID"] for m in smtp_server.handler.received)
        wanted = {message_id_for(key, Settings()): key for key in email_keys.values()}
        failed = {i: s for i, s in states.items() if s != "SUCCESS"}
        missing = [key for mid, key in wanted.items() if mid not in inbox]
        # What kind of write the failover took: a task that ran but has no result lost its result;
        # one that never ran lost its queued message; a sent email with no `sent` record, its ledger entry.
        ledger = Ledger(redis_client(f"redis://127.0.0.1:{replica.port}/0"), "email", 60)
        kinds = Counter("result" if i in runs else f"message ({s or 'none'})" for i, s in failed.items())
        kinds["email"] = len(missing)
        kinds["ledger"] = sum(1 for k in email_keys.values() if (ledger.get(k) or {}).get("state") != "sent")
        twice = {i: n for i, n in runs.items() if n > 1 and i in canary_ids}
        note = (
            f"{' '.join(arg.lstrip('-') for arg in master_args) or 'async replication'}; "
            f"replica {lag} bytes behind at the kill, promoted in {promoted_in:.1f} s; lost: "
            + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
            + f"; {produced['publish_retries']} publish retries{refused}"
        )
        outcome = report(
            Outcome(
                f"sentinel failover ({'min-replicas 1' if master_args else 'async'})",
                sent=len(states),
                done=len(states) - len(failed),
                lost=len(failed) + len(missing),
                duplicated=len(twice) + sum(n - 1 for n in inbox.values() if n > 1),
                resumed_in=resumed_in,
                note=note,
            )
        )
        assert alive, "a worker exited"
        assert int(out.strip()) == outcome.done
        assert outcome.lost >= 0 and outcome.duplicated >= 0  # reported, not forbidden: see docs/sentinel.md
        assert all(s in ("SUCCESS", "FAILURE", "PENDING") for s in states.values()), Counter(states.values())
    finally:
        for process in (producer, flower):
            if process is not None:
                stop_process(process)
        for worker in workers:
            worker.stop()
        for server in sentinels:
            server.stop()
        replica.stop()
        master.stop()


def test_a_switch_to_the_next_sentinel_url_keeps_procs_transport():
    """kombu's failover picks an alternate URL's transport by its scheme: `sentinel` must be proj's."""
    from kombu import Connection

    import proj.celery  # noqa: F401  (the app registers the alias unless PROJ_STOCK_CELERY=1)
    from proj.integration.kombu_transport import SentinelTransport

    connection = Connection("sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0", transport=SentinelTransport)
    connection.switch(connection.alt[1])
    assert type(connection.transport) is SentinelTransport
