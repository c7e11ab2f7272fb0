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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import struct
from dataclasses import dataclass, field

from novacron.agent.vm.errors import VMStartError
from novacron.agent.vm.spec import NET_NAME_RE, SpecError, VMSpec

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFNAMSIZ = 16


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
