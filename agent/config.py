"""Settings of ``novacron-agent`` (TOML file, ``NOVACRON_AGENT_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from novacron.connlimits import HttpLimits

ENV_PREFIX = "NOVACRON_AGENT"
DEFAULT_CONFIG = Path("/etc/novacron/agent.toml")


@dataclass
class ImagesConfig:
    # the only folders VM kernels, initrds and disks may come from; a spec names
    # an image relative to one of them (empty: <state_dir>/images)
    dirs: list[Path] = field(default_factory=list)


@dataclass
class AgentConfig:
    host: str = "127.0.0.1"  # address of the HTTP API
    port: int = 7700
    data_port: int = 7701  # agent-to-agent migration channel (TCP)
    state_dir: Path = Path("/var/lib/novacron/agent")
    token: str = ""  # bearer token required on the HTTP API
    cluster_secret: str = ""  # authenticates agent-to-agent channels
    name: str = ""  # host name reported to the coordinator (default: hostname)
    coordinator_url: str = ""  # register and heartbeat here when set
    coordinator_token: str = ""
    # the API URL the coordinator should use for this agent (default http://<host>:<port>)
    advertise_url: str = ""
    log_level: str = "info"
    # auto: boot-probe KVM (a /dev/kvm that exists may still hang guests);
    # tcg: never use KVM; kvm: trust KVM without probing
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # where the KVM probe's answer is cached (empty: ~/.cache/novacron/accel-probe.json)
    accel_cache: str = ""
    # on exit, "keep" leaves VMs running for the next agent to adopt; "stop" powers them off
    vms_on_exit: Literal["keep", "stop"] = "keep"
    qemu_binary: str = "qemu-system-x86_64"
    # append-only audit log (default <state_dir>/audit.log; a tmpfs state_dir loses it at reboot)
    audit_file: Path | None = None
    audit_fsync: bool = False  # fsync each audit line before replying (survives power loss)
    http: HttpLimits = field(default_factory=HttpLimits)  # [http]: deadlines and connection cap
    # the unprivileged user QEMU runs as when the agent is root ("": novacron-qemu
    # if that user exists; "root": no drop, not recommended)
    qemu_user: str = ""
    images: ImagesConfig = field(default_factory=ImagesConfig)

    def image_dirs(self) -> list[Path]:
        return list(self.images.dirs) or [self.state_dir / "images"]
    # TLS (see novacron.tls): this host's certificate and key from the fleet CA, and the CA.
    # With them the API is HTTPS and requires a CA-signed client certificate (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    insecure: bool = False  # allow plain HTTP on a non-loopback address
    # the coordinator's grant-verification key; normally learned when registering
    grant_key: str = ""
