"""Network namespaces as benchmark and test "hosts": created with unique names, always removed.

``inside(ns)`` runs the calling thread in a namespace (sockets it opens and
processes it starts meanwhile stay there); ``ip``/``tbf`` drive iproute2 and
``tc``. ``WanPair`` is ``novacron bench wan``'s topology, in the benchmarking range
198.19.0.0/16 (RFC 2544, never routed) and only inside namespaces it creates::

    ns A  wan0 198.19.0.1/24 ==== tbf-shaped veth, both directions ==== wan1 198.19.0.2/24  ns B
           h2m 198.19.1.2/24 --+                                   +-- h2m 198.19.2.2/24
                               |   ns M (the harness, unshaped)    |
                               +-- m2a 198.19.1.1  m2b 198.19.2.1 -+

The hosts' addresses are their ``wan`` ones; M reaches them over its own
unshaped links (host routes), so the harness's API calls never cross the
shaped link and the ``wan`` veth's counters hold the hosts' traffic alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread in namespace ``ns`` (sockets opened meanwhile stay there)."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


def ip(*args: str, ns: str = "") -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def tbf(ns: str, dev: str, mbit: float, *, replace: bool = False) -> None:
    """Pace ``dev``'s egress in ``ns`` to ``mbit`` Mbit/s with a token bucket (burst: one
    10 ms slice at the rate, at least a few MTUs; latency bounds the queue)."""
    burst = max(16_000, int(mbit * 1e6 / 8 / 100))
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace" if replace else "add", "dev", dev,
                    "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"],
                   check=True, capture_output=True, timeout=20)


def tx_bytes(ns: str, dev: str) -> int:
    """Bytes ``dev`` in ``ns`` has sent (the kernel's counter, Ethernet headers included)."""
    doc = json.loads(ip("-j", "-s", "link", "show", "dev", dev, ns=ns))
    return int(doc[0]["stats64"]["tx"]["bytes"])


@dataclass
class WanPair:
    """Two host namespaces joined by a shaped veth, plus the harness's namespace (above)."""

    suffix: str
    a_addr: str = "198.19.0.1"
    b_addr: str = "198.19.0.2"

    @property
    def a(self) -> str:
        return f"nc-wa-{self.suffix}"

    @property
    def b(self) -> str:
        return f"nc-wb-{self.suffix}"

    @property
    def m(self) -> str:
        return f"nc-wm-{self.suffix}"

    def create(self) -> None:
        for ns in (self.a, self.b, self.m):
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan1", "netns", self.b, ns=self.a)
        for ns, dev, addr in ((self.a, "wan0", self.a_addr), (self.b, "wan1", self.b_addr)):
            ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            ip("link", "set", dev, "up", ns=ns)
        # (names that no "ip link" keyword starts with: "ma" would read as "master")
        for host, mdev, net, addr in ((self.a, "m2a", "198.19.1", self.a_addr),
                                      (self.b, "m2b", "198.19.2", self.b_addr)):
            ip("link", "add", mdev, "type", "veth", "peer", "name", "h2m", "netns", host, ns=self.m)
            ip("addr", "add", f"{net}.1/24", "dev", mdev, ns=self.m)
            ip("addr", "add", f"{net}.2/24", "dev", "h2m", ns=host)
            ip("link", "set", mdev, "up", ns=self.m)
            ip("link", "set", "h2m", "up", ns=host)
            ip("route", "add", f"{addr}/32", "via", f"{net}.2", ns=self.m)

    def shape(self, mbit: float) -> None:
        """Both directions of the A-B link at most ``mbit`` Mbit/s (``tc tbf``)."""
        for ns, dev in ((self.a, "wan0"), (self.b, "wan1")):
            tbf(ns, dev, mbit, replace=True)

    def wire_bytes(self) -> int:
        """Bytes sent over the A-B link so far, both directions."""
        return tx_bytes(self.a, "wan0") + tx_bytes(self.b, "wan1")

    def destroy(self) -> None:
        for ns in (self.a, self.b, self.m):  # the veths go with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def __enter__(self) -> WanPair:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
