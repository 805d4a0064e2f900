"""Hosts on this machine: network namespaces with their own address and hostname, on one bridge.

The test process stays in the machine's namespace and owns the bridge (`<subnet>.1`), where it runs
Redis and the SMTP server; each host is a namespace with one veth into the bridge (`<subnet>.1N`)
and no default route, and its processes run under `unshare --uts` with a hostname of their own.
Taking the host side of a veth down cuts that host off as a pulled cable would: packets are
dropped, connections hang, nothing is reset. Names carry a random tag so parallel runs don't meet.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces, veths or bridges."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def ensure_tools() -> None:
    """`ip` (Debian's iproute2, installed with apt-get when missing) and `unshare`, or NetnsUnavailable."""
    if shutil.which("ip") is None and shutil.which("apt-get") is not None:
        install = ["apt-get", "install", "-y", "-q", "iproute2"]
        if subprocess.run(install, capture_output=True, timeout=300).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
            subprocess.run(install, capture_output=True, timeout=300)
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{' and '.join(missing)} not installed (iproute2, util-linux)")
    probe = f"pjprobe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` is not permitted here: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    """One namespace: its address on the bridge, its hostname, and the host side of its cable."""

    label: str
    netns: str
    veth: str
    address: str
    hostname: str

    def run(self, argv: list[str]) -> list[str]:
        """`argv` inside this host: its network namespace and a UTS namespace named `hostname`."""
        set_name = 'hostname "$0" && exec "$@"'
        return [
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            set_name,
            self.hostname,
            *argv,
        ]

    def link(self, up: bool) -> None:
        """Plug or pull this host's cable (the bridge side of its veth)."""
        _ip("link", "set", self.veth, "up" if up else "down")


def _free_subnet() -> str:
    """A 10.231.N.0/24 no route of this machine uses yet (another run may hold one)."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    free = [n for n in range(1, 255) if f"10.231.{n}." not in routes]
    if not free:
        raise NetnsUnavailable("no free 10.231.N.0/24 subnet")
    return f"10.231.{random.choice(free)}"


@dataclass
class Network:
    """A bridge on this machine and one namespace per host label, torn down by `destroy`."""

    labels: tuple[str, ...]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    subnet: str = ""  # 10.231.N, chosen by `create`
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"pjbr-{self.tag}"

    @property
    def gateway(self) -> str:
        """The machine's own address on the bridge, where Redis and SMTP listen."""
        return f"{self.subnet}.1"

    def create(self) -> Network:
        """Bridge up first, then each namespace with its veth, address and loopback."""
        self.subnet = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for number, label in enumerate(self.labels, start=1):
            host = Host(
                label=label,
                netns=f"pj-{self.tag}-{label}",
                veth=f"pjv-{self.tag}-{label}",
                address=f"{self.subnet}.{10 + number}",
                hostname=f"host-{label}-{self.tag}",
            )
            self.hosts[label] = host
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        return self

    def destroy(self) -> list[str]:
        """Delete every namespace (its veth goes with it) and the bridge; what could not be deleted."""
        left: list[str] = []
        if not self.subnet:  # nothing was made
            return left
        for label in self.labels:
            netns = f"pj-{self.tag}-{label}"
            _ip("link", "del", f"pjv-{self.tag}-{label}", check=False)
            if (
                _ip("netns", "del", netns, check=False).returncode != 0
                and netns in _ip("netns", "list").stdout
            ):
                left.append(netns)
        if _ip("link", "del", self.bridge, check=False).returncode != 0 and self.bridge in _ip("link").stdout:
            left.append(self.bridge)
        return left
