"""Drains: empty a host by live-migrating every VM off it, and run a rebalance plan.

A drain puts its host in maintenance first (nothing new lands there), then moves
each VM on it through the scheduler (``choose_target``: never a host in
maintenance, down, or lacking the VM's networks) and ``MigrationManager.start``
(so the concurrency limits apply: a move over a limit is queued there), at most
``max_parallel`` at a time. A VM that cannot move stays running where it is and
is reported with the reason; nothing is retried behind the operator's back.
Applying a rebalance plan is the same run with the plan's targets fixed.

A run is one document in the store (collection ``fleet.drains``, both backends),
rewritten on every change: ``{"id", "kind": "drain"|"rebalance", "host",
"state": "running"|"done"|"failed", "max_parallel", "created_at", "finished_at",
"vms": [{"vm", "source", "target", "migration", "state", "error"}]}`` where a VM's
state is pending, queued, migrating, moved or failed. ``done``: every VM moved;
``failed``: at least one did not. While a drain runs, ``fleet.draining/<host>``
names it (hosts show ``draining``). Each running drain is driven by one
coordinator, the holder of its lease ``drain:<id>``; after that coordinator dies
another adopts it and follows the migrations already started (the migration ids
are in the document) before starting the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.migration_queue import QUEUED, Slots, running
from novacron.coordinator.migrations import MigrationManager
from novacron.coordinator.models import HOST_UP
from novacron.coordinator.scheduler.placer import choose_target, set_maintenance
from novacron.coordinator.store import Store

log = logging.getLogger("novacron.coordinator.drains")

COLLECTION = "fleet.drains"
DRAINING = "fleet.draining"  # host name -> {"drain": id} while its drain runs
MAX_PARALLEL = 64
FOLLOW_INTERVAL_S = 0.25
ENTRY_DONE = frozenset({"moved", "failed"})


def lease_name(drain_id: str) -> str:
    return f"drain:{drain_id}"


async def draining(store: Store, host: str) -> str | None:
    """The id of the drain running on ``host``, if any."""
    mark = await store.get_doc(DRAINING, host)
    if mark is None:
        return None
    doc = await store.get_doc(COLLECTION, str(mark.get("drain")))
    return str(doc["id"]) if doc is not None and doc.get("state") == "running" else None


async def draining_hosts(store: Store) -> dict[str, str]:
    """Host -> the drain emptying it, for every host being drained."""
    return {host: str(m.get("drain")) for host, m in await store.list_docs(DRAINING)}


class DrainManager:
    def __init__(self, cfg: CoordinatorConfig, store: Store, migrations: MigrationManager,
                 holder: str) -> None:
        self.cfg, self.store, self.migrations, self.holder = cfg, store, migrations, holder
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()  # one drain start at a time (no host drained twice)
        self._choose_lock = asyncio.Lock()  # a target choice sees the moves started before it
        self._save_lock = asyncio.Lock()
        self._adopter: asyncio.Task[None] | None = None

    # -- asking --------------------------------------------------------------------------

    async def drain(self, host: str, max_parallel: int) -> dict[str, Any]:
        if not 1 <= max_parallel <= MAX_PARALLEL:
            raise ApiError(400, f"max_parallel must be 1..{MAX_PARALLEL}, not {max_parallel}")
        async with self._lock, self._host_guard(host):
            record = await self.store.get_host(host)
            if record is None:
                raise ApiError(404, f"no host named {host!r}")
            if record.state != HOST_UP:
                raise ApiError(409, f"host {host!r} is down: its VMs cannot be live-migrated "
                               "(bring its agent back, or 'novacron vm delete --force' them)")
            running = await self.draining(host)
            if running is not None:
                raise ApiError(409, f"host {host!r} is being drained already ({running}; "
                               f"see 'novacron drain show {running}')")
            await set_maintenance(self.store, host, True)
            vms = sorted(await self.store.list_vms(host=host), key=lambda v: v.name)
            doc = self._new("drain", host, max_parallel,
                            [{"vm": v.name, "source": host, "target": None} for v in vms])
            await self.store.put_doc(DRAINING, host, {"drain": doc["id"]})
            await self._save(doc)
        log.info("drain started", extra={"drain": doc["id"], "host": host, "vms": len(vms),
                                         "max_parallel": max_parallel})
        self._run(doc)
        return doc

    @contextlib.asynccontextmanager
    async def _host_guard(self, host: str) -> AsyncIterator[None]:
        """A short lease per host around the check-and-mark: coordinators sharing the
        database cannot both start draining one host."""
        name = f"drain-start:{host}"
        if await self.store.acquire_lease(name, self.holder, self.cfg.lease_ttl_s) is None:
            raise ApiError(409, f"another coordinator is starting a drain of {host!r} right now")
        try:
            yield
        finally:
            await self.store.release_lease(name, self.holder)

    async def apply(self, moves: list[dict[str, Any]], max_parallel: int) -> dict[str, Any]:
        """Run the given moves (``{"vm", "source", "target"}``, a rebalance plan's)."""
        doc = self._new("rebalance", None, max_parallel,
                        [{"vm": m["vm"], "source": m["source"], "target": m["target"]}
                         for m in moves])
        await self._save(doc)
        log.info("rebalance started", extra={"drain": doc["id"], "moves": len(moves)})
        self._run(doc)
        return doc

    def _new(self, kind: str, host: str | None, max_parallel: int,
             vms: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": "d-" + secrets.token_hex(6), "kind": kind, "host": host,
                "state": "running", "max_parallel": max_parallel, "created_at": time.time(),
                "finished_at": None,
                "vms": [{**v, "migration": None, "state": "pending", "error": None} for v in vms]}

    async def get(self, drain_id: str) -> dict[str, Any]:
        doc = await self.store.get_doc(COLLECTION, drain_id)
        if doc is None:
            raise ApiError(404, f"no drain {drain_id!r}")
        return doc

    async def all(self) -> list[dict[str, Any]]:
        docs = [d for _k, d in await self.store.list_docs(COLLECTION)]
        return sorted(docs, key=lambda d: d.get("created_at", 0), reverse=True)

    async def draining(self, host: str) -> str | None:
        return await draining(self.store, host)

    # -- running -------------------------------------------------------------------------

    def _run(self, doc: dict[str, Any]) -> None:
        task = asyncio.create_task(self._drive(doc), name=f"drain-{doc['id']}")
        self._runs[doc["id"]] = task
        task.add_done_callback(lambda _t: self._runs.pop(doc["id"], None))

    async def _drive(self, doc: dict[str, Any]) -> None:
        await self.store.acquire_lease(lease_name(doc["id"]), self.holder, self.cfg.lease_ttl_s)
        keeper = asyncio.create_task(self._keep_lease(doc["id"]), name=f"drain-lease-{doc['id']}")
        slots = asyncio.Semaphore(int(doc["max_parallel"]))  # FIFO: VMs start in list order

        async def one(entry: dict[str, Any]) -> None:
            async with slots:
                try:
                    await self._move(doc, entry)
                except Exception as exc:  # reported, never raised: the other VMs go on
                    log.exception("drain move failed", extra={"drain": doc["id"], "vm": entry["vm"]})
                    await self._set(doc, entry, state="failed", error=f"coordinator error: {exc}")

        try:
            await asyncio.gather(*(one(e) for e in doc["vms"] if e["state"] not in ENTRY_DONE))
            doc["state"] = "done" if all(e["state"] == "moved" for e in doc["vms"]) else "failed"
            doc["finished_at"] = time.time()
            await self._save(doc)
            if doc["kind"] == "drain":
                await self.store.delete_doc(DRAINING, doc["host"])
            stuck = [e["vm"] for e in doc["vms"] if e["state"] != "moved"]
            log.info("drain finished", extra={"drain": doc["id"], "state": doc["state"],
                                              "not_moved": stuck})
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await self.store.release_lease(lease_name(doc["id"]), self.holder)

    async def _keep_lease(self, drain_id: str) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s / 3)
            with contextlib.suppress(Exception):
                await self.store.acquire_lease(lease_name(drain_id), self.holder, self.cfg.lease_ttl_s)

    async def _move(self, doc: dict[str, Any], entry: dict[str, Any]) -> None:
        if entry["migration"] is None:
            async with self._choose_lock:
                mig_id = await self._start(doc, entry)
            if mig_id is None:
                return
        await self._follow(doc, entry)

    async def _start(self, doc: dict[str, Any], entry: dict[str, Any]) -> str | None:
        vm = await self.store.get_vm(entry["vm"])
        if vm is None:
            await self._set(doc, entry, state="failed", error="the VM no longer exists")
            return None
        ongoing = [m for m in await self.store.active_migrations() if m.vm == vm.name]
        if ongoing and ongoing[0].source == entry["source"] and (
                entry["target"] is None or ongoing[0].target == entry["target"]):
            # started by this run before its coordinator stopped (or by hand): follow that one
            mig = ongoing[0]
            await self._set(doc, entry, target=mig.target, migration=mig.id,
                            state="queued" if mig.phase == QUEUED else "migrating")
            return mig.id
        if vm.host != entry["source"]:
            await self._set(doc, entry, state="failed",
                            error=f"the VM is on {vm.host} now, not on {entry['source']}")
            return None
        if vm.state != "running":
            await self._set(doc, entry, state="failed",
                            error=f"the VM is {vm.state}: only running VMs move live; "
                            f"it stays on {vm.host}")
            return None
        target = entry["target"]
        if target is None:
            target, why = await choose_target(self.store, vm, await self._busy_targets())
            if target is None:
                await self._set(doc, entry, state="failed",
                                error=f"no host can take it: {why}; it stays on {vm.host}")
                return None
        try:
            mig = await self.migrations.start(vm.name, target, {})
        except ApiError as exc:
            await self._set(doc, entry, state="failed", target=target,
                            error=f"{exc.message}; it stays on {vm.host}")
            return None
        await self._set(doc, entry, target=target, migration=mig.id,
                        state="queued" if mig.phase == QUEUED else "migrating")
        return mig.id

    async def _busy_targets(self) -> set[str]:
        """Hosts receiving as many migrations as the inbound limit allows."""
        slots = Slots(self.migrations.limits, running(await self.store.active_migrations()))
        return {h for h, n in slots.into.items() if n >= self.migrations.limits.inbound_per_host}

    async def _follow(self, doc: dict[str, Any], entry: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.cfg.migration_timeout_s * 2  # queue time + run time
        while time.monotonic() < deadline:
            mig = await self.store.get_migration(entry["migration"])
            if mig is None:
                await self._set(doc, entry, state="failed", error="its migration record is gone")
                return
            if mig.phase == "completed":
                await self._set(doc, entry, state="moved", error=None)
                return
            if mig.done:
                await self._set(doc, entry, state="failed",
                                error=f"migration {mig.phase}: {mig.error or 'no reason given'}; "
                                f"it stays on {mig.source}")
                return
            state = "queued" if mig.phase == QUEUED else "migrating"
            if state != entry["state"]:
                await self._set(doc, entry, state=state)
            await asyncio.sleep(FOLLOW_INTERVAL_S)
        await self._set(doc, entry, state="failed", error="gave up following its migration "
                        f"{entry['migration']} (see 'novacron migration show')")

    async def _set(self, doc: dict[str, Any], entry: dict[str, Any], **changes: Any) -> None:
        entry.update(changes)
        await self._save(doc)

    async def _save(self, doc: dict[str, Any]) -> None:
        async with self._save_lock:  # whole-document writes, one at a time
            doc["updated_at"] = time.time()
            await self.store.put_doc(COLLECTION, doc["id"], doc)

    # -- lifecycle -----------------------------------------------------------------------

    async def resume_all(self) -> None:
        """Drive every running drain nobody drives (after a restart or a coordinator's
        death), now and every ``lease_ttl_s``."""
        await self.adopt()
        if self._adopter is None:
            self._adopter = asyncio.create_task(self._adopt_loop(), name="drain-adopter")

    async def adopt(self) -> list[str]:
        adopted = []
        for _key, doc in await self.store.list_docs(COLLECTION):
            if doc.get("state") != "running" or doc["id"] in self._runs:
                continue
            if await self.store.acquire_lease(lease_name(doc["id"]), self.holder,
                                              self.cfg.lease_ttl_s) is None:
                continue  # another coordinator drives it
            fresh = await self.store.get_doc(COLLECTION, doc["id"])
            if fresh is None or fresh.get("state") != "running":
                await self.store.release_lease(lease_name(doc["id"]), self.holder)
                continue
            log.info("driving drain", extra={"drain": doc["id"]})
            adopted.append(doc["id"])
            self._run(fresh)
        return adopted

    async def _adopt_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s)
            try:
                await self.adopt()
            except Exception as exc:
                log.warning("looking for undriven drains failed", extra={"error": str(exc)})

    async def close(self) -> None:
        driven = list(self._runs)
        tasks = [t for t in (self._adopter, *self._runs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._adopter = None
        for drain_id in driven:
            with contextlib.suppress(Exception):  # hand over now rather than at expiry
                await self.store.release_lease(lease_name(drain_id), self.holder)
