"""Three hosts (network namespaces, own addresses and hostnames) share one Redis and one SMTP server.

Each host runs an email worker and a default worker that reach Redis and the SMTP server over a veth
bridge. 300 emails to three rate-limited domains and 600 default tasks run through them. Host B's
cable is pulled mid-run (its veth down: packets dropped, nothing reset) while one of its email
threads holds a claimed message (stopped before RCPT's reply) and its default worker runs a task,
and plugged back once A and C have finished what B had taken. The per-domain limits and the ledger
must hold across the hosts, B's taken messages come back after its lease, and nothing is lost or
sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from proj.mail import message_id_for
from proj.settings import Settings
from proj.stack.devsmtp import MailSink, Received, start
from tests.conftest import EMAIL_QUEUES, FAST_REDELIVERY
from tests.faults.netns import Host, NetnsUnavailable, Network, ensure_tools
from tests.faults.scenario import Outcome, report, runs_by_id, scaled, settle
from tests.harness import IN_CI, ROOT, RedisServer, WorkerProcess, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.layer]

DOMAINS = ("a.example", "b.example", "c.example")
PER_SECOND = 3  # each domain's limit
LIMITS = ",".join(f"{domain}={PER_SECOND}/s" for domain in DOMAINS)
# Every 0.75 s a burst of six to one domain, in turn: the limit spreads each burst over 2 s (without
# it the six land within a second), and 8 a second offered against 9 allowed keeps the backlog short.
BATCH, BATCH_EVERY, TICK = 6, 0.75, 0.25
LEASE = float(FAST_REDELIVERY["BROKER_INFLIGHT_LEASE"]) + float(FAST_REDELIVERY["BROKER_RESTORE_INTERVAL"])
# How long before the cut the first copy of an email sent twice may have arrived from B: the only
# window the ledger cannot close is the server's 250 lost on the cable with B's `sent` record.
WINDOW_BEFORE_CUT = 2.0
TASK_EVENT = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] (\w+)")


@dataclass
class SenderSink(MailSink):
    """The development SMTP sink, noting each message's sender address; can hold one address's RCPTs."""

    senders: list[tuple[Received, str]] = field(default_factory=list)
    hold_from: str = ""  # RCPTs from this address wait while it is set
    held_since: float = 0.0  # when the latest of them began to wait

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.hold_from and session.peer[0] == self.hold_from:
            self.held_since = time.time()
            while self.hold_from and session.peer[0] == self.hold_from:
                await asyncio.sleep(0.01)
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):  # nothing awaited since the append: the last one is this message
            self.senders.append((self.received[-1], session.peer[0]))
        return reply


@dataclass
class HostWorker(WorkerProcess):
    """A worker inside one host, named `name@<the host's own hostname>` by Celery itself (%h)."""

    host: Host | None = None

    @property
    def nodename(self) -> str:
        assert self.host is not None
        return f"{self.name}@{self.host.hostname}"

    def command(self) -> list[str]:
        assert self.host is not None
        argv = super().command()
        argv[argv.index("-n") + 1] = f"{self.name}@%h"  # the UTS namespace's name, if it took
        return self.host.run(argv)


def open_ids(*logs: str) -> set[str]:
    """Tasks the logs show received and not yet finished, retried or given up."""
    last: dict[str, str] = {}
    for task_id, event in TASK_EVENT.findall("".join(logs)):
        last[task_id] = event
    return {task_id for task_id, event in last.items() if event == "received"}


def busiest_second(stamps: list[float]) -> int:
    """Most arrivals in any one-second window that starts at an arrival."""
    stamps = sorted(stamps)
    return max((sum(1 for t in stamps if start <= t < start + 1) for start in stamps), default=0)


@dataclass
class Cut:
    """Host B's cable: pulled while it holds work, plugged back once A and C have finished that work."""

    host: Host
    email: HostWorker
    default: HostWorker
    sink: SenderSink
    cut_at: float = 0.0
    restored_at: float = 0.0
    cut_wall: float = 0.0
    taken: set[str] = field(default_factory=set)
    log_at_restore: int = 0

    def logs(self) -> str:
        return self.email.log() + self.default.log()

    def step(self, app: Any, mail_so_far: int, mail_before_cut: int) -> None:
        """One look: hold B's next RCPT, cut once it waits there (and a task runs), plug back when due."""
        if not self.cut_at and mail_so_far >= mail_before_cut:
            held_for = time.time() - self.sink.held_since if self.sink.held_since else None
            if held_for is None:
                self.sink.hold_from = self.host.address
            elif held_for < 1.0 and self._running():
                self.host.link(up=False)
                self.cut_at, self.cut_wall = time.monotonic(), time.time()
                self.sink.hold_from = ""  # its RCPT is answered into the void
            else:  # let it go before its client's 2 s timeout gives the claim back; hold the next
                self.sink.hold_from, self.sink.held_since = "", 0.0
        elif self.cut_at and not self.restored_at and time.monotonic() - self.cut_at > LEASE:
            # What B had taken and not finished at the cut: A and C must finish it (its lease ran
            # out, a sweep put it back on its queue) while B is still cut off.
            self.taken = open_ids(self.logs())
            if all(app.AsyncResult(i).state == "SUCCESS" for i in self.taken):
                self.host.link(up=True)
                self.restored_at = time.monotonic()
                self.log_at_restore = len(self.logs())

    def _running(self) -> bool:
        """B's default worker has a task received and not finished (they take 0.1 s each)."""
        with contextlib.suppress(TimeoutError):
            return bool(wait_for(lambda: open_ids(self.default.log()), timeout=0.5, interval=0.02))
        return False

    def ran_after(self) -> int:
        return self.logs()[self.log_at_restore :].count(" succeeded in ")


@pytest.fixture
def network() -> Iterator[Network]:
    """Hosts a, b and c on a bridge of their own; missing `ip netns` fails in CI, skips elsewhere."""
    net = Network(("a", "b", "c"))
    try:
        ensure_tools()
        net.create()
    except (NetnsUnavailable, subprocess.CalledProcessError) as exc:
        net.destroy()
        reason = getattr(exc, "stderr", None) or str(exc)
        if IN_CI:
            pytest.fail(f"network namespaces unavailable: {reason}")
        pytest.skip(f"network namespaces unavailable: {reason}")
    try:
        yield net
    finally:
        left = net.destroy()
        assert not left, f"could not delete {left}"


@pytest.fixture
def bridge_smtp(network: Network) -> Iterator[Any]:
    """The SMTP sink on the bridge address, where every host reaches it."""
    handler = SenderSink()
    controller = start(handler, network.gateway, free_port())
    controller.handler = handler
    yield controller
    controller.stop()


def _start(workers: list[HostWorker], app: Any) -> None:
    """Popen each, then wait: the six start side by side; a ping answered by name@<hostname> proves both."""
    for worker in workers:
        worker.proc = subprocess.Popen(
            worker.command(),
            cwd=ROOT,
            env=worker.env,
            stdout=worker.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
    for worker in workers:
        wait_for(lambda w=worker: w._answers(app), timeout=90, interval=0.3, what=worker.nodename)


def _email(app: Any, i: int, key: str) -> Any:
    to = f"r{i}@{DOMAINS[i // BATCH % len(DOMAINS)]}"
    kwargs = {"to": to, "subject": "s", "text": "t", "idempotency_key": key}
    return app.send_task("tasks.email.send_email", kwargs=kwargs)


@pytest.mark.timeout(300)
def test_hosts_share_limits_and_ledger_and_a_cut_off_host_is_covered(
    network: Network, bridge_smtp: Any, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    server = RedisServer().start("--bind", "127.0.0.1", network.gateway, "--protected-mode", "no")
    on_bridge = f"redis://{network.gateway}:{server.port}/0"
    env = {
        **worker_env,
        **FAST_REDELIVERY,
        "REDIS_URL": on_bridge,
        "CELERY_BROKER_URL": on_bridge,
        "CELERY_RESULT_BACKEND": on_bridge,
        "SMTP_HOST": network.gateway,
        "SMTP_PORT": str(bridge_smtp.port),
        "SMTP_TIMEOUT": "2",  # a 14 s claim window: B's claimed email is free for A and C sooner
        "EMAIL_RATE_LIMITS": LIMITS,
    }
    # An app of its own on this Redis (Celery reads CELERY_BROKER_URL before its configuration).
    monkeypatch.setenv("CELERY_BROKER_URL", server.url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", server.url)
    app = Celery("hosts", amqp="proj.integration.producer:AMQP", task_cls="proj.integration.requeue:Task")
    app.config_from_object("celeryconfig")
    hosts = network.hosts
    workers = {
        label: (
            HostWorker(queues=EMAIL_QUEUES, name="email", env=env, concurrency=2, host=host),
            HostWorker(queues="default", name="default", env=env, pool="solo", concurrency=1, host=host),
        )
        for label, host in hosts.items()
    }
    everyone = [w for pair in workers.values() for w in pair]
    sink: SenderSink = bridge_smtp.handler
    cut = Cut(hosts["b"], *workers["b"], sink=sink)
    try:
        _start(everyone, app)
        canaries = [app.send_task("tasks.health.canary", args=[0.1]) for _ in range(scaled(600))]
        keys = [f"hosts-{i}" for i in range(scaled(300))]
        emails: list[Any] = []
        deadline, next_batch = time.monotonic() + 200, 0.0
        while not (cut.restored_at and len(emails) == len(keys)) and time.monotonic() < deadline:
            if time.monotonic() >= next_batch:
                upto = min(len(emails) + BATCH, len(keys))
                emails += [_email(app, i, keys[i]) for i in range(len(emails), upto)]
                next_batch = time.monotonic() + BATCH_EVERY
            cut.step(app, len(sink.received), len(keys) // 6)
            time.sleep(TICK)
        assert cut.cut_at, f"never cut: {len(sink.received)} emails arrived; B's default worker idle?"
        assert cut.restored_at, f"A and C did not finish B's taken tasks while it was cut off: {cut.taken}"
        stuck = settle(canaries + emails, timeout=120)
        # B answers again over its cable, and its own late writes (a result, an ack) have landed.
        for worker in workers["b"]:
            wait_for(
                lambda w=worker: w._answers(app), timeout=60, interval=0.5, what=f"{worker.nodename} back"
            )
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: not (open_ids(cut.logs()) & cut.taken), timeout=20, interval=0.5, what="B's lines"
            )

        runs = runs_by_id(*(w.log() for w in everyone))
        canary_ids, email_ids = {r.id for r in canaries}, {r.id for r in emails}
        twice = {i for i, n in runs.items() if n > 1 and i in canary_ids}
        again = {i for i, n in runs.items() if n > 1 and i in email_ids}  # found `sent`: duplicate: true
        inbox = Counter(item.message["Message-ID"] for item in sink.received)
        wanted = {message_id_for(key, Settings()) for key in keys}
        extra = {mid: n for mid, n in inbox.items() if n > 1}
        from_b = {
            i.message["Message-ID"]: i.received_at for i, peer in sink.senders if peer == cut.host.address
        }
        in_window = {m for m in extra if 0 <= cut.cut_wall - from_b.get(m, 0.0) <= WINDOW_BEFORE_CUT}
        failed = [r for r in canaries + emails if r.state != "SUCCESS"]
        senders = Counter(peer for _, peer in sink.senders)
        by_domain = {
            d: busiest_second([i.received_at for i in sink.received if i.rcpt_tos[0].endswith("@" + d)])
            for d in DOMAINS
        }
        held = f"{len(cut.taken & canary_ids)} task(s) and {len(cut.taken & email_ids)} email(s)"
        report(
            Outcome(
                "many hosts",
                sent=len(canaries) + len(emails),
                done=len(canaries) + len(emails) - len(failed),
                lost=len(failed) + len(wanted - set(inbox)),
                duplicated=len(twice) + sum(n - 1 for n in extra.values()),
                resumed_in=cut.restored_at - cut.cut_at,
                note=(
                    f"3 hosts; B cut off {cut.restored_at - cut.cut_at:.1f} s (lease {LEASE:.0f} s) until A "
                    f"and C had done the {held} it held; run twice: {len(twice)} task(s) B had run; "
                    f"{len(again)} email tasks ended again on the ledger's record; mail by host "
                    f"{sorted(senders.values())}; busiest second per domain {sorted(by_domain.values())} "
                    f"(limit {PER_SECOND}/s); B ran {cut.ran_after()} after its return"
                ),
            )
        )
        assert not stuck, [(r.id, r.state) for r in stuck[:5]]
        assert not failed, [(r.id, r.state, r.result) for r in failed[:5]]
        assert set(inbox) == wanted
        assert set(extra) == in_window, "an email sent twice outside the cut's accepted-not-recorded window"
        # B's RCPT is held at the cut, so it always holds an email; whether its default worker is
        # inside a task at that instant depends on the machine's load, so tasks are only reported.
        assert cut.taken & email_ids, f"B held no email: {cut.taken}"
        # A task runs twice only if B had taken it before the cut and could not acknowledge it.
        assert twice <= cut.taken, twice - cut.taken
        # Limits hold across hosts: a one-second window may also catch the next slot's message.
        assert max(by_domain.values()) <= PER_SECOND + 1, by_domain
        assert set(senders) == {h.address for h in hosts.values()}, senders  # every host sent mail
        assert all(w.proc is not None and w.proc.poll() is None for w in everyone), "a worker exited"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            cut.host.link(up=True)  # a cut-off worker cannot shut down warm
        for worker in everyone:
            worker.stop(timeout=20)
        server.stop()
