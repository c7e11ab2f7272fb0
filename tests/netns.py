"""Network namespaces as test "hosts": created with unique names, always removed.

``Fabric`` builds the topology the VM-network tests use, in the benchmarking
range 198.18.0.0/15 (RFC 2544, never routed) and only inside namespaces it
creates, so nothing on this machine's own network changes:

    ns hA:  bridge br-prod 198.18.0.1/24 --veth--+
    ns hB:  bridge br0     198.18.0.2/24 --veth--+-- ns cl: bridge fab 198.18.0.100/24
                                                   (the client; one L2 segment)

Each host's bridge is where its agent puts VM taps (``[networks] prod = ...``,
named differently on the two hosts on purpose). Agents run in hA/hB
(``ip netns exec``), listen on the hosts' addresses; the test itself talks
from cl (``inside``): a thread's network namespace decides where its sockets live.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

# one implementation, shared with ``novacron bench wan``
from novacron.bench._netns import inside, ip, tbf

__all__ = ["Fabric", "SlowLink", "inside", "ip", "tbf"]


@dataclass
class Fabric:
    suffix: str
    a_bridge: str = "br-prod"
    b_bridge: str = "br0"
    a_addr: str = "198.18.0.1"
    b_addr: str = "198.18.0.2"
    client_addr: str = "198.18.0.100"

    @property
    def a(self) -> str:
        return f"nc-ha-{self.suffix}"

    @property
    def b(self) -> str:
        return f"nc-hb-{self.suffix}"

    @property
    def client(self) -> str:
        return f"nc-cl-{self.suffix}"

    def create(self) -> None:
        for ns in (self.a, self.b, self.client):
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", "fab", "type", "bridge", ns=self.client)
        ip("addr", "add", f"{self.client_addr}/24", "dev", "fab", ns=self.client)
        ip("link", "set", "fab", "up", ns=self.client)
        for ns, bridge, addr, port in ((self.a, self.a_bridge, self.a_addr, "pa"),
                                       (self.b, self.b_bridge, self.b_addr, "pb")):
            ip("link", "add", bridge, "type", "bridge", ns=ns)
            ip("addr", "add", f"{addr}/24", "dev", bridge, ns=ns)
            ip("link", "add", "up0", "type", "veth", "peer", "name", port, "netns", self.client, ns=ns)
            ip("link", "set", "up0", "master", bridge, ns=ns)
            ip("link", "set", port, "master", "fab", ns=self.client)
            for dev, where in ((bridge, ns), ("up0", ns), (port, self.client)):
                ip("link", "set", dev, "up", ns=where)

    def pace(self, mbit: float) -> None:
        """Each host's uplink sends at most ``mbit`` Mbit/s (``tc tbf``): a slow link
        between the two hosts."""
        for ns in (self.a, self.b):
            tbf(ns, "up0", mbit)

    def destroy(self) -> None:
        for ns in (self.a, self.b, self.client):  # veths, bridges and taps go with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def taps(self, ns: str) -> list[str]:
        """The agent-made taps (``nctap*``) in a host namespace."""
        out = ip("-o", "link", "show", ns=ns)
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                      if line.split(":")[1].strip().startswith("nctap"))

    def __enter__(self) -> Fabric:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()


@dataclass
class SlowLink:
    """Two namespaces joined by a veth pair whose both directions are paced by
    ``tc tbf`` at ``mbit`` Mbit/s: a real slow link (kernel queues and all), in the
    benchmarking range 198.19.0.0/24."""

    suffix: str
    mbit: float
    a_addr: str = "198.19.0.1"
    b_addr: str = "198.19.0.2"

    @property
    def a(self) -> str:
        return f"nc-sa-{self.suffix}"

    @property
    def b(self) -> str:
        return f"nc-sb-{self.suffix}"

    def create(self) -> None:
        for ns in (self.a, self.b):
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", "sl0", "type", "veth", "peer", "name", "sl1", "netns", self.b, ns=self.a)
        for ns, dev, addr in ((self.a, "sl0", self.a_addr), (self.b, "sl1", self.b_addr)):
            ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            ip("link", "set", dev, "up", ns=ns)
            tbf(ns, dev, self.mbit)

    def destroy(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def __enter__(self) -> SlowLink:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
