"""Emulated nodes joined by links of a known speed: one network namespace per node, a switch.

``ShapedNetwork(nodes=2)`` creates the namespaces ``adp-n1`` ... ``adp-nK`` and ``adp-sw``. Each node
has one interface (``adpv<i>``, address 10.231.0.<i>/24) whose veth peer (``adps<i>``) is a port of a
bridge in the switch namespace: a star, like nodes on one non-blocking switch. Interfaces are
created directly inside the namespaces; the host's own interfaces, routes and addresses are never
touched. ``shape(rate)`` puts a token-bucket filter (``tc tbf``) on both directions of every node's
link, so each node sends and receives at most ``rate`` bytes per second (full duplex), the way a
NIC of that speed would; ``shape(None)`` removes it.

Only the rate can be set. Latency would need ``tc netem``, and this machine's kernel does not
have it ("Specified qdisc kind is unknown"). ``has_netem()`` says whether it is there.

A token bucket lets a transfer smaller than its bucket (``burst_bytes``) through at once after a
pause, so bandwidth is measured with transfers much larger than that.
The tbf rate counts whole frames (Ethernet, IP and TCP headers included), so TCP payload moves at
about 1448/1514 = 0.956 of it with 1500-byte frames (``payload_rate``).

Needs root and iproute2 (``ip``, ``tc``). Processes run in a node with ``command(node, argv)``;
gloo must be told the interface (``GLOO_SOCKET_IFNAME``, in ``env(node)``) because the node's
hostname resolves to an address outside its namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

FRAME_PAYLOAD = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 with timestamps


def missing_tools() -> list[str]:
    """What this machine lacks to build the network (empty list: it can)."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def has_netem() -> bool:
    """Whether the kernel has tc's netem qdisc (latency), tried on a throwaway namespace's lo."""
    ns = "adp-netem-probe"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        return subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def burst_bytes(rate_Bps: float) -> int:
    """The token bucket ``shape`` gives a link of ``rate_Bps``."""
    return max(64 << 10, int(rate_Bps * 2e-3))


def payload_rate(rate_Bps: float) -> float:
    """TCP payload bytes per second through a link shaped at ``rate_Bps`` (frame bytes)."""
    return rate_Bps * FRAME_PAYLOAD


class ShapedNetwork:
    def __init__(self, nodes: int = 2, prefix: str = "adp", subnet: str = "10.231.0") -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be 1..250, got {nodes}")
        self.prefix, self.subnet = prefix, subnet
        self.nodes = list(range(1, nodes + 1))
        self.switch = f"{prefix}-sw"
        self.rate_Bps: float | None = None

    # names -----------------------------------------------------------------------------------
    def namespace(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def interface(self, node: int) -> str:
        return f"{self.prefix}v{node}"

    def port(self, node: int) -> str:
        return f"{self.prefix}s{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node}"

    # life cycle ------------------------------------------------------------------------------
    def _ip(self, *args: str, ns: str | None = None) -> None:
        subprocess.run(["ip", *(("-n", ns) if ns else ()), *args], check=True, capture_output=True, text=True)

    def namespaces(self) -> list[str]:
        return [self.switch, *(self.namespace(n) for n in self.nodes)]

    def start(self) -> "ShapedNetwork":
        self.stop()  # namespaces of ours left by a run that was killed
        for ns in self.namespaces():
            self._ip("netns", "add", ns)
            self._ip("link", "set", "lo", "up", ns=ns)
        bridge = f"{self.prefix}br"
        self._ip("link", "add", bridge, "type", "bridge", ns=self.switch)
        self._ip("link", "set", bridge, "up", ns=self.switch)
        for n in self.nodes:
            ns = self.namespace(n)
            # both ends are born inside their namespaces: nothing appears in the host's
            self._ip("link", "add", self.interface(n), "netns", ns, "type", "veth",
                     "peer", "name", self.port(n), "netns", self.switch)
            self._ip("link", "set", self.port(n), "master", bridge, "up", ns=self.switch)
            self._ip("addr", "add", f"{self.address(n)}/24", "dev", self.interface(n), ns=ns)
            self._ip("link", "set", self.interface(n), "up", ns=ns)
        return self

    def stop(self) -> None:
        """Delete our namespaces (their interfaces and processes' sockets go with them)."""
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "ShapedNetwork":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # shaping ---------------------------------------------------------------------------------
    def shape(self, rate_Bps: float | None, queue_s: float = 20e-3) -> None:
        """Every node's link at ``rate_Bps`` frame bytes per second each way (None: unshaped), with
        a queue of ``queue_s`` seconds of traffic."""
        for n in self.nodes:
            for ns, dev in ((self.namespace(n), self.interface(n)), (self.switch, self.port(n))):
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                if rate_Bps is None:
                    continue
                # burst: 2 ms of traffic, at least 64 KiB (one GSO packet). Smaller buckets cap
                # the rate below the one set (measured: 4 KiB gives 0.7 of it at 50 MB/s); the
                # price is that a transfer smaller than the bucket, after a pause, passes at once
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                                "rate", f"{int(rate_Bps)}bps", "burst", str(burst_bytes(rate_Bps)),
                                "latency", f"{queue_s * 1e3:g}ms"],
                               check=True, capture_output=True, text=True)
        self.rate_Bps = rate_Bps

    def tx_bytes(self, node: int) -> int:
        """Bytes the node has sent on its link so far."""
        out = subprocess.run(["ip", "-n", self.namespace(node), "-j", "-s", "link", "show", "dev",
                              self.interface(node)], check=True, capture_output=True, text=True).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    # processes -------------------------------------------------------------------------------
    def command(self, node: int, argv: list[str]) -> list[str]:
        """``argv`` run inside the node's namespace."""
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def env(self, node: int, base: dict | None = None) -> dict:
        """Environment for a process in ``node``: gloo on the node's interface."""
        return dict(base if base is not None else os.environ, GLOO_SOCKET_IFNAME=self.interface(node))
