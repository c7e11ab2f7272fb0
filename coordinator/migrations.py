"""Migration orchestration: ask the source agent to migrate, follow it, record it.

The agents move the memory; the coordinator starts the move, polls the source
agent's status, stores each change, publishes it to SSE subscribers, and on
completion moves the VM's record to the target host.

The coordinator names a migration before it asks the source agent (the agent
runs it under that id), so after a coordinator restart every unfinished
migration can be asked about; when the source agent no longer knows it (it
never got the request, or it restarted), where the VM really runs decides the
outcome (``Reconciler.migration_outcome``) and the record follows the VM.
Each unfinished migration is followed by exactly one coordinator: the one
holding its lease (``migration:<id>``, taken when the record is created and
renewed while polling). Every coordinator looks for unfinished migrations
whose lease has expired (their follower died) and adopts them, at start-up
and every ``lease_ttl_s``; a clean stop hands its migrations over at once.

Over a concurrency limit (``migration_queue``) a migration is recorded ``queued``
and touches nothing; ``dispatch()`` starts queued ones, oldest first, when a slot
frees (after any migration here ends, and every ``lease_ttl_s`` for slots freed by
other coordinators); whichever coordinator takes a queued migration's lease starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from novacron.coordinator import migration_queue
from novacron.coordinator.agent_client import AgentClient, AgentError
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.events import EventHub
from novacron.coordinator.metrics import CoordinatorMetrics
from novacron.coordinator.migration_policies import Policies
from novacron.coordinator.models import (
    HOST_UP,
    VM,
    Host,
    Migration,
    cpu_model_problem,
    spec_networks,
)
from novacron.coordinator.reconcile import Reconciler
from novacron.coordinator.scheduler.placer import host_in_maintenance
from novacron.coordinator.store import Store
from novacron.faults import crash_point
from novacron.grants import GrantSigner

log = logging.getLogger("novacron.coordinator.migrations")

# Consecutive failed polls of the source agent before the VMs are asked where the guest runs.
MAX_POLL_FAILURES = 40
UNDECIDED_RETRY_S = 2.0  # between looks at the VMs while the agents cannot tell yet
# On close, how long starts in flight may take to finish their agent call and record.
START_SETTLE_S = 30.0
# an offline copy's default bound when the options give no timeout_s (the agent's default)
OFFLINE_TIMEOUT_S = 600.0
OFFLINE_OPTIONS = ("offline", "timeout_s", "liveness_s")
ROUNDS_KEPT = 50  # the last pre-copy rounds a migration record keeps (as the agent does)


class OfflineRefused(Exception):
    """A stopped VM cannot be moved as it is (its agent says otherwise)."""


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, AgentError) else str(exc)


def local_disks(spec: dict[str, Any]) -> list[int]:
    """The VM's local disks (by index): an offline migration copies them; a boot image
    and shared disks are files every host has."""
    return [i for i, d in enumerate(spec.get("disks") or ())
            if isinstance(d, dict) and d.get("storage", "local") == "local"]


async def copy_disks_offline(agents: AgentClient, grants: GrantSigner, mig: Migration, source: Host,
                             target: Host, *, poll_s: float = 0.2) -> None:
    """Have ``source`` copy the stopped VM's local disks to ``target`` over the agents'
    migration channel, under a grant as for a live migration (agent/migration/offline.py);
    the target then has the VM defined (stopped) with the copies. Raises AgentError when
    the copy failed: the target removed what it made; the source's VM is unchanged."""
    grant = grants.issue(migration=mig.id, vm=mig.vm, source=source.name, target=target.name,
                         url=target.url, data_host=urlsplit(target.url).hostname or "",
                         data_port=target.data_port or 0)
    # the live path's options (a policy's post-copy, digests, bandwidth) do not apply to a copy
    options = {k: v for k, v in mig.options.items() if k in OFFLINE_OPTIONS}
    try:
        await agents.call(source.name, source.url, source.token, "POST", "/v1/migrations",
                          {"vm": mig.vm, "grant": grant, "options": options})
    except AgentError as exc:
        if not (exc.status == 0 and exc.sent):
            raise
        # the answer was lost, not refused: the agent may be copying under our id
        log.warning("no answer to the offline copy's start; following it by its id",
                    extra={"migration": mig.id, "error": exc.message})
    deadline = time.monotonic() + float(mig.options.get("timeout_s", OFFLINE_TIMEOUT_S)) + 60
    unreachable = ""
    while time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        try:
            st = await agents.call(source.name, source.url, source.token, "GET",
                                   f"/v1/migrations/{mig.id}", timeout_s=10)
        except AgentError as exc:
            if exc.status == 404:  # it never started there
                raise AgentError(source.name, f"the disk copy did not start: {exc.message}", 409) from None
            unreachable = exc.message  # asked again until the deadline
            continue
        phase = st.get("phase") if isinstance(st, dict) else None
        if phase == "completed":
            return
        if phase in ("failed", "cancelled"):
            raise AgentError(source.name, str(st.get("error") or phase), 409)
    raise AgentError(source.name, f"the disk copy did not finish in time{': ' + unreachable if unreachable else ''}",
                     0)


def topic(mig_id: str) -> str:
    return f"migration:{mig_id}"


def lease_name(mig_id: str) -> str:
    return f"migration:{mig_id}"


# Held while a coordinator counts slots and records a start: the limits hold across
# every coordinator sharing the database, not just within one.
ADMISSION_LEASE = "migration-admission"
ADMISSION_WAIT_S = 5.0  # beyond lease_ttl_s: a holder that died has lost it by then


class MigrationManager:
    def __init__(self, cfg: CoordinatorConfig, store: Store, agents: AgentClient,
                 events: EventHub, reconciler: Reconciler | None = None,
                 grants: GrantSigner | None = None, holder: str = "",
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.cfg, self.store, self.agents, self.events = cfg, store, agents, events
        self.reconciler = reconciler or Reconciler(store, agents)
        self._undecided: dict[str, str] = {}  # migration id -> what the agents said last
        self.grants = grants or GrantSigner.generate()
        self.policies = Policies.from_config(cfg.migration_policies, cfg.default_migration_policy)
        self.metrics = metrics
        self.following: dict[str, Migration] = {}  # the records our pollers update
        if metrics is not None:
            metrics.watch_migrations(lambda: self.following.values())
        self.holder = holder or "coordinator-" + secrets.token_hex(6)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._starting: set[asyncio.Task[Migration]] = set()
        self._lock = asyncio.Lock()
        self._adopter: asyncio.Task[None] | None = None
        self._dispatching: asyncio.Task[None] | None = None
        self._dispatch_again = False
        self.limits = migration_queue.Limits(cfg.migration_limit_outbound,
                                             cfg.migration_limit_inbound, cfg.migration_limit_fleet)

    async def _hold(self, mig_id: str) -> bool:
        """Take or renew the lease that makes us ``mig_id``'s one follower."""
        return await self.store.acquire_lease(lease_name(mig_id), self.holder,
                                              self.cfg.lease_ttl_s) is not None

    async def start(self, vm_name: str, target: str, options: dict[str, Any], *,
                    force: bool = False, policy: str | None = None) -> Migration:
        """Record the migration and hand it to the source agent.

        The work runs in its own task, shielded from the caller: a client that
        hangs up during the agent call cannot leave the record pending and the
        VM marked migrating; the start still ends as followed or failed.
        """
        task = asyncio.create_task(self._start(vm_name, target, options, force, policy),
                                   name=f"start-{vm_name}")
        self._starting.add(task)
        task.add_done_callback(self._started)
        return await asyncio.shield(task)

    def _started(self, task: asyncio.Task[Migration]) -> None:
        self._starting.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a refusal nobody awaited any more is not an error

    async def _start(self, vm_name: str, target: str, options: dict[str, Any],
                     force: bool = False, policy: str | None = None) -> Migration:
        # one check-then-start at a time: no two migrations of one VM, no limit passed
        async with self._lock, self._admission():
            vm, src, dst = await self._check(vm_name, target, force)
            active = await self.store.active_migrations()
            for other in active:
                if other.vm == vm_name:
                    raise ApiError(409, f"VM {vm_name!r} is already migrating ({other.id}, "
                                   f"{other.phase})")
            applied = self.policies.resolve(requested=policy, vm_policy=vm.migration_policy,
                                            labels=vm.labels, options=options)
            # the convergence policy is explicit on every record: the caller's or the
            # migration policy's, else the coordinator's default
            options = {"on_no_converge": self.cfg.migration_on_no_converge, **applied.options}
            now = time.time()
            mig = Migration(id="m-" + secrets.token_hex(6), vm=vm_name, source=src.name,
                            target=dst.name,
                            options={**options, "offline": True} if vm.state == "stopped" else options,
                            policy=applied.policy,
                            policy_source=applied.source, created_at=now, updated_at=now)
            wait = migration_queue.wait_reason(self.limits, active, mig)
            if wait is not None:  # over a limit: recorded, started by dispatch() when a slot frees
                mig.phase, mig.queue_reason = migration_queue.QUEUED, wait
                await self._save(mig)
                log.info("migration queued", extra={"migration": mig.id, "vm": vm_name,
                                                    "source": src.name, "target": dst.name,
                                                    "why": wait})
                self.kick()  # older queued ones may fit already (slots freed elsewhere)
                return mig
            await self._claim(mig, vm)
        return await self._launch(mig, src, dst)

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        """The fleet-wide admission lease, for counting slots and recording starts."""
        deadline = time.monotonic() + self.cfg.lease_ttl_s + ADMISSION_WAIT_S
        while await self.store.acquire_lease(ADMISSION_LEASE, self.holder,
                                             self.cfg.lease_ttl_s) is None:
            if time.monotonic() > deadline:
                raise ApiError(503, "another coordinator is starting migrations; try again",
                               headers={"Retry-After": "1"})
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self.store.release_lease(ADMISSION_LEASE, self.holder)

    async def _check(self, vm_name: str, target: str, force: bool) -> tuple[VM, Host, Host]:
        """The VM and both hosts, if the VM may move to ``target`` now; else ApiError."""
        vm = await self.store.get_vm(vm_name)
        if vm is None:
            raise ApiError(404, f"no VM named {vm_name!r}")
        if vm.state not in ("running", "stopped"):  # stopped: a cold move, definition (and disks)
            raise ApiError(409, f"VM {vm_name!r} is {vm.state}; only a running VM (live) or "
                           "a stopped one (offline) can migrate")
        if vm.host == target:
            raise ApiError(409, f"VM {vm_name!r} is already on host {target!r}")
        src = await self.store.get_host(vm.host)
        dst = await self.store.get_host(target)
        if dst is None:
            raise ApiError(404, f"no host named {target!r}")
        if dst.state != HOST_UP:
            raise ApiError(409, f"target host {target!r} is down")
        if not force and await host_in_maintenance(self.store, target):
            raise ApiError(409, f"target host {target!r} is in maintenance (force=true, "
                           "novacron migrate --force, to move the VM there anyway)")
        if src is None or src.state != HOST_UP:
            raise ApiError(409, f"source host {vm.host!r} is down")
        if not dst.data_port:
            raise ApiError(409, f"target host {target!r} reported no migration data port")
        missing = [n for n in spec_networks(vm.spec) if n not in dst.networks]
        if missing:
            raise ApiError(409, f"target host {target!r} lacks the network(s) {', '.join(missing)} "
                                f"that VM {vm_name!r} joins (it has: {', '.join(dst.networks) or 'none'})")
        problem = cpu_model_problem(vm.spec, dst, src)
        if problem:
            raise ApiError(409, f"cannot migrate VM {vm_name!r}: {problem}")
        return vm, src, dst

    async def _claim(self, mig: Migration, vm: VM) -> None:
        """Take the migration's lease, mark the VM migrating and store the record (pending)."""
        await self._hold(mig.id)  # ours before any other coordinator acts on it
        now = time.time()
        vm.state, vm.updated_at = "migrating", now
        # The lock of the caller covers this coordinator; the compare-and-set covers the others.
        was = "stopped" if mig.options.get("offline") else "running"
        if not await self.store.put_vm_if(vm, was):
            await self.store.release_lease(lease_name(mig.id), self.holder)
            raise ApiError(409, f"VM {vm.name!r} changed meanwhile (another coordinator "
                           "is migrating it?)")
        mig.phase, mig.queue_reason, mig.started_at = "pending", None, now  # the VM is ours
        try:
            await self.store.put_migration(mig)
        except BaseException:
            vm.state = was
            await self.store.put_vm_if(vm, "migrating")
            raise

    async def _launch(self, mig: Migration, src: Host, dst: Host) -> Migration:
        """Hand a claimed migration to the source agent and follow it."""
        vm_name = mig.vm
        crash_point("migration.start.recorded")
        if mig.options.get("offline"):
            return await self._offline(mig, src, dst)
        # The source gets the coordinator's grant, never the destination's credential; the
        # destination's addresses in it come from our registry, never from a caller. The
        # agent runs it under our id: after a crash we can ask it what became of it.
        grant = self.grants.issue(migration=mig.id, vm=vm_name, source=src.name, target=dst.name,
                                  url=dst.url, data_host=urlsplit(dst.url).hostname or "",
                                  data_port=dst.data_port or 0)
        request = {"vm": vm_name, "grant": grant, "options": mig.options}  # the grant names mig.id
        try:
            reply = await self.agents.call(src.name, src.url, src.token, "POST", "/v1/migrations",
                                           request)
        except AgentError as exc:
            if exc.status == 0 and exc.sent:
                # the answer was lost, not refused: the agent may be running it under our id
                log.warning("no answer to the migration start; following it by its id",
                            extra={"migration": mig.id, "error": exc.message})
                mig.agent_migration_id = mig.id
                await self._save(mig)
                self._follow(mig)
                return mig
            await self._finish(mig, "failed", error=f"source agent refused: {exc.message}")
            raise ApiError(502, f"source agent {src.name!r} refused the migration: "
                           f"{exc.message}") from None
        crash_point("migration.start.accepted")
        mig.agent_migration_id = str(reply.get("id")) if isinstance(reply, dict) else None
        if not mig.agent_migration_id:
            await self._finish(mig, "failed", error="source agent returned no migration id")
            raise ApiError(502, "source agent returned no migration id")
        self._apply(mig, reply)
        await self._save(mig)
        log.info("migration started", extra={"migration": mig.id, "vm": vm_name,
                                             "source": src.name, "target": dst.name})
        self._follow(mig)
        return mig

    # -- the queue -----------------------------------------------------------------------

    def kick(self) -> None:
        """Look at the queue soon (a slot may have freed); one look at a time."""
        if self._dispatching is None or self._dispatching.done():
            self._dispatching = asyncio.create_task(self._dispatch_logged(), name="migration-queue")
        else:
            self._dispatch_again = True

    async def _dispatch_logged(self) -> None:
        while True:
            self._dispatch_again = False
            try:
                await self.dispatch()
            except Exception as exc:
                log.warning("starting queued migrations failed", extra={"error": str(exc)})
            if not self._dispatch_again:
                return

    async def dispatch(self) -> list[str]:
        """Start the queued migrations the limits admit now, oldest first; a queued one
        whose VM or hosts no longer allow the move fails (the VM stays where it runs).
        Any coordinator may start a queued migration: the one that takes its lease."""
        launches: list[tuple[Migration, Host, Host]] = []
        async with self._lock, self._admission():
            active = await self.store.active_migrations()
            admitted, waiting = migration_queue.admit(self.limits, active)
            for mig in admitted:
                if not await self._hold(mig.id):
                    continue  # another coordinator is starting (or cancelling) it
                fresh = await self.store.get_migration(mig.id)
                if fresh is None or fresh.phase != migration_queue.QUEUED:
                    await self.store.release_lease(lease_name(mig.id), self.holder)
                    continue
                try:
                    # maintenance was checked (or forced) when it was asked for
                    vm, src, dst = await self._check(fresh.vm, fresh.target, force=True)
                    if vm.host != fresh.source:
                        raise ApiError(409, f"VM {vm.name!r} is on {vm.host} now")
                    await self._claim(fresh, vm)
                except ApiError as exc:
                    await self._finish(fresh, "failed", error=f"not started from the queue: "
                                       f"{exc.message}")
                    continue
                launches.append((fresh, src, dst))
            for mig in active:  # keep each waiting record's reason current
                why = waiting.get(mig.id)
                if why is not None and why != mig.queue_reason:
                    mig.queue_reason = why
                    await self._save(mig)
        for mig, src, dst in launches:
            task = asyncio.create_task(self._launch(mig, src, dst), name=f"start-{mig.vm}")
            self._starting.add(task)
            task.add_done_callback(self._started)
        return [m.id for m, _s, _d in launches]

    async def _offline(self, mig: Migration, src: Host, dst: Host) -> Migration:
        """Move a stopped VM: the target agent defines it (stopped), then the source
        forgets it, then the record follows. Until the source has forgotten it nothing
        has changed for the VM: any failure before removes what the target defined and
        leaves the source's definition (and disks) as they were."""
        mig.phase = "prepare"
        await self._save(mig)
        try:
            status = await self.agents.call(src.name, src.url, src.token, "GET", f"/v1/vms/{mig.vm}",
                                            timeout_s=10)
            state = status.get("state") if isinstance(status, dict) else None
            if state != "stopped":
                raise OfflineRefused(f"the VM is {state} on {src.name}, not stopped")
            spec = status.get("spec")
            if not isinstance(spec, dict):
                raise OfflineRefused(f"agent {src.name} reported no spec for the VM")
            # the agent's spec: with the MACs it generated and keeps for the VM's life
            spec = {k: v for k, v in spec.items() if v not in ("", None, [])}
        except (AgentError, OfflineRefused) as exc:
            await self._finish(mig, "failed", error=f"offline migration refused: {_why(exc)}")
            raise ApiError(409, f"offline migration of {mig.vm!r} refused: {_why(exc)}") from None
        defined = False
        try:
            if local_disks(spec):  # copied over the agents' channel; the target then defines it
                await copy_disks_offline(self.agents, self.grants, mig, src, dst)
            else:
                await self.agents.call(dst.name, dst.url, dst.token, "POST", "/v1/vms",
                                       {**spec, "start": False}, timeout_s=60)
            defined = True
            crash_point("migration.offline.defined")
            await self._forget_at_source(mig, src)
        except AgentError as exc:
            if defined and exc.status == 0 and exc.sent:
                # the source's answer was lost and it still may or may not have the VM: keep the
                # target's definition rather than risk losing both; the record stays at the source
                await self._finish(mig, "failed", error=f"offline migration: outcome at {src.name} "
                                   f"unknown ({exc.message}); {dst.name} keeps its stopped copy")
                raise ApiError(502, f"offline migration of {mig.vm!r}: {src.name} did not answer; "
                               f"{dst.name} keeps a stopped definition until this is settled") from None
            if defined:  # the source still has it: the target's copy goes
                try:
                    await self.agents.call(dst.name, dst.url, dst.token, "DELETE", f"/v1/vms/{mig.vm}",
                                           timeout_s=60)
                except AgentError as undo:
                    log.error("offline migration: could not remove the target's definition",
                              extra={"migration": mig.id, "host": dst.name, "error": undo.message})
            await self._finish(mig, "failed", error=f"offline migration failed: {exc}")
            raise ApiError(409 if 400 <= exc.status < 500 else 502,
                           f"offline migration of {mig.vm!r} failed, the VM stays on {src.name}: "
                           f"{exc}") from None
        await self._finish(mig, "completed")
        log.info("offline migration completed", extra={"migration": mig.id, "vm": mig.vm,
                                                       "source": src.name, "target": dst.name})
        return mig

    async def _forget_at_source(self, mig: Migration, src: Host) -> None:
        """The source drops its definition; a 404 means it has none already (the target's is
        then the only one). A lost answer is asked again: gone means done."""
        try:
            await self.agents.call(src.name, src.url, src.token, "DELETE", f"/v1/vms/{mig.vm}", timeout_s=60)
        except AgentError as exc:
            if exc.status == 404:
                return
            if exc.status != 0:
                raise
            try:
                await self.agents.call(src.name, src.url, src.token, "GET", f"/v1/vms/{mig.vm}", timeout_s=10)
            except AgentError as again:
                if again.status == 404:
                    return
                raise exc from None
            raise AgentError(src.name, f"it still has the VM after: {exc.message}", 409) from None

    async def cancel(self, mig_id: str) -> Migration:
        mig = await self.store.get_migration(mig_id)
        if mig is None:
            raise ApiError(404, f"no migration {mig_id!r}")
        if mig.done:
            raise ApiError(409, f"migration {mig_id} already {mig.phase}")
        if mig.phase == migration_queue.QUEUED:
            async with self._lock:  # not while our dispatch starts it
                if not await self._hold(mig_id):
                    raise ApiError(409, f"migration {mig_id} is being started by another "
                                   "coordinator; cancel it again")
                fresh = await self.store.get_migration(mig_id)
                if fresh is not None and fresh.phase == migration_queue.QUEUED:
                    await self._finish(fresh, "cancelled", error="cancelled while queued")
                    return fresh
                await self.store.release_lease(lease_name(mig_id), self.holder)
            return await self.cancel(mig_id)  # it started meanwhile: cancel it at the agent
        src = await self.store.get_host(mig.source)
        if src is None or mig.agent_migration_id is None:
            await self._finish(mig, "cancelled", error="cancelled before the agent started it")
            return mig
        try:
            await self.agents.call(src.name, src.url, src.token, "POST",
                                   f"/v1/migrations/{mig.agent_migration_id}/cancel")
        except AgentError as exc:
            raise ApiError(409 if 400 <= exc.status < 500 else 502,
                           f"source agent could not cancel: {exc.message}") from None
        return mig

    async def change(self, mig_id: str, limits: dict[str, Any]) -> Migration:
        """Live change of ``bandwidth_mbps``/``downtime_ms``: the source agent applies it
        (within a round); the record's options follow once it did."""
        mig = await self.store.get_migration(mig_id)
        if mig is None:
            raise ApiError(404, f"no migration {mig_id!r}")
        if mig.done:
            raise ApiError(409, f"migration {mig_id} already {mig.phase}")
        src = await self.store.get_host(mig.source)
        if src is None or mig.agent_migration_id is None:
            raise ApiError(409, f"migration {mig_id} has not started on its source yet")
        try:
            reply = await self.agents.call(src.name, src.url, src.token, "PATCH",
                                           f"/v1/migrations/{mig.agent_migration_id}", limits)
        except AgentError as exc:
            raise ApiError(exc.status if exc.status in (400, 409) else 502,
                           f"source agent refused the change: {exc.message}") from None
        mig = self.following.get(mig_id) or mig  # the record our poller updates, if ours
        mig.options = {**mig.options, **limits}
        self._apply(mig, reply)
        await self._save(mig)
        log.info("migration limits changed", extra={"migration": mig_id, **limits})
        return mig

    async def resume_all(self) -> None:
        """Follow every unfinished migration nobody follows (after a restart, or a
        coordinator's death), now and then every ``lease_ttl_s``. One whose start was
        cut short is asked for under the id the agent was given; if the source agent
        does not know it, the VMs show how it ended."""
        await self.adopt()
        await self.dispatch()
        if self._adopter is None:
            self._adopter = asyncio.create_task(self._adopt_loop(), name="migration-adopter")

    async def adopt(self) -> list[str]:
        adopted = []
        for mig in await self.store.active_migrations():
            if mig.phase == migration_queue.QUEUED:
                continue  # not started: dispatch() starts it when a slot frees
            if mig.id in self._tasks or not await self._hold(mig.id):
                continue  # ours already, or another live coordinator follows it
            fresh = await self.store.get_migration(mig.id)  # its follower may just have saved it
            if fresh is None or fresh.done or fresh.phase == migration_queue.QUEUED:
                await self.store.release_lease(lease_name(mig.id), self.holder)
                continue
            adopted.append(mig.id)
            if fresh.agent_migration_id is None:
                fresh.agent_migration_id = fresh.id  # the id the agent was given, answer or not
            log.info("following migration", extra={"migration": mig.id})
            self._follow(fresh)
        return adopted

    async def _adopt_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s)
            try:
                await self.adopt()
            except Exception as exc:
                log.warning("looking for unfollowed migrations failed", extra={"error": str(exc)})
            self.kick()  # slots freed by other coordinators' migrations

    async def close(self) -> None:
        if self._adopter is not None:
            self._adopter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopter
            self._adopter = None
        if self._dispatching is not None:
            self._dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatching
        if self._starting:  # let starts in flight settle (agent calls time out), then stop them
            _done, pending = await asyncio.wait(set(self._starting), timeout=START_SETTLE_S)
            for start in pending:
                start.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for mig_id in [t.get_name().removeprefix("follow-") for t in tasks]:
            with contextlib.suppress(Exception):  # hand over now rather than at expiry
                await self.store.release_lease(lease_name(mig_id), self.holder)

    # -- following -----------------------------------------------------------------------

    def _follow(self, mig: Migration) -> None:
        task = asyncio.create_task(self._poll(mig), name=f"follow-{mig.id}")
        self._tasks[mig.id] = task
        self.following[mig.id] = mig

        def done(_t: asyncio.Task[None]) -> None:
            self._tasks.pop(mig.id, None)
            self.following.pop(mig.id, None)

        task.add_done_callback(done)

    def _apply(self, mig: Migration, status: Any) -> bool:
        """Copy the agent's status into ``mig``; True if anything changed."""
        if not isinstance(status, dict):
            return False
        before = (mig.phase, mig.round, mig.metrics, mig.error, mig.budget_exceeded)
        phase = status.get("phase")
        if isinstance(phase, str) and phase:
            mig.phase = phase
        if isinstance(status.get("round"), int):
            mig.round = status["round"]
        if isinstance(status.get("metrics"), dict):
            mig.metrics = status["metrics"]
            # for the dashboard's detail view: each pre-copy round, and the options in force
            # (defaults filled in by the agent, e.g. the downtime budget)
            extra: dict[str, Any] = {}
            if isinstance(status.get("rounds"), list):
                extra["rounds"] = status["rounds"][-ROUNDS_KEPT:]
            if isinstance(status.get("options"), dict):
                extra["effective_options"] = status["options"]
            mig.metrics = {**mig.metrics, **extra}
        if status.get("error"):
            mig.error = str(status["error"])
        if isinstance(status.get("budget_exceeded"), bool):
            mig.budget_exceeded = status["budget_exceeded"]
        return before != (mig.phase, mig.round, mig.metrics, mig.error, mig.budget_exceeded)

    async def _poll(self, mig: Migration) -> None:
        failures = 0
        deadline = (mig.started_at or mig.created_at) + self.cfg.migration_timeout_s
        renew_at = time.monotonic() + self.cfg.lease_ttl_s / 3
        try:
            while not mig.done:
                if time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + self.cfg.lease_ttl_s / 3
                    if not await self._hold(mig.id):
                        log.warning("another coordinator follows this migration now",
                                    extra={"migration": mig.id})
                        return
                if time.time() > deadline:
                    await self._finish(mig, "failed", error="migration timed out")
                    return
                src = await self.store.get_host(mig.source)
                if src is None:
                    await self._finish(mig, "failed", error=f"source host {mig.source} removed")
                    return
                try:
                    status = await self.agents.call(
                        src.name, src.url, src.token, "GET",
                        f"/v1/migrations/{mig.agent_migration_id}", timeout_s=10)
                    failures = 0
                except AgentError as exc:
                    failures += 1
                    if exc.status == 404 or failures >= MAX_POLL_FAILURES:
                        if await self._settle_by_placement(mig, exc.message):
                            return
                        failures = 0
                        await asyncio.sleep(max(self.cfg.poll_interval_s, UNDECIDED_RETRY_S))
                        continue
                    await asyncio.sleep(self.cfg.poll_interval_s)
                    continue
                if self._apply(mig, status):
                    if mig.done:
                        await self._finish(mig, mig.phase, error=mig.error)
                        return
                    await self._save(mig)
                await asyncio.sleep(self.cfg.poll_interval_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following migration failed", extra={"migration": mig.id})
            await self._finish(mig, "failed", error="coordinator error while following")

    async def _settle_by_placement(self, mig: Migration, why: str) -> bool:
        """The source agent cannot report the migration: let where the VM runs
        decide it. False while the agents cannot tell yet (asked again later)."""
        outcome, seen = await self.reconciler.migration_outcome(mig)
        if outcome is None:
            if self._undecided.get(mig.id) != seen:  # once per new answer, not every retry
                self._undecided[mig.id] = seen
                log.warning("source agent lost the migration; the VMs do not tell yet",
                            extra={"migration": mig.id, "why": why, "seen": seen})
            return False
        log.warning("source agent lost the migration; settled by where the VM runs",
                    extra={"migration": mig.id, "why": why, "seen": seen, "outcome": outcome})
        error = None if outcome == "completed" else f"source agent lost the migration ({why}); {seen}"
        await self._finish(mig, outcome, error=error)
        return True

    async def _save(self, mig: Migration) -> None:
        mig.updated_at = time.time()
        await self.store.put_migration(mig)
        self.events.publish(topic(mig.id), mig.public())

    async def _finish(self, mig: Migration, phase: str, error: str | None = None) -> None:
        self._undecided.pop(mig.id, None)
        started = mig.phase != migration_queue.QUEUED  # a queued one never touched its VM
        mig.phase, mig.queue_reason = phase, None
        mig.error = error if phase != "completed" else None
        mig.finished_at = time.time()
        vm = await self.store.get_vm(mig.vm) if started else None
        if vm is not None:
            if phase == "completed":
                vm.host = mig.target
            vm.state = "stopped" if mig.options.get("offline") else "running"
            # The source resumes on any failure before commit; ask the agent to be sure.
            host = await self.store.get_host(vm.host)
            if host is not None:
                try:
                    status = await self.agents.call(host.name, host.url, host.token, "GET",
                                                    f"/v1/vms/{vm.name}", timeout_s=5)
                    state = status.get("state") if isinstance(status, dict) else None
                    # "migrating" can linger for a moment on the agent; the move is over.
                    if isinstance(state, str) and state != "migrating":
                        vm.state = state
                except AgentError as exc:
                    log.warning("cannot read VM state after migration",
                                extra={"vm": vm.name, "host": host.name, "error": exc.message})
            vm.updated_at = time.time()
            await self.store.put_vm(vm)
        await self._save(mig)
        if self.metrics is not None:
            self.metrics.migration_ended(mig)
        await self.store.release_lease(lease_name(mig.id), self.holder)
        log.info("migration finished", extra={"migration": mig.id, "phase": phase,
                                              "error": mig.error})
        if started:
            self.kick()  # its slots are free
