"""Runs migrations inside the agent: outgoing ones started through the API,
incoming ones accepted on the data port. Keeps every migration's live status.

With a journal (``journal.py``) it also settles, at start, every migration an
earlier agent left unsettled: a destination knows from its own VM table
whether the guest runs here; a source that never sent ``go`` resumes its
guest; a source past ``go`` keeps the guest paused and fenced and asks the
destination (``doubt.ChannelOutcomeProbe``) until it has a definite answer.
``fence_reason`` is what ``VMManager.resume`` consults: resuming a VM with an
unsettled migration is refused unless an operator forces it (``override``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

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
from novacron.agent.migration import protocol
from novacron.agent.migration.dedupdest import PageIndex
from novacron.agent.migration.dest import Resumable, receive_migration
from novacron.agent.migration.doubt import (
    ChannelOutcomeProbe,
    HttpOutcomeProbe,
    Outcome,
    outcome_of_phase,
    outcome_of_vm_state,
    settle,
)
from novacron.agent.migration.journal import Entry, Journal
from novacron.agent.migration.offline import OfflineSource, send_offline
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.protocol import ID_RE, NAME_RE
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.vmport import DestFactory, LocalVMs, SourceVM
from novacron.agent.vm.errors import VMConflict
from novacron.grants import Grant, GrantError, GrantVerifier, UsedGrants

log = logging.getLogger("novacron.agent.migration")

GRANT_READ_GRACE_S = 86400.0  # how long a source may read its migration's outcome

MAX_KEPT = 200  # finished migrations kept for GET /v1/migrations
GRANT_WAIT_S = 10.0  # an authenticated peer must present its grant this soon
SETTLE_ASK_S = 15.0  # one round of asking the destination what became of a migration ...
SETTLE_RETRY_S = 5.0  # ... and the wait before the next round, until it answers
SLOT_WAIT_S = 10.0  # an incoming retry waits this long for the failed attempt here to be cleared
KEY_WAIT_S = 5.0  # a grant that does not verify before we registered: wait this long for the key


class MigrationRequestError(ValueError):
    """A migration request is invalid (HTTP 400) or conflicts (``status`` 409/404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class OtherEngine(Protocol):
    """A migration run by another engine (libvirt's own) behind the same API: it has a
    status, runs as a task once started, and cancels itself."""

    status: MigrationStatus

    def start(self) -> asyncio.Task[None]: ...

    async def cancel(self) -> MigrationStatus: ...


# vm name, grant, migration id, options -> the migration, checked but not started (raises
# the runtime's errors: not found, conflict)
EngineStarter = Callable[[str, Grant, str, MigrationOptions], Awaitable[OtherEngine]]


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
        data_ssl: ssl.SSLContext | None = None,
        journal: Journal | None = None,
        local_vms: LocalVMs | None = None,
        page_index: PageIndex | None = None,
        engines: dict[str, EngineStarter] | None = None,
        offline_source: Callable[[str], Awaitable[OfflineSource]] | None = None,
    ) -> None:
        self._secret = cluster_secret
        self.page_index = page_index  # destination-side dedup (None: off)
        self.journal = journal
        self._local = local_vms
        self._settling: dict[str, asyncio.Task[None]] = {}
        self.host_name = host_name  # as registered: grants name hosts by it
        self.grants = grants or GrantVerifier()
        # Set once the grant key is the coordinator's current one. An agent with a
        # coordinator clears it until its registration is answered: the coordinator
        # lists a host as up (and may send it grants) as it answers, a moment before
        # the agent has read the key in that answer.
        self.key_current = asyncio.Event()
        self.key_current.set()
        # mutual TLS with the fleet CA (None without TLS): ``peer_ssl`` to call a destination
        # (its API and its data port), ``data_ssl`` to serve our data port
        self._peer_ssl = peer_ssl
        self._used_out = UsedGrants()
        self._used_in = UsedGrants()
        self._source_vm = source_vm
        self._offline_source = offline_source  # a stopped VM (offline.py); None: refused
        self._dest_factory = dest_factory
        self.server = ChannelServer(cluster_secret, self._incoming, host=data_host, port=data_port,
                                    ssl=data_ssl)
        self.statuses: dict[str, MigrationStatus] = {}
        self._running: dict[str, SourceMigration] = {}
        self._engines = engines or {}  # options.engine other than "novacron" -> its starter
        self._others: dict[str, OtherEngine] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # VM -> the migration holding its slot, until that migration's status is final:
        # a final status means a retry (or a migration back) is accepted at once
        self._busy_vms: dict[str, str] = {}
        self._resumable: Resumable = {}  # incoming post-copy migrations a new channel may resume
        # told of every migration that ends (the agent's metrics)
        self.on_finish: Callable[[MigrationStatus], None] | None = None

    @property
    def data_port(self) -> int:
        return self.server.port

    async def start(self) -> int:
        await self.recover()
        return await self.server.start()

    async def close(self) -> None:
        for task in self._settling.values():
            task.cancel()
        for mig in self._running.values():
            mig.cancel()
        for other in list(self._others.values()):
            with contextlib.suppress(Exception):
                await other.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        await self.server.close()

    # -- status ----------------------------------------------------------
    def _keep(self, status: MigrationStatus) -> None:
        def finished(s: MigrationStatus) -> None:
            self._free(s.vm, s.id)
            if self.on_finish is not None:
                self.on_finish(s)

        status.on_finish = finished
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

    def _claim(self, vm: str, mid: str) -> bool:
        """Take ``vm``'s slot for migration ``mid``; False if another one holds it."""
        return self._busy_vms.setdefault(vm, mid) == mid

    def _free(self, vm: str, mid: str) -> None:
        if self._busy_vms.get(vm) == mid:
            del self._busy_vms[vm]

    # -- fencing ---------------------------------------------------------
    def fence_reason(self, vm: str) -> str | None:
        """Why ``vm`` must not be resumed here now (None: it may)."""
        if vm in self._busy_vms:
            running = [s for s in self.statuses.values() if s.vm == vm and not s.done]
            what = f"migration {running[-1].id} ({running[-1].role}, {running[-1].phase})" if running else "a migration"
            return f"VM {vm} is fenced: {what} is in progress; cancel it or wait for it to end"
        entry = self.journal.unsettled(vm) if self.journal is not None else None
        if entry is None:
            return None
        why = f": {entry.reason}" if entry.reason else ""
        return (f"VM {vm} is fenced: migration {entry.id} ({entry.role}, step {entry.step}) is unsettled{why}; "
                "resuming it here could run the guest twice. Force only if the peer host is known dead")

    async def override(self, vm: str) -> str | None:
        """An operator forces ``vm`` free (its peer is known dead): the unsettled migration
        is recorded as rolled back here. Returns its id. Refused while the engine runs it."""
        if vm in self._busy_vms:
            raise VMConflict(f"VM {vm} has a migration in progress; cancel it or wait (force does not apply)")
        entry = self.journal.unsettled(vm) if self.journal is not None else None
        if entry is None or self.journal is None:
            return None
        task = self._settling.pop(entry.id, None)
        if task is not None:
            task.cancel()
        reason = "forced by an operator: the peer was declared dead"
        self.journal.step(entry.id, "rolled_back", reason)
        if self._local is not None:
            self._local.set_migrating(vm, False)
        status = self.statuses.get(entry.id)
        if status is not None:
            status.resolution = reason
            if not status.done:
                status.fail(reason)
        log.warning("unsettled migration overridden", extra={"migration": entry.id, "vm": vm})
        return entry.id

    # -- recovery at start -------------------------------------------------
    async def recover(self) -> None:
        """Settle what an earlier agent's journal left (run once, before serving)."""
        if self.journal is None:
            return
        entries = self.journal.load()
        latest: dict[str, Entry] = {}
        for entry in sorted(entries, key=lambda e: e.history[-1]["time"] if e.history else 0.0):
            latest[entry.vm] = entry
            self._keep(_status_from(entry))
        for entry in entries:
            if latest[entry.vm] is not entry and not entry.settled:
                # a later migration of this VM exists: this one cannot matter any more
                self.journal.step(entry.id, "rolled_back", "superseded by a later migration of the VM")
                continue
            if latest[entry.vm] is entry:
                await self._recover_one(entry)

    async def _recover_one(self, entry: Entry) -> None:
        local, journal = self._local, self.journal
        assert journal is not None
        status = self.statuses[entry.id]
        state = local.state(entry.vm) if local is not None else None
        if entry.settled:
            if entry.role == "source" and entry.step == "committed" and state is not None and local is not None:
                log.info("finishing the release of a migrated VM", extra={"migration": entry.id})
                await local.release(entry.vm)  # the agent stopped between commit and release
            return
        if entry.role == "destination":
            if entry.step == "go" and entry.reason.startswith("post-copy") and state is not None:
                # post-copy: the guest runs here but pages may still be only at the source,
                # whose copy must stay; neither committed nor rolled back (in doubt, fenced)
                if local is not None:
                    local.set_migrating(entry.vm, True)
                status.set_phase("postcopy")
                status.error = ("the agent restarted during post-copy: the guest's missing pages are "
                                "still at the source; outcome in doubt")
                journal.note(entry.id, status.error)
                log.error("agent restarted during post-copy; left in doubt", extra={"migration": entry.id})
                return
            # incoming/ was cleaned before this: a guest that runs here was adopted
            if state == "running":
                journal.step(entry.id, "committed", "the agent restarted after the guest started here")
                status.error = None
                status.set_phase("completed")
            else:
                if state is not None and local is not None:  # adopted, never resumed: not ours
                    await local.release(entry.vm)
                journal.step(entry.id, "rolled_back",
                             "the agent restarted before the guest ran here; its half-built VM was removed")
                status.fail(entry.reason)
            return
        if entry.step == "go":
            if local is not None:
                local.set_migrating(entry.vm, True)
            self._spawn_settle(entry, status)
            return
        # before 'go' the destination never runs the guest: resuming here is safe
        what = "the VM is gone here"
        if state == "paused" and local is not None:
            try:
                await local.resume(entry.vm)
                what = "its guest was resumed here"
            except Exception as exc:
                log.error("resuming a guest left paused by a migration failed",
                          extra={"migration": entry.id, "error": str(exc)})
                journal.note(entry.id, f"agent restarted during {entry.step}; resuming failed: {exc}")
                return  # stays unsettled (and fenced) for an operator
        elif state is not None:
            what = f"its guest was {state} here"
        journal.step(entry.id, "rolled_back", f"the agent restarted during {entry.step}; {what}")
        status.fail(f"the agent restarted mid-migration ({entry.step}); {what}")
        log.warning("unfinished migration rolled back at start", extra={"migration": entry.id, "vm": entry.vm})

    def _spawn_settle(self, entry: Entry, status: MigrationStatus) -> None:
        if entry.id in self._settling:
            return
        task = asyncio.create_task(self._settle_source(entry, status), name=f"settle {entry.id}")
        self._settling[entry.id] = task
        task.add_done_callback(lambda _t: self._settling.pop(entry.id, None))

    async def _settle_source(self, entry: Entry, status: MigrationStatus) -> None:
        """Past 'go' with no answer: ask the destination until it says where the guest runs."""
        journal, local = self.journal, self._local
        assert journal is not None
        probe = ChannelOutcomeProbe(entry.peer_host, entry.peer_port, self._secret, entry.id, entry.vm,
                                    ssl=self._peer_ssl, server_name=entry.peer_name or None)
        log.warning("migration unsettled past 'go'; guest kept paused, asking the destination",
                    extra={"migration": entry.id, "vm": entry.vm, "peer": f"{entry.peer_host}:{entry.peer_port}"})
        while not entry.settled:
            outcome, note = await settle(probe, SETTLE_ASK_S)
            if entry.settled:  # an operator forced it meanwhile
                return
            status.resolution = note
            try:
                if outcome is Outcome.COMMITTED:
                    journal.step(entry.id, "committed", note)
                    if local is not None:
                        local.set_migrating(entry.vm, False)
                        await local.release(entry.vm)
                    status.error = None
                    status.set_phase("completed")
                    log.info("migration settled: the destination runs the guest", extra={"migration": entry.id})
                    return
                if outcome is Outcome.ROLLED_BACK:
                    if local is not None:
                        local.set_migrating(entry.vm, False)
                        if local.state(entry.vm) == "paused":
                            await local.resume(entry.vm)
                    journal.step(entry.id, "rolled_back", note)
                    if not status.done:
                        status.fail(f"settled: {note}")
                    log.info("migration settled: the guest runs here again", extra={"migration": entry.id})
                    return
            except Exception as exc:  # keep trying: the guest must not stay in limbo silently
                log.error("settling a migration failed", extra={"migration": entry.id, "error": str(exc)})
            journal.note(entry.id, f"in doubt: {note}; asking again")
            await asyncio.sleep(SETTLE_RETRY_S)

    def answer(self, mid: str, vm: str) -> str:
        """A source's ``query``: what became of migration ``mid`` here (as destination)?"""
        status = self.statuses.get(mid)
        if status is not None and status.role == "destination":
            return outcome_of_phase(status.phase).value
        state = self._local.state(vm) if self._local is not None else None
        outcome = outcome_of_vm_state(state)
        return outcome.value if outcome is not Outcome.UNREACHABLE else Outcome.PENDING.value

    # -- incoming --------------------------------------------------------
    async def _incoming(self, channel: Channel) -> None:
        grant = await self._admit(channel)
        if grant is None:
            return
        await self._earlier_incoming_ended(grant.vm, channel)
        names: list[tuple[str, str]] = []

        def register(status: MigrationStatus) -> None:
            if self._claim(status.vm, status.id):  # a refused duplicate must not free it
                names.append((status.vm, status.id))
            self._keep(status)

        try:
            await receive_migration(channel, self._dest_factory, register,
                                    authorise=lambda mid, vm, spec: authorise(grant, mid, vm, spec),
                                    journal=self.journal, peer_name=grant.source,
                                    index=self.page_index, resumable=self._resumable)
        finally:  # also when it raised: the name must not stay busy forever
            for name, mid in names:
                self._free(name, mid)

    async def _earlier_incoming_ended(self, vm: str, channel: Channel) -> None:
        """A retry may arrive while the failed attempt's copy of ``vm`` is still being
        destroyed here (the destination tells the source why first, so that it resumes
        at once): wait for that one to end, bounded, with keepalives so the source does
        not take us for dead; else its ``prepare`` is refused."""
        deadline = time.monotonic() + SLOT_WAIT_S
        next_beat = 0.0
        while time.monotonic() < deadline:
            holder = self.statuses.get(self._busy_vms.get(vm, ""))
            if holder is None or holder.role != "destination":
                return
            if time.monotonic() >= next_beat:  # its liveness_s is 0.5 s at the least
                next_beat = time.monotonic() + 0.1
                with contextlib.suppress(ChannelClosed, OSError):
                    await channel.send_ctrl(protocol.KEEPALIVE, timeout=1)
            await asyncio.sleep(0.02)

    async def _admit(self, channel: Channel) -> Grant | None:
        """The coordinator's grant for this incoming migration: the first message, naming
        this host as destination, used once; else say why and refuse."""
        try:
            rec = await channel.recv(timeout=GRANT_WAIT_S)
            if rec.kind == CTRL and rec.op == "query" and rec.ctrl is not None:
                # a restarted source asking what became of a migration (no grant: it only
                # learns committed / rolled_back / pending of the id and VM it names)
                mid, vm = protocol.check_query(rec.ctrl)
                self._check_asker(channel, mid, vm)
                await channel.send_ctrl({"op": "outcome", "outcome": self.answer(mid, vm)}, timeout=5)
                return None
            resume = rec.kind == CTRL and rec.op == "postcopy_resume"
            if (rec.kind != CTRL or rec.op not in ("grant", "postcopy_resume")) or rec.ctrl is None:
                raise ProtocolError("first message must be the coordinator's grant")
            # a post-copy's recovery presents the grant it was admitted with (used already)
            grant = await self.verify_grant(rec.ctrl.get("grant"), check_expiry=not resume)
            if grant.target != self.host_name:
                raise GrantError(f"the grant is for destination {grant.target!r}, "
                                 f"this host is {self.host_name!r}")
            if self.server.ssl is not None and channel.peer_identity != grant.source:
                raise GrantError(f"the grant is for source {grant.source!r}; the peer's certificate "
                                 f"is {channel.peer_identity!r}")
            if resume:
                take = self._resumable.get(grant.migration)
                if take is None:
                    raise ProtocolError(f"no post-copy of migration {grant.migration!r} waits here")
                log.info("post-copy channel back", extra={"peer": channel.peer(), "grant": grant.migration})
                await take(channel)  # returns when the migration is done with this channel
                return None
            self._used_in.consume(grant)
        except (ChannelClosed, ProtocolError, GrantError) as exc:
            log.warning("incoming migration refused", extra={"peer": channel.peer(), "reason": str(exc)})
            with contextlib.suppress(Exception):
                await channel.send_ctrl({"op": "error", "reason": f"refused: {exc}"}, timeout=2)
            return None
        log.info("incoming migration granted", extra={"peer": channel.peer(), "vm": grant.vm,
                                                      "source": grant.source, "grant": grant.migration})
        return grant

    def _check_asker(self, channel: Channel, mid: str, vm: str) -> None:
        """With mutual TLS, only the source this host's journal recorded for migration
        ``mid`` (the peer certificate's host identity) hears what became of it."""
        if self.server.ssl is None:
            return
        entry = self.journal.entries.get(mid) if self.journal is not None else None
        if entry is None or entry.role != "destination" or entry.vm != vm:
            raise ProtocolError(f"no journalled incoming migration {mid!r} of VM {vm!r} here")
        if not entry.peer_name or entry.peer_name != channel.peer_identity:
            raise ProtocolError(f"migration {mid!r} came from {entry.peer_name or 'an unrecorded source'!r}, "
                                f"not {channel.peer_identity!r}")

    async def verify_grant(self, token: Any, *, check_expiry: bool = True) -> Grant:
        """``grants.verify``; a grant refused before this agent's registration was answered
        is checked again once it was (bounded): it may be signed with the key that answer
        brings (a first start, or a coordinator whose key changed since the saved one)."""
        try:
            return self.grants.verify(token, check_expiry=check_expiry)
        except GrantError:
            if self.key_current.is_set():
                raise
        log.info("grant does not verify yet; waiting for the coordinator's registration answer")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.key_current.wait(), KEY_WAIT_S)
        return self.grants.verify(token, check_expiry=check_expiry)

    def may_read(self, token: str, path: str) -> bool:
        """A source holding a grant to this host may read what became of that migration
        (the outcome probe): ``/v1/migrations/{id}`` of that VM or ``/v1/vms/{vm}``."""
        try:
            grant = self.grants.verify(token, check_expiry=False)  # asked after long migrations too
        except GrantError:
            return False
        # ... but not forever: a day past the grant's life covers any migration and its doubt
        if grant.target != self.host_name or time.time() > grant.expires + GRANT_READ_GRACE_S:
            return False
        return path in (f"/v1/vms/{grant.vm}", f"/v1/migrations/{grant.migration}")

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
            grant = await self.verify_grant(token)
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
        if opts.engine != "novacron" and not opts.offline:
            return await self._start_other(vm_name, grant, mid, opts)
        if opts.offline:
            if self._offline_source is None:
                raise MigrationRequestError("this agent cannot migrate stopped VMs", 409)
            vm: SourceVM | OfflineSource = await self._offline_source(vm_name)
        else:
            vm = await self._source_vm(vm_name)  # raises the runtime's not-found / conflict errors
        try:
            self._used_out.consume(grant)
        except GrantError as exc:
            raise MigrationRequestError(str(exc), 403) from None
        self._claim(vm_name, mid)
        status = MigrationStatus(
            id=mid, vm=vm_name, role="source", peer=grant.url,
            options=opts.as_dict(),
        )
        self._keep(status)
        task = asyncio.create_task(self._run(vm, grant, token, status, opts), name=f"migrate {status.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return status

    async def _run(self, vm: SourceVM | OfflineSource, grant: Grant, token: str, status: MigrationStatus,
                   opts: MigrationOptions) -> None:
        try:
            try:
                channel = await connect(grant.data_host, grant.data_port, self._secret,
                                        ssl=self._peer_ssl, server_name=grant.target)
            except AuthError as exc:
                await vm.stay()
                status.fail(f"cannot open migration channel to the destination: {exc}")
                log.warning("migration not started", extra={"migration": status.id, "reason": status.error})
                return
            if opts.offline:  # nothing here changes: no journal, no doubt to settle
                try:
                    await channel.send_ctrl({"op": "grant", "grant": token})
                    await send_offline(cast(OfflineSource, vm), channel, status, opts.liveness_s, opts.timeout_s,
                                       opts.disk_dedup)
                finally:
                    await channel.close()
                return
            vm = cast(SourceVM, vm)
            status.peer = f"{grant.data_host}:{grant.data_port}"
            if self.journal is not None:  # where a restarted agent will ask, before any side effect
                status.journal = self.journal.begin(Entry(
                    id=status.id, vm=vm.name, role="source", step="started",
                    peer_host=grant.data_host, peer_port=grant.data_port, peer_name=grant.target))
            probe = HttpOutcomeProbe(grant.url, token, status.id, vm.name, scheme="Grant",
                                     ssl=self._peer_ssl, server_name=grant.target)

            async def reconnect() -> Channel:
                """Post-copy recovery: a new channel, presenting the same grant."""
                ch = await connect(grant.data_host, grant.data_port, self._secret,
                                   ssl=self._peer_ssl, server_name=grant.target)
                try:
                    await ch.send_ctrl({"op": "postcopy_resume", "grant": token}, timeout=10)
                except BaseException:
                    await ch.close()
                    raise
                return ch

            mig = SourceMigration(vm, channel, status, opts, probe=probe, journal=self.journal,
                                  reconnect=reconnect)
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
            self._free(status.vm, status.id)  # when it ended without a final status
        entry = self.journal.entries.get(status.id) if self.journal is not None else None
        if entry is not None and not entry.settled:
            if entry.step == "go":  # in doubt: keep asking until the destination answers
                self._spawn_settle(entry, status)
            else:  # crashed before 'go': the same as a restart there
                await self._recover_one(entry)

    async def _start_other(self, vm_name: str, grant: Grant, mid: str, opts: MigrationOptions) -> MigrationStatus:
        starter = self._engines.get(opts.engine)
        if starter is None:
            raise MigrationRequestError(f"option 'engine': {opts.engine!r} does not run on this host "
                                        f"(it has: {', '.join(['novacron', *self._engines])})")
        mig = await starter(vm_name, grant, mid, opts)
        try:
            self._used_out.consume(grant)
        except GrantError as exc:
            raise MigrationRequestError(str(exc), 403) from None
        self._claim(vm_name, mid)
        self._others[mid] = mig
        self._keep(mig.status)

        def ended(_t: asyncio.Task[None]) -> None:
            self._free(vm_name, mid)
            self._others.pop(mid, None)

        task = mig.start()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(ended)
        log.info("migration handed to engine", extra={"migration": mid, "vm": vm_name, "engine": opts.engine})
        return mig.status

    def cancel(self, mid: str) -> MigrationStatus:
        status = self.statuses.get(mid)
        if status is None:
            raise MigrationRequestError(f"no migration {mid!r}", 404)
        if status.done:
            raise MigrationRequestError(f"migration {mid} already {status.phase}", 409)
        other = self._others.get(mid)
        if other is not None:
            if status.phase == "commit":
                raise MigrationRequestError("migration is committing; too late to cancel", 409)
            task = asyncio.create_task(other.cancel(), name=f"cancel {mid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return status
        mig = self._running.get(mid)
        if mig is None or status.role != "source":
            raise MigrationRequestError("only the source agent can cancel a running migration", 409)
        if status.phase == "commit" or mig.switching_over:
            raise MigrationRequestError("migration is committing; too late to cancel", 409)
        mig.cancel()
        return status

    def change(self, mid: str, body: Any) -> MigrationStatus:
        """Live change of a running outgoing migration's ``bandwidth_mbps``/``downtime_ms``."""
        status = self.statuses.get(mid)
        if status is None:
            raise MigrationRequestError(f"no migration {mid!r}", 404)
        if status.done:
            raise MigrationRequestError(f"migration {mid} already {status.phase}", 409)
        if mid in self._others:
            raise MigrationRequestError(f"migration {mid} runs on engine {status.native.get('engine')!r}; "
                                        "its limits cannot change while it runs", 409)
        mig = self._running.get(mid)
        if mig is None or status.role != "source":
            raise MigrationRequestError("only the source agent can change a running migration", 409)
        try:
            mig.change(body)
        except ValueError as exc:
            raise MigrationRequestError(str(exc), 409 if "too late" in str(exc) else 400) from None
        return status


def authorise(grant: Grant, mid: str, vm: str, spec: dict[str, Any]) -> None:
    """A ``prepare`` must be the granted migration of the granted VM, and the VM it
    would build (``spec["name"]``) that same VM: else ProtocolError."""
    if mid != grant.migration:
        raise ProtocolError(f"the grant is for migration {grant.migration!r}, not {mid!r}")
    if vm != grant.vm:
        raise ProtocolError(f"the grant is for VM {grant.vm!r}, not {vm!r}")
    if spec.get("name") != grant.vm:
        raise ProtocolError(f"the grant is for VM {grant.vm!r}; the spec builds {spec.get('name')!r}")


def _status_from(entry: Entry) -> MigrationStatus:
    """The status a restarted agent shows for a journalled migration."""
    st = MigrationStatus(id=entry.id, vm=entry.vm, role=entry.role, peer=f"{entry.peer_host}:{entry.peer_port}")
    st.journal = entry
    st.budget_exceeded = entry.budget_exceeded
    if entry.history:
        st.started = float(entry.history[0].get("time", st.started))
    if entry.step == "committed":
        st.set_phase("completed")
    elif entry.step == "rolled_back":
        st.fail(entry.reason or "rolled back")
    else:
        st.phase = {"go": "commit", "paused": "stopcopy"}.get(entry.step, "precopy")
        st.error = f"the agent restarted at step {entry.step!r}; settling"
    return st


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
