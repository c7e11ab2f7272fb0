"""Host networks: a VM's NIC names a fleet network, this agent maps it to a bridge.

``[networks] prod = "br-prod"`` in the agent config says that on this host the
fleet network ``prod`` is the Linux bridge ``br-prod`` (another host may call
its bridge ``br0``). A spec naming a network this host lacks is refused before
anything starts (a 400, or a refused migration admission).

The agent creates each tap itself: it opens ``/dev/net/tun`` (``TUNSETIFF``,
a non-persistent tap), enslaves it to the bridge and brings it up, and QEMU
inherits only the descriptor (``-netdev tap,fd=N``), like its images. So QEMU
needs no CAP_NET_ADMIN and no access to /dev/net/tun, and cleanup is the
kernel's: a non-persistent tap disappears with its last descriptor, i.e. when
QEMU exits (stop, delete, crash, or the source's release after a migration);
the agent closes its own copy right after QEMU has started.

A migration destination keeps one duplicate of each tap until its guest runs
(``TapAnnouncer``): when the source pauses the guest, the destination writes a
RARP "from" the VM's MAC into its taps, so the bridges (and the switches behind
them) move the VM's port to this host *during* the pause. Frames for the guest
then queue in this host's tap (QEMU reads none while the guest is stopped) and
reach the guest in order when it resumes, instead of being lost in the paused
source's tap and waiting for the sender's TCP retransmission timer.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass, field

from novacron.agent.vm.errors import VMStartError
from novacron.agent.vm.spec import NET_NAME_RE, SpecError, VMSpec

log = logging.getLogger("novacron.agent.vm")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFNAMSIZ = 16
ETH_P_RARP = 0x8035


class NetworkError(VMStartError):
    """A tap could not be made or attached (the host's problem, not the caller's: 500)."""


def check_mapping(networks: dict[str, str]) -> dict[str, str]:
    """The ``[networks]`` config: ValueError names a bad network or bridge name."""
    for net, bridge in networks.items():
        if not NET_NAME_RE.match(net):
            raise ValueError(f"networks.{net}: network names are 1-31 lowercase letters, digits, '_' "
                             "or '-', starting with a letter")
        if not bridge or len(bridge) >= IFNAMSIZ or "/" in bridge or bridge in (".", "..") \
                or any(c.isspace() for c in bridge):
            raise ValueError(f"networks.{net}: {bridge!r} is not a Linux interface name")
    return dict(networks)


def _ifreq(name: str, data: bytes = b"") -> bytes:
    return struct.pack(f"{IFNAMSIZ}s", name.encode()) + data.ljust(24, b"\0")


@dataclass(frozen=True)
class HostNetworks:
    """Fleet network name -> local bridge, for this host."""

    bridges: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.bridges)

    def missing_bridges(self) -> list[str]:
        """Mapped bridges that do not exist (yet) in this agent's network namespace."""
        missing = []
        for bridge in sorted(set(self.bridges.values())):
            try:
                socket.if_nametoindex(bridge)
            except OSError:
                missing.append(bridge)
        return missing

    def check(self, spec: VMSpec) -> None:
        """SpecError (a 400) naming the first network of ``spec`` this host lacks."""
        for i, nic in enumerate(spec.nics):
            if nic.net not in self.bridges:
                have = ", ".join(self.names) or "none"
                raise SpecError(f"nics[{i}].net: this host has no network {nic.net!r} (it has: {have})")

    def open_taps(self, spec: VMSpec) -> tuple[int, ...]:
        """One tap per NIC, each attached to its network's bridge and up; the
        descriptors are QEMU's to inherit (closing the last one removes the tap)."""
        self.check(spec)
        fds: list[int] = []
        try:
            for nic in spec.nics:
                fds.append(self._tap(self.bridges[nic.net]))
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return tuple(fds)

    @staticmethod
    def _tap(bridge: str) -> int:
        # not /sys/class/net: sysfs shows the netns that mounted it, not necessarily ours
        try:
            socket.if_nametoindex(bridge)
        except OSError:
            raise NetworkError(f"bridge {bridge!r} does not exist on this host (check [networks])") from None
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            name = "nctap" + secrets.token_hex(4)  # unique per host; 13 < IFNAMSIZ
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI)))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                index = socket.if_nametoindex(name)
                fcntl.ioctl(ctl, SIOCBRADDIF, _ifreq(bridge, struct.pack("i", index)))
                flags = struct.unpack_from("H", fcntl.ioctl(ctl, SIOCGIFFLAGS, _ifreq(name)), IFNAMSIZ)[0]
                fcntl.ioctl(ctl, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
        except OSError as exc:
            os.close(fd)  # the tap goes with it
            raise NetworkError(f"cannot put a tap on bridge {bridge!r} (is it a bridge?): "
                               f"{exc.strerror or exc}") from None
        return fd


def rarp_frame(mac: str) -> bytes:
    """The announcement QEMU's ``announce-self`` sends: a broadcast RARP request from
    ``mac`` (switches learn its port; hosts ignore it), padded to Ethernet's minimum."""
    hw = bytes.fromhex(mac.replace(":", ""))
    rarp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + hw + bytes(4) + hw + bytes(4)
    return (b"\xff" * 6 + hw + struct.pack("!H", ETH_P_RARP) + rarp).ljust(60, b"\0")


class TapAnnouncer:
    """The agent's own duplicates of an incoming VM's taps, to announce its MACs from
    this host before QEMU runs the guest (see the module's docstring). Our taps carry
    plain frames (no IFF_VNET_HDR), so a write is one frame into the bridge. Closed once
    the guest runs here or QEMU exits: the tap must go with QEMU's last descriptor."""

    def __init__(self, taps: tuple[int, ...], macs: list[str]) -> None:
        if len(taps) != len(macs):
            raise ValueError(f"{len(macs)} NICs but {len(taps)} taps")
        self._taps = [(os.dup(fd), mac) for fd, mac in zip(taps, macs, strict=True)]

    def announce(self) -> int:
        """One RARP per NIC now; returns how many went out (a failure is logged: the
        announcement after resume still follows)."""
        sent = 0
        for fd, mac in self._taps:
            try:
                os.write(fd, rarp_frame(mac))
                sent += 1
            except OSError as exc:
                log.warning("early announcement failed", extra={"mac": mac, "error": str(exc)})
        return sent

    def close(self) -> None:
        taps, self._taps = self._taps, []
        for fd, _mac in taps:
            with contextlib.suppress(OSError):
                os.close(fd)
