"""Runs migrations inside the agent: outgoing ones started through the API,
incoming ones accepted on the data port. Keeps every migration's live status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from novacron import logs
from novacron.agent.channel import AuthError, Channel, ChannelServer, connect
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.doubt import HttpOutcomeProbe
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.vmport import DestFactory, SourceVM
from novacron.httpjson import ResponseTooLarge, error_message, read_json

log = logging.getLogger("novacron.agent.migration")

MAX_KEPT = 200  # finished migrations kept for GET /v1/migrations


class MigrationRequestError(ValueError):
    """A migration request is invalid (HTTP 400) or conflicts (``status`` 409/404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class MigrationManager:
    def __init__(
        self,
        *,
        cluster_secret: str,
        source_vm: Callable[[str], Awaitable[SourceVM]],
        dest_factory: DestFactory,
        data_host: str = "127.0.0.1",
        data_port: int = 0,
    ) -> None:
        self._secret = cluster_secret
        self._source_vm = source_vm
        self._dest_factory = dest_factory
        self.server = ChannelServer(cluster_secret, self._incoming, host=data_host, port=data_port)
        self.statuses: dict[str, MigrationStatus] = {}
        self._running: dict[str, SourceMigration] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy_vms: set[str] = set()
        # told of every migration that ends (the agent's metrics)
        self.on_finish: Callable[[MigrationStatus], None] | None = None

    @property
    def data_port(self) -> int:
        return self.server.port

    async def start(self) -> int:
        return await self.server.start()

    async def close(self) -> None:
        for mig in self._running.values():
            mig.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        await self.server.close()

    # -- status ----------------------------------------------------------
    def _keep(self, status: MigrationStatus) -> None:
        status.on_finish = self.on_finish
        self.statuses[status.id] = status
        if len(self.statuses) > MAX_KEPT:
            for mid in [m for m, s in self.statuses.items() if s.done][: len(self.statuses) - MAX_KEPT]:
                del self.statuses[mid]

    def get(self, mid: str) -> MigrationStatus | None:
        return self.statuses.get(mid)

    def list(self) -> list[MigrationStatus]:
        return list(self.statuses.values())

    def busy(self, vm: str) -> bool:
        return vm in self._busy_vms

    # -- incoming --------------------------------------------------------
    async def _incoming(self, channel: Channel) -> None:
        names: list[str] = []

        def register(status: MigrationStatus) -> None:
            if status.vm not in self._busy_vms:  # a refused duplicate must not free it
                names.append(status.vm)
            self._register_incoming(status)

        try:
            await receive_migration(channel, self._dest_factory, register)
        finally:  # also when it raised: the name must not stay busy forever
            for name in names:
                self._busy_vms.discard(name)

    def _register_incoming(self, status: MigrationStatus) -> None:
        self._busy_vms.add(status.vm)
        self._keep(status)

    # -- outgoing --------------------------------------------------------
    async def start_migration(self, body: Any) -> MigrationStatus:
        if not isinstance(body, dict):
            raise MigrationRequestError("request body must be a JSON object")
        unknown = sorted(set(body) - {"vm", "target", "options"})
        if unknown:
            raise MigrationRequestError(f"unknown field(s): {', '.join(unknown)}")
        vm_name = body.get("vm")
        if not isinstance(vm_name, str) or not vm_name:
            raise MigrationRequestError("'vm' must be the name of a VM on this agent")
        target = _check_target(body.get("target"))
        logs.register_secret(target.get("token"), pinned=False)  # it rides in calls to the destination
        try:
            opts = MigrationOptions.from_dict(body.get("options"))
        except ValueError as exc:
            raise MigrationRequestError(str(exc)) from None
        if vm_name in self._busy_vms:
            raise MigrationRequestError(f"VM {vm_name!r} is already migrating", 409)
        vm = await self._source_vm(vm_name)  # raises the runtime's not-found / conflict errors
        self._busy_vms.add(vm_name)
        status = MigrationStatus(
            id=uuid.uuid4().hex[:16], vm=vm_name, role="source", peer=target["url"],
            options=opts.as_dict(),
        )
        self._keep(status)
        task = asyncio.create_task(self._run(vm, target, status, opts), name=f"migrate {status.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return status

    async def _run(self, vm: SourceVM, target: dict[str, Any], status: MigrationStatus,
                   opts: MigrationOptions) -> None:
        try:
            try:
                host, port = await _resolve_data_address(target)
                channel = await connect(host, port, self._secret)
            except (AuthError, LookupError) as exc:
                await vm.stay()
                status.fail(f"cannot open migration channel to the destination: {exc}")
                log.warning("migration not started", extra={"migration": status.id, "reason": status.error})
                return
            status.peer = f"{host}:{port}"
            probe = HttpOutcomeProbe(target["url"], target.get("token", ""), status.id, vm.name)
            mig = SourceMigration(vm, channel, status, opts, probe=probe)
            self._running[status.id] = mig
            try:
                await mig.run()
            finally:
                self._running.pop(status.id, None)
                await channel.close()
        except Exception as exc:  # never let a task die silently
            log.exception("migration crashed", extra={"migration": status.id})
            with contextlib.suppress(Exception):
                await vm.stay()
            if not status.done:
                status.fail(f"internal error: {exc}")
        finally:
            self._busy_vms.discard(status.vm)

    def cancel(self, mid: str) -> MigrationStatus:
        status = self.statuses.get(mid)
        if status is None:
            raise MigrationRequestError(f"no migration {mid!r}", 404)
        if status.done:
            raise MigrationRequestError(f"migration {mid} already {status.phase}", 409)
        mig = self._running.get(mid)
        if mig is None or status.role != "source":
            raise MigrationRequestError("only the source agent can cancel a running migration", 409)
        if status.phase == "commit" or mig.switching_over:
            raise MigrationRequestError("migration is committing; too late to cancel", 409)
        mig.cancel()
        return status


def _check_target(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise MigrationRequestError("'target' must be an object with 'url' and 'token'")
    unknown = sorted(set(raw) - {"url", "token", "data_host", "data_port"})
    if unknown:
        raise MigrationRequestError(f"unknown target field(s): {', '.join(unknown)}")
    url = raw.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise MigrationRequestError("'target.url' must be the destination agent's http(s) URL")
    token = raw.get("token", "")
    if not isinstance(token, str):
        raise MigrationRequestError("'target.token' must be a string")
    port = raw.get("data_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise MigrationRequestError("'target.data_port' must be a TCP port")
    host = raw.get("data_host")
    if host is not None and (not isinstance(host, str) or not host):
        raise MigrationRequestError("'target.data_host' must be a host name or address")
    return dict(raw)


async def _resolve_data_address(target: dict[str, Any]) -> tuple[str, int]:
    """The destination's data channel address: given, or asked from its API."""
    host = target.get("data_host") or urlsplit(target["url"]).hostname or "127.0.0.1"
    port = target.get("data_port")
    if port:
        return host, int(port)
    url = target["url"].rstrip("/") + "/v1/host"
    headers = {"Authorization": f"Bearer {target.get('token', '')}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url, headers=headers) as resp,
        ):
            doc = await read_json(resp)
            if resp.status != 200:
                err = error_message(doc)
                raise LookupError(f"destination API answered {resp.status} on /v1/host"
                                  + (f": {err}" if err else ""))
    except (aiohttp.ClientError, ResponseTooLarge) as exc:
        raise LookupError(f"destination API unreachable: {exc}") from None
    except TimeoutError:
        raise LookupError("destination API did not answer within 10s") from None
    port = doc.get("data_port") if isinstance(doc, dict) else None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise LookupError("destination API reported no valid data_port")
    return host, port
