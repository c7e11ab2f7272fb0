"""Network follows the VM (issue 12, Must show), with real namespaces as hosts.

Two agents, each inside its own host namespace with its own bridge (named
differently on each: the fleet network ``prod`` is ``br-prod`` on A and ``br0``
on B), and a client in a third namespace on the same L2 segment (tests/netns.py).
The guest gets a virtio NIC on ``prod`` and runs a TCP echo service; the client
holds one TCP connection and sends a request every 10 ms through a live
migration A -> B. The connection must survive with every reply in order, and
the test prints the longest gap between replies beside the migration's
measured downtime. Taps: one on A's bridge before, none after; one on B's.
Before that, a migration to an agent that lacks the network is refused at
admission and the VM (and the connection) carries on at A.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time

import pytest

from novacron.agent.guest import ensure_guest
from novacron.agent.local import LocalAgent
from tests.migration.agents import Api
from tests.netns import Fabric, inside

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUEST_IP = "198.18.0.50"
PORT = 7000
PERIOD_S = 0.010


class EchoClient:
    """One TCP connection; a numbered line every 10 ms, each reply timed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        # as request/response clients do: without it Nagle holds every request behind the
        # one lost in the source's tap during the pause, and only the 200 ms RTO recovers
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0
        self.replies: list[tuple[int, float]] = []  # (seq, monotonic arrival)
        self.running = True

    async def send_loop(self) -> None:
        next_at = time.monotonic()
        while self.running:
            self.writer.write(f"{self.sent}\n".encode())
            await self.writer.drain()
            self.sent += 1
            next_at += PERIOD_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def read_loop(self) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the guest closed the connection")
            self.replies.append((int(line), time.monotonic()))

    def longest_gap(self, since: float, until: float = float("inf")) -> float:
        times = [t for _s, t in self.replies if since <= t <= until]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


ETH_P_RARP = 0x8035


def rarp_listener(ifname: str) -> socket.socket:
    """Raw socket seeing the RARP frames QEMU's announce-self sends (on the client's bridge)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
    sock.bind((ifname, ETH_P_RARP))
    sock.setblocking(False)
    return sock


def rarp_senders(sock: socket.socket) -> list[str]:
    """Source MACs of the RARP frames received so far."""
    macs = []
    while True:
        try:
            frame = sock.recv(2048)
        except BlockingIOError:
            return macs
        macs.append(":".join(f"{b:02x}" for b in frame[6:12]))


async def connect(timeout: float = 60) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(asyncio.open_connection(GUEST_IP, PORT), 5)
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_tcp_connection_survives_live_migration() -> None:
    guest = ensure_guest()
    secret = secrets.token_urlsafe(32)
    with Fabric(f"{os.getpid()}{secrets.token_hex(2)}") as net, inside(net.client):
        a = LocalAgent("a", cluster_secret=secret, accel="tcg", netns=net.a, address=net.a_addr,
                       settings={"networks": f"prod={net.a_bridge}"})
        b = LocalAgent("b", cluster_secret=secret, accel="tcg", netns=net.b, address=net.b_addr,
                       settings={"networks": f"prod={net.b_bridge}"})
        async with a, b:
            api_a, api_b = Api(a), Api(b)
            assert (await api_a.ok("GET", "/v1/host"))["networks"] == ["prod"]
            spec = {"name": "web", "vcpus": 1, "memory_mb": 128, "accel": "tcg",
                    "kernel": str(guest.kernel), "initrd": str(guest.initrd),
                    "cmdline": guest.network_cmdline(f"{GUEST_IP}/24", PORT, rate_mb=1),
                    "nics": [{"net": "prod"}]}  # fmt: skip
            # a network this host lacks: refused before anything starts
            status, doc = await a.request("POST", "/v1/vms", {**spec, "nics": [{"net": "dev"}]})
            assert status == 400 and "no network 'dev'" in doc["error"], doc
            assert net.taps(net.a) == [] and a.qemu_pids() == []

            created = await api_a.ok("POST", "/v1/vms", spec, want=201)
            mac = created["spec"]["nics"][0]["mac"]
            booted = await api_a.wait_console("web", r"NOVACRON-NET ip=\S+ port=\d+ mac=(\S+)", timeout=150)
            assert booted.group(1) == mac  # the guest sees the MAC the agent generated and kept
            assert len(net.taps(net.a)) == 1 and net.taps(net.b) == []

            client = EchoClient(*await connect())
            sender = asyncio.create_task(client.send_loop())
            reader = asyncio.create_task(client.read_loop())
            try:
                while len(client.replies) < 50:  # the service answers before we move it
                    await asyncio.sleep(0.05)
                    assert not reader.done(), reader
                calm = time.monotonic()
                await asyncio.sleep(2)  # the gap a busy TCG guest shows with nothing moving
                # a host without the VM's network: the destination refuses it at admission,
                # before any memory moves, and the VM runs on where it was
                async with LocalAgent("c", cluster_secret=secret, accel="tcg", netns=net.b,
                                      address=net.b_addr) as c:
                    assert (await Api(c).ok("GET", "/v1/host"))["networks"] == []
                    refused = await api_a.wait_migration((await api_a.migrate("web", c))["id"])
                    assert refused["phase"] == "failed" and "no network 'prod'" in str(refused), refused
                    assert not c.qemu_pids() and net.taps(net.b) == []
                assert (await api_a.ok("GET", "/v1/vms/web"))["state"] == "running"
                baseline_ms = client.longest_gap(calm, time.monotonic()) * 1000
                started = time.monotonic()
                rarp = rarp_listener("fab")
                mig = await api_a.migrate("web", b, downtime_ms=300)
                st = await api_a.wait_migration(mig["id"])
                assert st["phase"] == "completed", st
                ended = time.monotonic()
                before = len(client.replies)
                deadline = ended + 30
                while len(client.replies) < before + 100:  # traffic flows at the destination
                    assert time.monotonic() < deadline, "no replies after the migration"
                    assert not reader.done(), reader
                    await asyncio.sleep(0.05)
            finally:
                client.running = False
                await asyncio.gather(sender, return_exceptions=True)
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                client.writer.close()
            announced = rarp_senders(rarp)
            rarp.close()
            assert announced.count(mac) >= 1, announced  # announce-self from B reached the segment
            seqs = [s for s, _t in client.replies]
            assert seqs == list(range(len(seqs))), "replies lost or out of order"
            gap_ms = client.longest_gap(started) * 1000
            downtime_ms = st["metrics"]["downtime_ms"]
            print(f"\nnetwork follows the VM: longest reply gap {gap_ms:.1f} ms, migration downtime "
                  f"{downtime_ms} ms, total {st['metrics']['total_s']} s, {len(seqs)} requests over one connection, "
                  f"{announced.count(mac)} RARP announcements seen; longest gap with no migration {baseline_ms:.1f} ms")
            # the connection carried on at B, on B's own bridge, with the same MAC
            moved = await api_b.ok("GET", "/v1/vms/web")
            assert moved["state"] == "running" and moved["spec"]["nics"][0]["mac"] == mac
            assert len(net.taps(net.b)) == 1 and net.taps(net.a) == []  # A's tap went with its QEMU
            assert gap_ms < 10_000  # bounded; the printed numbers are the result
            await api_b.ok("DELETE", "/v1/vms/web", want=200)
            assert net.taps(net.b) == []
