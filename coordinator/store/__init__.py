"""Persistence behind one small async interface, so handlers never see SQL.

``Store`` is what handlers use (``request.app[STORE]``, see
``novacron.coordinator.api.keys``). ``open_store(cfg)`` returns the SQLite
implementation (``sqlite.SQLiteStore``: one file, ``<data_dir>/coordinator.db``)
by default, or the PostgreSQL one (``postgres.PostgresStore``) when
``database_url`` is set: then any number of coordinators share one database.
Its schema lives in ``pg_migrations/NNNN_*.sql``, applied at open under an
advisory lock.

How a feature (scheduler, classifier, MCP bridge ...) persists its own data:

1. Preferred: the document methods. Any JSON-serialisable dict under
   (collection, key), e.g.::

       store = request.app[STORE]
       await store.put_doc("scheduler.decisions", vm_name, {"host": "h1", "score": 0.7})
       doc = await store.get_doc("scheduler.decisions", vm_name)      # None if absent
       docs = await store.list_docs("scheduler.decisions")             # [(key, doc)], by key
       await store.delete_doc("scheduler.decisions", vm_name)

   Prefix collections with your feature name. This works on every backend.

2. When you need real tables: register numbered SQL
   migrations for your component at import time of your route module::

       from novacron.coordinator.store import schema
       schema.register("scheduler", [
           "CREATE TABLE scheduler_runs (id INTEGER PRIMARY KEY, at REAL, data TEXT)",  # v1
           "CREATE INDEX scheduler_runs_at ON scheduler_runs (at)",                        # v2
       ])

   Each component's versions are recorded in ``schema_version(component,
   version)``; never edit a released step, append a new one. Run queries with
   ``await store.execute(sql, params)`` / ``await store.query(sql, params)``
   with ``?`` placeholders. Write SQL both SQLite and PostgreSQL accept.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.models import VM, Host, Migration, VMSummary

log = logging.getLogger("novacron.coordinator.store")

# Outcomes of Store.claim_vm.
Claim = Literal["claimed", "stale", "taken"]
# Called with (channel, payload) for each notification (Store.listen).
Listener = Callable[[str, str], None]


class Store(abc.ABC):
    """Async storage of hosts, VMs, migrations and feature documents."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # hosts
    @abc.abstractmethod
    async def put_host(self, host: Host) -> None: ...

    @abc.abstractmethod
    async def get_host(self, name: str) -> Host | None: ...

    @abc.abstractmethod
    async def list_hosts(self) -> list[Host]: ...

    # Heartbeats go through the store's HeartbeatBatcher (``self.heartbeats``: the API
    # posts to it without waiting), which writes them in batches with ``_write_heartbeats``.
    heartbeats: HeartbeatBatcher

    async def heartbeat(self, name: str, fields: dict[str, Any], now: float) -> bool:
        """Merge ``fields`` into the host and mark it up, and return once that is
        committed; False if it is not registered."""
        return await self.heartbeats.commit(name, fields, now)

    @abc.abstractmethod
    async def _write_heartbeats(self, items: list[tuple[str, dict[str, Any], float]]) -> set[str]:
        """Apply a batch of (host, fields, time) in one transaction; the names of the
        hosts that are registered. The hot path of a large fleet: no record is read back
        and decoded."""

    @abc.abstractmethod
    async def mark_down(self, older_than: float, fence: tuple[str, str, int] | None = None,
                        ) -> list[str]:
        """Mark hosts whose last heartbeat is before ``older_than`` down; return their names.

        With ``fence=(lease, holder, token)`` nothing changes unless that lease is still
        held with that token (a holder that lost its lease cannot act on stale belief)."""

    @abc.abstractmethod
    async def delete_host(self, name: str) -> bool: ...

    # host identities (one per name; kept when the host record is deleted, until retired)
    @abc.abstractmethod
    async def bind_host_identity(self, name: str, identity: str, now: float) -> str:
        """Bind ``name`` to ``identity`` unless it is bound already (atomically); return
        the identity the name is bound to now."""

    @abc.abstractmethod
    async def get_host_identity(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def release_host_identity(self, name: str) -> bool: ...

    # VMs
    @abc.abstractmethod
    async def put_vm(self, vm: VM) -> None: ...

    @abc.abstractmethod
    async def get_vm(self, name: str) -> VM | None: ...

    @abc.abstractmethod
    async def list_vms(self, host: str | None = None) -> list[VM]: ...

    @abc.abstractmethod
    async def vm_summaries(self) -> list[VMSummary]:
        """Every VM's name, host, state and size, by name (see ``VMSummary``)."""

    @abc.abstractmethod
    async def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many hosts, and how many VMs, are in each state (counted by the database)."""

    @abc.abstractmethod
    async def vms_to_reconcile(self) -> dict[str, list[str]]:
        """VMs whose record may be behind what the agents report: those creating or
        migrating, and those listed by an up host other than their own — each with the up
        hosts whose last heartbeat listed it.

        Worked out by the database: the same pass in Python over every host's list and
        every VM (100,000 at fleet scale) held the GIL for seconds, so the event loop
        stalled and heartbeats were shed."""

    @abc.abstractmethod
    async def delete_vm(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def put_vm_if(self, vm: VM, state: str, host: str | None = None) -> bool:
        """Store ``vm`` only if its stored record is still in ``state`` (compare and set,
        e.g. running -> migrating, so two coordinators cannot both start moving it) and,
        if ``host`` is given, still on that host."""

    @abc.abstractmethod
    async def claim_vm(self, vm: VM, generation: int) -> Claim:
        """Insert the new ``vm`` on ``vm.host`` in one transaction, only if the host's
        generation is still ``generation`` (as read with the host before placing).

        "claimed": stored, the host's generation bumped; "stale": the host changed (or
        went) since, place again on fresh records; "taken": a VM of that name exists.
        ``put_vm`` bumps the generation of the VM's host too, so every placement
        decision is checked against everything placed since it read the fleet."""

    # migrations
    @abc.abstractmethod
    async def put_migration(self, mig: Migration) -> None: ...

    @abc.abstractmethod
    async def get_migration(self, mig_id: str) -> Migration | None: ...

    @abc.abstractmethod
    async def list_migrations(self, vm: str | None = None, limit: int = 100) -> list[Migration]:
        """Newest first."""

    @abc.abstractmethod
    async def active_migrations(self) -> list[Migration]: ...

    # feature documents
    @abc.abstractmethod
    async def put_doc(self, collection: str, key: str, doc: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get_doc(self, collection: str, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]: ...

    @abc.abstractmethod
    async def delete_doc(self, collection: str, key: str) -> bool: ...

    # once-per-fleet work
    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take or renew lease ``name`` for ``holder`` for ``ttl_s`` seconds.

        Returns the fencing token (grows with every change of holder), or None while
        another holder's lease has not expired."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (if ``holder`` holds it), so another can take it at once."""

    # notifications between coordinators sharing the store
    async def notify(self, channel: str, payload: str) -> bool:
        """Send ``payload`` to every listener of ``channel`` in other processes sharing
        this store; False if this backend has no such peers (SQLite: one process)."""
        return False

    async def listen(self, channel: str, callback: Listener) -> bool:
        """Call ``callback(channel, payload)`` for notifications from other processes
        (on the event loop; it must not block). False where there are none (SQLite)."""
        del channel, callback
        return False

    # raw SQL for features with registered migrations (backend specific)
    @abc.abstractmethod
    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one statement in its own transaction; return the affected row count."""

    @abc.abstractmethod
    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...


HeartbeatNews = Literal["queued", "unknown", "failing"]


class HeartbeatBatcher:
    """Group commit of heartbeats: those that arrive while a batch is being written go
    into the next one, so a fleet of any size costs one transaction per batch.

    ``commit`` waits for its batch. ``post`` does not: a heartbeat only says "still
    alive, this is my usage", the next one supersedes it, and one lost with a crashed
    coordinator is repaired by the next, seconds later. So the API answers an agent
    without waiting for the database, whose pauses (a slow batch, a long query beside
    it) would otherwise reach every agent as latency. What the database said comes
    back with that host's next heartbeat: not registered (``unknown``), or the last
    batch failed (``failing``). ``backlog`` is what is queued or being written: the
    API sheds load on it. ``settled`` gives readers their own coordinator's writes.
    """

    def __init__(self, write: Callable[[list[tuple[str, dict[str, Any], float]]],
                                       Awaitable[set[str]]]) -> None:
        self._write = write
        # (name, fields, time, waiter, its place in the queue's order)
        self._queue: list[tuple[str, dict[str, Any], float, asyncio.Future[bool] | None, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._unknown: set[str] = set()  # posted heartbeats of hosts the store did not know
        # a host registered after some of its heartbeats were queued: their "not known" is
        # old news (queue order at registration, by name; dropped once those are written)
        self._registered_at: dict[str, int] = {}
        self._registrations: deque[tuple[int, str]] = deque()
        self.error: str | None = None  # why the last batch failed; None once one succeeds
        self._queued_seq = self._written_seq = 0  # heartbeats queued / batches done, in order
        self._written = asyncio.Event()  # set (then replaced) when a batch is done

    @property
    def backlog(self) -> int:
        return len(self._queue) + self._in_flight

    async def commit(self, name: str, fields: dict[str, Any], now: float) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(name, fields, now, fut)
        return await fut

    def post(self, name: str, fields: dict[str, Any], now: float) -> HeartbeatNews:
        """Queue the heartbeat; what an earlier one of ``name`` found. ``unknown``: that
        host is not registered (nothing is queued; the news is given once). ``failing``:
        queued, but the last batch failed (``error``)."""
        if name in self._unknown:
            self._unknown.discard(name)
            return "unknown"
        self._enqueue(name, fields, now, None)
        return "failing" if self.error is not None else "queued"

    def registered(self, name: str) -> None:
        """``name`` has just been (re)registered: drop news that it is not, and any that
        its heartbeats queued before now would bring."""
        self._unknown.discard(name)
        if self._written_seq < self._queued_seq:
            self._registered_at[name] = self._queued_seq
            self._registrations.append((self._queued_seq, name))

    async def settled(self) -> None:
        """Return once every heartbeat queued before the call is written (or failed)."""
        target = self._queued_seq
        while self._written_seq < target:
            await self._written.wait()

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])  # let queued heartbeats commit

    def _enqueue(self, name: str, fields: dict[str, Any], now: float,
                 fut: asyncio.Future[bool] | None) -> None:
        self._queued_seq += 1
        self._queue.append((name, fields, now, fut, self._queued_seq))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="heartbeat-batches")

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            self._in_flight = len(batch)
            try:
                known = await self._write([(n, f, t) for n, f, t, _, _ in batch])
            except BaseException as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                for _, _, _, fut, _ in batch:
                    if fut is not None and not fut.done():
                        if isinstance(exc, asyncio.CancelledError):
                            fut.cancel()
                        else:
                            fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.warning("heartbeats not recorded", extra={"heartbeats": len(batch),
                                                              "error": self.error})
            else:
                self.error = None
                for name, _, _, fut, seq in batch:
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(name in known)
                    elif name not in known and seq > self._registered_at.get(name, 0):
                        self._unknown.add(name)
            finally:
                self._in_flight = 0
                self._written_seq += len(batch)
                regs = self._registrations
                while regs and regs[0][0] <= self._written_seq:  # all queued before it are written
                    seq, name = regs.popleft()
                    if self._registered_at.get(name) == seq:
                        del self._registered_at[name]
                self._written.set()
                self._written = asyncio.Event()


def newest_heartbeats(items: Iterable[tuple[str, dict[str, Any], float]],
                      ) -> dict[str, tuple[dict[str, Any], float]]:
    """One entry per host of a heartbeat batch: fields merged in order, the newest time."""
    latest: dict[str, tuple[dict[str, Any], float]] = {}
    for name, fields, now in items:
        old = latest.get(name)
        latest[name] = ({**old[0], **fields} if old else fields, now)
    return latest


def group_sightings(rows: Iterable[tuple[str, str | None]]) -> dict[str, list[str]]:
    """``vms_to_reconcile`` rows (VM, reporting host or None) as VM -> hosts."""
    out: dict[str, list[str]] = {}
    for name, host in rows:
        hosts = out.setdefault(name, [])
        if host is not None:
            hosts.append(host)
    return out


def open_store(cfg: CoordinatorConfig) -> Store:
    """The configured backend (not yet opened: ``await store.open()``)."""
    if cfg.database_url:
        from novacron.coordinator.store.postgres import PostgresStore

        return PostgresStore(cfg.database_url, pool_size=cfg.database_pool_size)
    from novacron.coordinator.store.sqlite import SQLiteStore

    return SQLiteStore(cfg.data_dir / "coordinator.db")
