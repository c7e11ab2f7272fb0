"""Runs migrations inside the agent: outgoing ones started through the API,
incoming ones accepted on the data port. Keeps every migration's live status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from novacron import logs
from novacron.agent.channel import (
    AuthError,
    Channel,
    ChannelClosed,
    ChannelServer,
    ProtocolError,
    connect,
)
from novacron.agent.channel.records import CTRL
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.doubt import HttpOutcomeProbe
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.protocol import ID_RE, NAME_RE
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.vmport import DestFactory, SourceVM
from novacron.grants import Grant, GrantError, GrantVerifier, UsedGrants

log = logging.getLogger("novacron.agent.migration")

MAX_KEPT = 200  # finished migrations kept for GET /v1/migrations
GRANT_WAIT_S = 10.0  # an authenticated peer must present its grant this soon


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
        host_name: str = "",
        grants: GrantVerifier | None = None,
        peer_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = cluster_secret
        self.host_name = host_name  # as registered: grants name hosts by it
        self.grants = grants or GrantVerifier()
        self._peer_ssl = peer_ssl  # mutual TLS to the destination's API (outcome probe)
        self._used_out = UsedGrants()
        self._used_in = UsedGrants()
        self._source_vm = source_vm
        self._dest_factory = dest_factory
        self.server = ChannelServer(cluster_secret, self._incoming, host=data_host, port=data_port)
        self.statuses: dict[str, MigrationStatus] = {}
        self._running: dict[str, SourceMigration] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy_vms: set[str] = set()

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
        grant = await self._admit(channel)
        if grant is None:
            return
        names: list[str] = []

        def register(status: MigrationStatus) -> None:
            if status.vm not in self._busy_vms:  # a refused duplicate must not free it
                names.append(status.vm)
            self._register_incoming(status)

        def authorise(_mid: str, vm: str) -> None:
            if vm != grant.vm:
                raise ProtocolError(f"the grant is for VM {grant.vm!r}, not {vm!r}")

        try:
            await receive_migration(channel, self._dest_factory, register, authorise=authorise)
        finally:  # also when it raised: the name must not stay busy forever
            for name in names:
                self._busy_vms.discard(name)

    async def _admit(self, channel: Channel) -> Grant | None:
        """The coordinator's grant for this incoming migration: the first message, naming
        this host as destination, used once; else say why and refuse."""
        try:
            rec = await channel.recv(timeout=GRANT_WAIT_S)
            if rec.kind != CTRL or rec.op != "grant" or rec.ctrl is None:
                raise ProtocolError("first message must be the coordinator's grant")
            grant = self.grants.verify(rec.ctrl.get("grant"))
            if grant.target != self.host_name:
                raise GrantError(f"the grant is for destination {grant.target!r}, "
                                 f"this host is {self.host_name!r}")
            self._used_in.consume(grant)
        except (ChannelClosed, ProtocolError, GrantError) as exc:
            log.warning("incoming migration refused", extra={"peer": channel.peer(), "reason": str(exc)})
            with contextlib.suppress(Exception):
                await channel.send_ctrl({"op": "error", "reason": f"refused: {exc}"}, timeout=2)
            return None
        log.info("incoming migration granted", extra={"peer": channel.peer(), "vm": grant.vm,
                                                      "source": grant.source, "grant": grant.migration})
        return grant

    def may_read(self, token: str, path: str) -> bool:
        """A source holding a grant to this host may read what became of that migration
        (the outcome probe): ``/v1/migrations/{id}`` of that VM or ``/v1/vms/{vm}``."""
        try:
            grant = self.grants.verify(token, check_expiry=False)  # asked after long migrations too
        except GrantError:
            return False
        if grant.target != self.host_name:
            return False
        if path == f"/v1/vms/{grant.vm}":
            return True
        prefix = "/v1/migrations/"
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            status = self.statuses.get(path[len(prefix):])
            return status is None or status.vm == grant.vm
        return False

    def _register_incoming(self, status: MigrationStatus) -> None:
        self._busy_vms.add(status.vm)
        self._keep(status)

    # -- outgoing --------------------------------------------------------
    async def start_migration(self, body: Any) -> MigrationStatus:
        """``{"vm", "grant", "options"}`` (optional ``"target": {"url"}`` must match the grant).

        The destination comes only from the coordinator's grant: its address was
        taken from the coordinator's registry, and no credential of it travels here."""
        if not isinstance(body, dict):
            raise MigrationRequestError("request body must be a JSON object")
        unknown = sorted(set(body) - {"vm", "grant", "target", "options", "id"})
        if unknown:
            raise MigrationRequestError(f"unknown field(s): {', '.join(unknown)}")
        vm_name = body.get("vm")
        if not isinstance(vm_name, str) or not NAME_RE.match(vm_name):
            raise MigrationRequestError("'vm' must be the name of a VM on this agent")
        token = body.get("grant")
        if not isinstance(token, str) or not token:
            raise MigrationRequestError("'grant' (the coordinator's migration grant) is required")
        try:
            grant = self.grants.verify(token)
        except GrantError as exc:
            raise MigrationRequestError(str(exc), 403) from None
        logs.register_secret(token, pinned=False)  # it admits this migration at the destination
        if grant.source != self.host_name or grant.vm != vm_name:
            raise MigrationRequestError(
                f"the grant is for VM {grant.vm!r} leaving {grant.source!r}, not {vm_name!r} "
                f"leaving {self.host_name!r}", 403)
        _check_target(body.get("target"), grant)
        # the coordinator's id (it names a migration before asking, so that after a crash it
        # can ask what became of it): the grant's, which a given "id" must match
        mid = body.get("id", grant.migration)
        if not isinstance(mid, str) or not ID_RE.fullmatch(mid):
            raise MigrationRequestError("'id' must be 1-64 letters, digits, '-' or '_'")
        if mid != grant.migration:
            raise MigrationRequestError(f"'id' {mid!r} is not the granted migration", 403)
        if mid in self.statuses:
            raise MigrationRequestError(f"a migration {mid!r} exists already", 409)
        try:
            opts = MigrationOptions.from_dict(body.get("options"))
        except ValueError as exc:
            raise MigrationRequestError(str(exc)) from None
        if vm_name in self._busy_vms:
            raise MigrationRequestError(f"VM {vm_name!r} is already migrating", 409)
        vm = await self._source_vm(vm_name)  # raises the runtime's not-found / conflict errors
        try:
            self._used_out.consume(grant)
        except GrantError as exc:
            raise MigrationRequestError(str(exc), 403) from None
        self._busy_vms.add(vm_name)
        status = MigrationStatus(
            id=mid, vm=vm_name, role="source", peer=grant.url,
            options=opts.as_dict(),
        )
        self._keep(status)
        task = asyncio.create_task(self._run(vm, grant, token, status, opts), name=f"migrate {status.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return status

    async def _run(self, vm: SourceVM, grant: Grant, token: str, status: MigrationStatus,
                   opts: MigrationOptions) -> None:
        try:
            try:
                channel = await connect(grant.data_host, grant.data_port, self._secret)
            except AuthError as exc:
                await vm.stay()
                status.fail(f"cannot open migration channel to the destination: {exc}")
                log.warning("migration not started", extra={"migration": status.id, "reason": status.error})
                return
            status.peer = f"{grant.data_host}:{grant.data_port}"
            probe = HttpOutcomeProbe(grant.url, token, status.id, vm.name, scheme="Grant",
                                     ssl=self._peer_ssl, server_name=grant.target)
            mig = SourceMigration(vm, channel, status, opts, probe=probe)
            self._running[status.id] = mig
            try:
                await channel.send_ctrl({"op": "grant", "grant": token})  # the destination's admission
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


def _check_target(raw: Any, grant: Grant) -> None:
    """A caller may restate the destination, never choose it (no SSRF through this API)."""
    if raw is None:
        return
    if not isinstance(raw, dict) or set(raw) - {"url"}:
        raise MigrationRequestError("'target' may only restate the granted destination's 'url'; "
                                    "the coordinator's grant names the destination")
    if not isinstance(raw.get("url"), str) or raw["url"].rstrip("/") != grant.url.rstrip("/"):
        raise MigrationRequestError("'target.url' is not the destination the coordinator "
                                    "authorised", 403)
