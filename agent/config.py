"""Settings of ``novacron-agent`` (TOML file, ``NOVACRON_AGENT_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from novacron.config import setting
from novacron.connlimits import HttpLimits

ENV_PREFIX = "NOVACRON_AGENT"
DEFAULT_CONFIG = Path("/etc/novacron/agent.toml")


@dataclass
class ImagesConfig:
    dirs: list[Path] = setting(factory=list, help="the only folders VM kernels, initrds and disks "
                               "may come from; a spec names an image relative to one of them "
                               "(empty: <state_dir>/images)")


@dataclass
class AgentConfig:
    host: str = setting("127.0.0.1", help="address of the HTTP API")
    port: int = setting(7700, help="TCP port of the HTTP API; 0 picks a free one")
    data_port: int = setting(7701, help="TCP port of the agent-to-agent migration channel")
    state_dir: Path = setting(Path("/var/lib/novacron/agent"),
                              help="VM state and guest RAM files (best on tmpfs or hugetlbfs)")
    token: str = setting("", help="bearer token required on the HTTP API; required, 16+ characters")
    cluster_secret: str = setting("", help="authenticates agent-to-agent channels, 16+ characters")
    name: str = setting("", help="host name reported to the coordinator (empty: the hostname)")
    coordinator_url: str = setting("", help="register and heartbeat at this coordinator when set")
    coordinator_token: str = setting("", help="the coordinator's agent token")
    advertise_url: str = setting("", help="the API URL the coordinator should use for this agent "
                                 "(empty: http://<host>:<port>)")
    log_level: str = setting("info", help="debug, info, warning or error")
    accel: Literal["auto", "kvm", "tcg"] = setting(
        "auto", help="auto: boot-probe KVM (a /dev/kvm that exists may still hang guests); "
        "tcg: never use KVM; kvm: trust KVM without probing")
    accel_cache: str = setting("", help="where the KVM probe's answer is cached "
                               "(empty: ~/.cache/novacron/accel-probe.json)")
    vms_on_exit: Literal["keep", "stop"] = setting(
        "keep", help='on exit, "keep" leaves VMs running for the next agent to adopt; '
        '"stop" powers them off')
    stop_timeout_s: float = setting(60.0, help="seconds a graceful stop or reboot waits for the guest "
                                    "to power off after the ACPI power button, before powering it off "
                                    "(a request's timeout_s overrides it)")
    cpu_models: list[str] = setting(factory=list, help="allow-list of the CPU models VMs may use on "
                                    "this host (e.g. those the whole fleet shares); empty: every model "
                                    "QEMU reports runnable here")
    serial_log_max_bytes: int = setting(4 * 1024 * 1024, help="bytes of serial console history kept "
                                        "per VM (serial.log + serial.log.1)")
    serial_log_check_s: float = setting(1.0, help="seconds between checks of the serial history "
                                        "size (it can pass the cap by what a guest prints meanwhile)")
    hypervisor: Literal["qemu", "libvirt"] = setting(
        "qemu", help='"qemu": the agent runs QEMU itself; "libvirt": it manages the domains of the '
        "libvirt daemon at libvirt_uri (needs novacron[libvirt])")
    libvirt_uri: str = setting("qemu:///system", help="the libvirt daemon to manage when hypervisor = "
                               '"libvirt" (e.g. qemu:///system)')
    libvirt_peers: dict[str, str] = setting(
        factory=dict, help="[libvirt_peers] table: peer name -> 'DEST_URI [tcp://HOST[:PORT]]', the "
        "libvirt daemons this host may migrate domains to (libvirt's engine; a request names the peer, a "
        "coordinator's migration with engine 'libvirt' uses the entry named after the destination host); "
        "env/flag: b=qemu+tls://b/system tcp://10.0.0.2")
    libvirt_memory_dir: Path = setting(
        Path("/var/lib/libvirt/qemu/ram"), help="libvirt's memory_backing_dir (qemu.conf): NovaCron's engine "
        "maps only RAM files under it (session daemons: $XDG_CONFIG_HOME/libvirt/qemu/ram)")
    libvirt_path_dirs: list[str] = setting(
        factory=lambda: ["/var/lib/libvirt/images", "/var/lib/libvirt/boot", "/var/log/libvirt"],
        help="folders a domain arriving by NovaCron's engine may name host paths in (disks, kernel, "
        "initrd, firmware, console logs); a domain naming any other path is refused")
    libvirt_shutdown_timeout_s: float = setting(
        30.0, help="seconds a graceful shutdown of a libvirt domain may take before stop destroys it")
    qemu_binary: str = setting("qemu-system-x86_64", help="QEMU executable (a name on PATH or a path)")
    audit_file: Path | None = setting(None, help="append-only audit log (empty: <state_dir>/audit.log;"
                                      " a tmpfs state_dir loses it at reboot)")
    audit_fsync: bool = setting(False, help="fsync each audit line before replying (survives power loss)")
    disk_index_dir: Path | None = setting(
        None, help="uncompressed copies of compressed store images, for migrations' disk cluster indexes "
        "(empty: <state_dir>/disk-index; none are made on tmpfs or hugetlbfs)")
    http: HttpLimits = field(default_factory=HttpLimits)  # [http]: deadlines and connection cap
    qemu_user: str = setting("", help='the unprivileged user QEMU runs as when the agent is root '
                             '(empty: novacron-qemu if that user exists; "root": no drop, not recommended)')
    images: ImagesConfig = field(default_factory=ImagesConfig)
    # a VM's NIC names a fleet network; the agent puts its tap on this host's bridge for it
    networks: dict[str, str] = setting(factory=dict, help="[networks] table: fleet network name -> "
                                       'this host\'s bridge (prod = "br-prod"); env/flag: prod=br-prod,dev=br0')

    # TLS (see novacron.tls): with all three the API is HTTPS and requires a client
    # certificate from the same fleet CA (mutual TLS); the certificate is this host's identity
    tls_cert: str = setting("", help="this host's certificate (PEM, from `novacron pki issue`)")
    tls_key: str = setting("", help="the private key of tls_cert (PEM)")
    tls_ca: str = setting("", help="the fleet CA certificate (PEM) that peers' certificates must chain to")
    insecure: bool = setting(False, help="allow plain HTTP on a non-loopback address")
    grant_key: str = setting("", help="the coordinator's migration-grant verification key "
                             "(normally learned when registering)")
    dedup: bool = setting(True, help="destination-side dedup of incoming migrations: pages this "
                          "host already holds (its VMs' RAM, pages received) are copied here, not sent")
    dedup_index_max_mb: int = setting(64, help="MiB the digest index of that dedup may use (about "
                                      "107 bytes per indexed 4 KiB page; 64 MiB: 2.4 GiB of pages)")

    def image_dirs(self) -> list[Path]:
        return list(self.images.dirs) or [self.state_dir / "images"]
