"""Agent process lifecycle: state dir, VM manager, the HTTP API; serve until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from novacron import audit, tls
from novacron.agent.api import setup_routes
from novacron.agent.api.common import auth_middleware, body_of, error_middleware
from novacron.agent.api.host import host_document, host_name
from novacron.agent.appkeys import ACCEL, CONFIG, METRICS, VMS
from novacron.agent.config import AgentConfig
from novacron.agent.metrics import AgentMetrics
from novacron.agent.vm.accel import AccelDetector, AccelInfo
from novacron.agent.vm.cpumodels import CpuCatalog
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.manager import VMManager
from novacron.agent.vm.network import HostNetworks
from novacron.agent.vm.ramfile import MEMORY_FILESYSTEMS, filesystem_type
from novacron.agent.vm.sandbox import QemuUserError, qemu_identity
from novacron.daemon import start_site, until_signalled
from novacron.metrics import metrics_response

log = logging.getLogger("novacron.agent")

ENDPOINT_FILE = "endpoint.json"  # written once listening: the real port (port = 0 picks one)


class ForcedAccel(AccelDetector):
    """Config said kvm or tcg: skip the probe and report what was configured."""

    def __init__(self, use_kvm: bool) -> None:
        super().__init__()
        present = Path("/dev/kvm").exists()
        self._info = AccelInfo(present, use_kvm, f"accel = {'kvm' if use_kvm else 'tcg'} in the agent config")


def default_accel_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "novacron" / "accel-probe.json"


def make_accel(cfg: AgentConfig) -> AccelDetector:
    if cfg.accel != "auto":
        return ForcedAccel(cfg.accel == "kvm")
    # probe with the QEMU the agent will run guests with, not whatever is on PATH
    return AccelDetector(qemu=cfg.qemu_binary,
                         cache_file=Path(cfg.accel_cache) if cfg.accel_cache else default_accel_cache())


def make_images(cfg: AgentConfig) -> ImageDirs:
    """The image dirs (the default one created) and the user QEMU runs as."""
    dirs = cfg.image_dirs()
    if not cfg.images.dirs:
        dirs[0].mkdir(mode=0o755, exist_ok=True)
    try:
        qemu = qemu_identity(cfg.qemu_user)
    except QemuUserError as exc:
        raise SystemExit(f"novacron-agent: config error: qemu_user: {exc}") from None
    log.info("images and QEMU user", extra={"image_dirs": [str(d) for d in dirs],
                                             "qemu_user": qemu.name or "(the agent's)"})  # fmt: skip
    return ImageDirs.of(dirs, qemu)


def build_app(cfg: AgentConfig, vms: VMManager, accel: AccelDetector) -> web.Application:
    audit_log = audit.AuditLog(cfg.audit_file or cfg.state_dir / "audit.log", fsync=cfg.audit_fsync)
    app = web.Application(middlewares=[audit.audit_middleware(audit_log, body_of=body_of), error_middleware,
                                       auth_middleware(cfg.token)])
    audit.install(app, audit_log)
    app[CONFIG] = cfg
    app[VMS] = vms
    app[ACCEL] = accel
    app[METRICS] = AgentMetrics()
    modules = setup_routes(app)
    app.router.add_get("/metrics", _metrics)  # Prometheus; the agent's token, like the rest
    log.debug("routes registered", extra={"modules": modules})
    return app


async def _metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app[METRICS].registry)


def advertised_url(cfg: AgentConfig, port: int) -> str:
    if cfg.advertise_url:
        return cfg.advertise_url.rstrip("/")
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    scheme = tls.url_scheme(cfg)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def start_coordinator_link(cfg: AgentConfig, app: web.Application, port: int) -> asyncio.Task[None] | None:
    """Register with the coordinator and heartbeat, when one is configured."""
    if not cfg.coordinator_url:
        return None
    from novacron.agent.api.migrations import MANAGER_KEY, save_grant_key
    from novacron.agent.coordinator_link import CoordinatorLink

    async def info() -> dict[str, Any]:
        return await host_document(app)

    # no native migration engine on a libvirt host (its migrations are libvirt's)
    manager = app.get(MANAGER_KEY)

    def registered(reply: dict[str, Any]) -> None:
        key = reply.get("grant_key")
        if isinstance(key, str) and key and manager is not None:
            manager.grants.set_key(key)  # migrations are authorised by grants the coordinator signs
            try:
                save_grant_key(cfg.state_dir, key)  # a restart verifies before registering again
            except OSError as exc:
                log.warning("cannot keep the coordinator's grant key", extra={"error": str(exc)})
        if manager is not None:
            manager.key_current.set()

    link = CoordinatorLink(cfg.coordinator_url, cfg.coordinator_token, advertised_url(cfg, port), cfg.token, info,
                           ssl=tls.peer_client_context(cfg), on_registered=registered,
                           heartbeats=app[METRICS].heartbeats)
    return asyncio.create_task(_run_link(link, app), name="coordinator link")


async def _run_link(link: Any, app: web.Application) -> None:
    """The coordinator link; on a libvirt host each domain lifecycle event also
    sends a heartbeat at once, so the coordinator does not wait for the next one."""
    if app[CONFIG].hypervisor != "libvirt":
        await link.run()
        return
    from novacron.agent.api.libvirt import LIBVIRT

    async def follow() -> None:
        async for _event in app[LIBVIRT].events():
            link.poke()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(link.run())
        tasks.create_task(follow())


def _lock_state_dir(state_dir: Path) -> int:
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"novacron-agent: another agent is using the state dir {state_dir}") from None
    return fd


def _listen_error(cfg: AgentConfig, exc: OSError) -> SystemExit:
    """One line naming the address and the reason, e.g. "address already in use"."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return SystemExit(f"novacron-agent: cannot listen on {host}:{cfg.port}: {reason}")


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def serve(cfg: AgentConfig) -> None:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock_state_dir(cfg.state_dir)
    # Everything started is released in reverse order, also when start-up fails.
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(os.close, lock_fd)
        fs = filesystem_type(cfg.state_dir)
        if fs not in MEMORY_FILESYSTEMS:
            # works, but the kernel writes guest memory back to disk behind the guest
            log.warning("state dir is not on tmpfs or hugetlbfs: guest RAM files will be disk-backed",
                        extra={"state_dir": str(cfg.state_dir), "filesystem": fs})  # fmt: skip
        accel = make_accel(cfg)
        networks = HostNetworks(dict(cfg.networks))
        if networks.missing_bridges():  # VMs on them fail to start until the bridges exist
            log.warning("bridges named in [networks] do not exist", extra={"bridges": networks.missing_bridges()})
        cpus = CpuCatalog(cfg.qemu_binary, list(cfg.cpu_models), host=host_name(cfg.name))
        vms = VMManager(cfg.state_dir, accel, qemu=cfg.qemu_binary, images=make_images(cfg),
                        networks=networks, cpus=cpus, disk_index_dir=cfg.disk_index_dir)
        cleanup.push_async_callback(vms.shutdown, stop_vms=cfg.vms_on_exit == "stop")
        await vms.load()
        # warm the answers for /v1/host: the accelerator, then the CPU models it runs
        probe = asyncio.create_task(_warm(accel, cpus), name="accel probe")
        cleanup.push_async_callback(_cancel, probe)
        keeper = asyncio.create_task(vms.keep_serial_logs(cfg.serial_log_max_bytes, cfg.serial_log_check_s),
                                     name="serial logs")
        cleanup.push_async_callback(_cancel, keeper)
        try:
            # with TLS every caller (coordinator, peer agents) shows a fleet-CA certificate
            ssl_context = tls.server_context(cfg, require_client_cert=True) if tls.enabled(cfg) else None
            runner, port = await start_site(build_app(cfg, vms, accel), cfg.host, cfg.port, cfg.http,
                                            ssl_context=ssl_context)
        except OSError as exc:
            raise _listen_error(cfg, exc) from None
        cleanup.push_async_callback(runner.cleanup)
        endpoint = cfg.state_dir / ENDPOINT_FILE
        cleanup.callback(_unlink_quietly, endpoint)
        endpoint.write_text(json.dumps({"host": cfg.host, "port": port, "data_port": cfg.data_port, "pid": os.getpid()}))
        log.info("agent listening", extra={"host": cfg.host, "port": port, "state_dir": str(cfg.state_dir)})
        link = start_coordinator_link(cfg, runner.app, port)
        if link is not None:
            cleanup.push_async_callback(_cancel, link)
        await until_signalled()
        log.info("agent shutting down", extra={"vms_on_exit": cfg.vms_on_exit})


async def _warm(accel: AccelDetector, cpus: CpuCatalog) -> None:
    await cpus.models((await accel.detect()).default)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
