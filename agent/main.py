"""``novacron-agent``: the daemon on every hypervisor host."""

from __future__ import annotations

import pwd
import sys

from novacron import config, logs, tls
from novacron.agent.config import DEFAULT_CONFIG, ENV_PREFIX, AgentConfig
from novacron.agent.vm.spec import NAME_RE
from novacron.connlimits import check_http_limits
from novacron.daemon import Daemon
from novacron.grants import GrantError, GrantVerifier


def check_config(cfg: AgentConfig) -> None:
    config.check_secret(cfg, "token", required=f"set it in the config file or ${ENV_PREFIX}_TOKEN")
    config.check_secret(cfg, "cluster_secret")
    config.check_secret(cfg, "coordinator_token")
    logs.check_level(cfg.log_level)
    config.check_port(cfg, "port")
    config.check_port(cfg, "data_port")
    check_http_limits(cfg.http)
    if cfg.name and not NAME_RE.match(cfg.name):
        raise config.Invalid("name", "expected 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    check_images(cfg)
    check_networks(cfg)
    check_vm_settings(cfg)
    tls.check(cfg)
    tls.check_peer_url(cfg, "coordinator_url")  # the agent's token rides in its registration
    if cfg.grant_key:
        try:
            GrantVerifier(cfg.grant_key)
        except GrantError as exc:
            raise config.Invalid("grant_key", str(exc)) from None


def check_images(cfg: AgentConfig) -> None:
    from novacron.agent.vm.images import check_image_dirs

    problem = check_image_dirs(cfg.image_dirs(), cfg.state_dir)
    if problem:
        raise config.Invalid("images.dirs", problem)
    for d in cfg.images.dirs:  # the default one is created at start
        if not d.is_dir():
            raise config.Invalid("images.dirs", f"{d}: not a directory")
    if cfg.qemu_user and cfg.qemu_user != "root":
        try:
            if pwd.getpwnam(cfg.qemu_user).pw_uid == 0:
                raise config.Invalid("qemu_user", f"{cfg.qemu_user!r} has uid 0; QEMU needs an unprivileged user")
        except KeyError:
            raise config.Invalid("qemu_user", f"no such user {cfg.qemu_user!r}") from None


def check_vm_settings(cfg: AgentConfig) -> None:
    from novacron.agent.vm.cpumodels import check_allow_list

    if not 0 < cfg.stop_timeout_s <= 3600:
        raise config.Invalid("stop_timeout_s", "expected seconds in (0, 3600]")
    if cfg.serial_log_max_bytes < 4096:
        raise config.Invalid("serial_log_max_bytes", "expected at least 4096 bytes")
    if not 0.05 <= cfg.serial_log_check_s <= 3600:
        raise config.Invalid("serial_log_check_s", "expected seconds in [0.05, 3600]")
    if not 1 <= cfg.dedup_index_max_mb <= 65536:
        raise config.Invalid("dedup_index_max_mb", "expected MiB in [1, 65536]")
    problem = check_allow_list(cfg.cpu_models)
    if problem:
        raise config.Invalid("cpu_models", problem)


def check_networks(cfg: AgentConfig) -> None:
    from novacron.agent.vm.network import check_mapping

    try:
        check_mapping(cfg.networks)
    except ValueError as exc:
        raise config.Invalid("networks", str(exc)) from None


async def serve(cfg: AgentConfig) -> None:
    from novacron.agent.daemon import serve  # not needed for --help or a config error
    from novacron.native.malloc import keep_freed_buffers

    keep_freed_buffers()  # migration frames reuse freed heap instead of fresh pages (native/malloc.py)
    await serve(cfg)


DAEMON = Daemon(
    prog="novacron-agent",
    description="NovaCron host agent: runs QEMU/KVM guests and live-migrates them.",
    settings=AgentConfig, env_prefix=ENV_PREFIX, default_config=DEFAULT_CONFIG,
    check=check_config, serve=serve,
    secrets=lambda cfg: (cfg.token, cfg.cluster_secret, cfg.coordinator_token),
    gc_full_every_s=60.0,  # a small heap: short full collections; a failed migration's buffers go sooner
)
main = DAEMON.main

if __name__ == "__main__":
    sys.exit(main())
