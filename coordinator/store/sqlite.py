"""SQLite storage: one file, one connection, one worker thread.

sqlite3 blocks, so every call runs on a single dedicated thread (which also
serialises writers). WAL with synchronous=NORMAL: a committed transaction
survives a crash or kill of the coordinator; only a power cut can lose the last
few commits, which heartbeats refresh anyway.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from novacron.coordinator.models import (
    HOST_DOWN,
    HOST_UP,
    MIGRATION_TERMINAL,
    VM,
    Host,
    Migration,
    VMSummary,
    summary_int,
)
from novacron.coordinator.store import (
    Claim,
    HeartbeatBatcher,
    Store,
    group_sightings,
    newest_heartbeats,
    schema,
)

log = logging.getLogger("novacron.coordinator.store")
T = TypeVar("T")
CHECKPOINT_S = 2.0  # background WAL checkpoints
AUTOCHECKPOINT_PAGES = 16384  # 64 MiB: the commit-time checkpoint, if the background one lags


class SQLiteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.heartbeats = HeartbeatBatcher(self._write_heartbeats)
        self._checkpointer: asyncio.Task[None] | None = None

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None or self._pool is None:
            raise RuntimeError("store is not open")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, conn)

    async def open(self) -> None:
        # The database holds the agents' API tokens: only our user may read it.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch(mode=0o600, exist_ok=True)
        os.chmod(self.path, 0o600)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._pool, connect)
        applied = await self._run(_migrate)
        if applied:
            log.info("schema migrated", extra={"path": str(self.path), "applied": applied})
        # the store's own connection no longer checkpoints at commit unless the WAL has
        # grown large: a checkpoint (writing pages back, fsync) inside a heartbeat batch's
        # commit held up every heartbeat behind it
        await self._run(lambda c: c.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}"))
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="sqlite-checkpoint")

    async def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL every CHECKPOINT_S on a connection and thread of its own
        (PASSIVE: never waits for, nor blocks, the store's writes)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-checkpoint")
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(pool, lambda: sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None))
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_S)
                try:
                    await loop.run_in_executor(pool, lambda: conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchall())
                except sqlite3.Error as exc:  # the commit-time checkpoint still bounds the WAL
                    log.warning("WAL checkpoint failed", extra={"error": str(exc)})
        finally:
            await loop.run_in_executor(pool, conn.close)
            pool.shutdown(wait=False)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            await asyncio.wait([self._checkpointer])
            self._checkpointer = None
        await self.heartbeats.close()
        if self._conn is not None and self._pool is not None:
            await self._run(lambda c: c.close())
            self._pool.shutdown(wait=True)
        self._conn = None
        self._pool = None

    async def schema_versions(self) -> dict[str, int]:
        rows = await self.query("SELECT component, MAX(version) FROM schema_version GROUP BY component")
        return {str(c): int(v) for c, v in rows}

    # -- hosts ---------------------------------------------------------------------------

    async def put_host(self, host: Host) -> None:
        data = json.dumps(host.record())
        await self._run(lambda c: _tx(c, [(
            "INSERT INTO hosts (name, state, last_heartbeat, data) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET state=excluded.state, "
            "last_heartbeat=excluded.last_heartbeat, data=excluded.data, "
            "generation=hosts.generation + 1",
            (host.name, host.state, host.last_heartbeat, data))]))

    async def get_host(self, name: str) -> Host | None:
        await self.heartbeats.settled()  # this coordinator's heartbeats are read back
        rows = await self.query("SELECT data, generation FROM hosts WHERE name = ?", (name,))
        return _host(*rows[0]) if rows else None

    async def list_hosts(self) -> list[Host]:
        await self.heartbeats.settled()
        # decoded on the store's thread: thousands of records would stall the event loop
        return await self._run(lambda c: [_host(*r) for r in c.execute(
            "SELECT data, generation FROM hosts ORDER BY name")])

    async def _write_heartbeats(self, items: list[tuple[str, dict[str, Any], float]]) -> set[str]:
        return await self._run(functools.partial(_heartbeat_batch, items=items))

    async def mark_down(self, older_than: float, fence: tuple[str, str, int] | None = None,
                        ) -> list[str]:
        def work(c: sqlite3.Connection) -> list[str]:
            c.execute("BEGIN IMMEDIATE")
            try:
                if fence is not None and c.execute(
                        "SELECT 1 FROM leases WHERE name = ? AND holder = ? AND token = ? "
                        "AND expires_at > ?", (*fence, time.time())).fetchone() is None:
                    c.execute("ROLLBACK")
                    return []
                rows = c.execute(
                    "SELECT name, data FROM hosts WHERE state = ? AND last_heartbeat < ?",
                    (HOST_UP, older_than)).fetchall()
                for name, data in rows:
                    doc = json.loads(data)
                    doc["state"] = HOST_DOWN
                    c.execute("UPDATE hosts SET state = ?, data = ? WHERE name = ?",
                              (HOST_DOWN, json.dumps(doc), name))
                c.execute("COMMIT")
                return [r[0] for r in rows]
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

        return await self._run(work)

    async def delete_host(self, name: str) -> bool:
        return await self.execute("DELETE FROM hosts WHERE name = ?", (name,)) > 0

    async def bind_host_identity(self, name: str, identity: str, now: float) -> str:
        def work(c: sqlite3.Connection) -> str:
            _tx(c, [("INSERT INTO host_identities (name, identity, bound_at) VALUES (?, ?, ?) "
                     "ON CONFLICT(name) DO NOTHING", (name, identity, now))])
            return str(c.execute("SELECT identity FROM host_identities WHERE name = ?",
                                 (name,)).fetchone()[0])

        return await self._run(work)

    async def get_host_identity(self, name: str) -> str | None:
        rows = await self.query("SELECT identity FROM host_identities WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def release_host_identity(self, name: str) -> bool:
        return await self.execute("DELETE FROM host_identities WHERE name = ?", (name,)) > 0

    # -- VMs -----------------------------------------------------------------------------

    async def put_vm(self, vm: VM) -> None:
        data = json.dumps(_asdict(vm))
        await self._run(lambda c: _tx(c, [
            ("INSERT INTO vms (name, host, data) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
             "SET host=excluded.host, data=excluded.data", (vm.name, vm.host, data)),
            ("UPDATE hosts SET generation = generation + 1 WHERE name = ?", (vm.host,))]))

    async def put_vm_if(self, vm: VM, state: str, host: str | None = None) -> bool:
        data = json.dumps(_asdict(vm))

        def work(c: sqlite3.Connection) -> bool:
            if c.execute("UPDATE vms SET host = ?, data = ? WHERE name = ? "
                         "AND json_extract(data, '$.state') = ? AND host = coalesce(?, host)",
                         (vm.host, data, vm.name, state, host)).rowcount == 0:
                return False
            c.execute("UPDATE hosts SET generation = generation + 1 WHERE name = ?", (vm.host,))
            return True

        return await self._run(lambda c: _in_tx(c, work))

    async def claim_vm(self, vm: VM, generation: int) -> Claim:
        data = json.dumps(_asdict(vm))

        def work(c: sqlite3.Connection) -> Claim:
            c.execute("BEGIN IMMEDIATE")
            try:
                outcome: Claim = "claimed"
                if c.execute("UPDATE hosts SET generation = generation + 1 WHERE name = ? "
                             "AND generation = ?", (vm.host, generation)).rowcount == 0:
                    outcome = "stale"
                elif c.execute("INSERT INTO vms (name, host, data) VALUES (?, ?, ?) "
                               "ON CONFLICT(name) DO NOTHING",
                               (vm.name, vm.host, data)).rowcount == 0:
                    outcome = "taken"
                c.execute("COMMIT" if outcome == "claimed" else "ROLLBACK")
                return outcome
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

        return await self._run(work)

    async def get_vm(self, name: str) -> VM | None:
        rows = await self.query("SELECT data FROM vms WHERE name = ?", (name,))
        return VM(**json.loads(rows[0][0])) if rows else None

    async def list_vms(self, host: str | None = None) -> list[VM]:
        params: tuple[str, ...] = ()
        if host is None:
            sql = "SELECT data FROM vms ORDER BY name"
        else:
            sql, params = "SELECT data FROM vms WHERE host = ? ORDER BY name", (host,)
        return await self._run(  # decoded on the store's thread, like list_hosts
            lambda c: [VM(**json.loads(r[0])) for r in c.execute(sql, params)])

    async def vm_summaries(self) -> list[VMSummary]:
        return await self._run(lambda c: [
            VMSummary(n, h, s or "", summary_int(cpus), summary_int(mem)) for n, h, s, cpus, mem in c.execute(
                "SELECT name, host, json_extract(data, '$.state'), json_extract(data, '$.spec.vcpus'), "
                "json_extract(data, '$.spec.memory_mb') FROM vms ORDER BY name")])

    async def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        def work(c: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
            hosts = dict(c.execute("SELECT state, COUNT(*) FROM hosts GROUP BY state"))
            vms = dict(c.execute("SELECT COALESCE(json_extract(data, '$.state'), ''), COUNT(*) "
                                 "FROM vms GROUP BY 1"))
            return hosts, vms

        return await self._run(work)

    async def vms_to_reconcile(self) -> dict[str, list[str]]:
        return await self._run(lambda c: group_sightings(c.execute(_TO_RECONCILE, (HOST_UP,))))

    async def delete_vm(self, name: str) -> bool:
        return await self.execute("DELETE FROM vms WHERE name = ?", (name,)) > 0

    # -- migrations ----------------------------------------------------------------------

    async def put_migration(self, mig: Migration) -> None:
        data = json.dumps(_asdict(mig))
        await self._run(lambda c: _tx(c, [(
            "INSERT INTO migrations (id, vm, phase, created_at, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET phase=excluded.phase, data=excluded.data",
            (mig.id, mig.vm, mig.phase, mig.created_at, data))]))

    async def get_migration(self, mig_id: str) -> Migration | None:
        rows = await self.query("SELECT data FROM migrations WHERE id = ?", (mig_id,))
        return Migration(**json.loads(rows[0][0])) if rows else None

    async def list_migrations(self, vm: str | None = None, limit: int = 100) -> list[Migration]:
        if vm is None:
            rows = await self.query(
                "SELECT data FROM migrations ORDER BY created_at DESC, id LIMIT ?", (limit,))
        else:
            rows = await self.query(
                "SELECT data FROM migrations WHERE vm = ? ORDER BY created_at DESC, id LIMIT ?",
                (vm, limit))
        return [Migration(**json.loads(r[0])) for r in rows]

    async def active_migrations(self) -> list[Migration]:
        marks = ",".join("?" * len(MIGRATION_TERMINAL))
        rows = await self.query(
            f"SELECT data FROM migrations WHERE phase NOT IN ({marks}) ORDER BY created_at",
            tuple(sorted(MIGRATION_TERMINAL)))
        return [Migration(**json.loads(r[0])) for r in rows]

    # -- leases --------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        def work(c: sqlite3.Connection) -> int | None:
            now = time.time()
            row = c.execute(
                "INSERT INTO leases (name, holder, token, expires_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, "
                "token = CASE WHEN leases.holder = excluded.holder THEN leases.token "
                "ELSE leases.token + 1 END, expires_at = excluded.expires_at "
                "WHERE leases.holder = excluded.holder OR leases.expires_at <= ? "
                "RETURNING token", (name, holder, now + ttl_s, now)).fetchone()
            return int(row[0]) if row else None

        return await self._run(lambda c: _in_tx(c, work))

    async def release_lease(self, name: str, holder: str) -> None:
        await self.execute("UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ?",
                           (time.time(), name, holder))

    # -- documents -----------------------------------------------------------------------

    async def put_doc(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc)
        await self._run(lambda c: _tx(c, [(
            "INSERT INTO documents (collection, key, data, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(collection, key) DO UPDATE SET data=excluded.data, "
            "updated_at=excluded.updated_at", (collection, key, data, time.time()))]))

    async def get_doc(self, collection: str, key: str) -> dict[str, Any] | None:
        rows = await self.query(
            "SELECT data FROM documents WHERE collection = ? AND key = ?", (collection, key))
        return json.loads(rows[0][0]) if rows else None

    async def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        rows = await self.query(
            "SELECT key, data FROM documents WHERE collection = ? ORDER BY key", (collection,))
        return [(str(k), json.loads(d)) for k, d in rows]

    async def delete_doc(self, collection: str, key: str) -> bool:
        return await self.execute(
            "DELETE FROM documents WHERE collection = ? AND key = ?", (collection, key)) > 0

    # -- raw -----------------------------------------------------------------------------

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return await self._run(lambda c: _tx(c, [(sql, params)]))

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await self._run(lambda c: c.execute(sql, params).fetchall())


def _host(data: str, generation: int) -> Host:
    return Host(**json.loads(data), generation=int(generation))


def _asdict(record: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(record)


# seen: (VM, up host whose last heartbeat listed it); odd: VMs creating, migrating, or
# seen on a host other than their record's
_TO_RECONCILE = """
WITH seen AS (SELECT j.value AS vm, h.name AS host FROM hosts h, json_each(h.data, '$.vms') j
              WHERE h.state = ? AND json_type(h.data, '$.vms') = 'array'),
     odd AS (SELECT name FROM vms WHERE json_extract(data, '$.state') IN ('creating', 'migrating')
             UNION SELECT s.vm FROM seen s JOIN vms v ON v.name = s.vm WHERE s.host != v.host)
SELECT odd.name, seen.host FROM odd LEFT JOIN seen ON seen.vm = odd.name ORDER BY odd.name, seen.host
"""


# the batch: a JSON array of [name, time, patch]; json_extract of the patch object is its text
_HEARTBEATS = """
UPDATE hosts SET state = ?1, last_heartbeat = u.at, data = json_patch(hosts.data, u.patch)
FROM (SELECT json_extract(value, '$[0]') AS name, json_extract(value, '$[1]') AS at,
             json_extract(value, '$[2]') AS patch FROM json_each(?2)) AS u
WHERE hosts.name = u.name
"""


def _heartbeat_batch(conn: sqlite3.Connection,
                     items: list[tuple[str, dict[str, Any], float]]) -> set[str]:
    """Apply heartbeats in one transaction; the names of the registered hosts among them.

    One statement for the whole batch, the records patched by SQLite (``json_patch``): it
    runs in C with the GIL released once. Decoding and re-encoding each record here, or a
    statement per host (the GIL taken back after every row), left this thread waiting on
    the event loop for the GIL at thousands of heartbeats a second."""
    latest = newest_heartbeats(items)
    batch = json.dumps([[name, now, {**fields, "state": HOST_UP, "last_heartbeat": now}]
                        for name, (fields, now) in latest.items()])
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = conn.total_changes
        conn.execute(_HEARTBEATS, (HOST_UP, batch))
        if conn.total_changes - before == len(latest):
            known = set(latest)
        else:  # some are not registered (or were forgotten): which
            names = list(latest)
            known = set()
            for i in range(0, len(names), 500):
                chunk = names[i:i + 500]
                known.update(n for (n,) in conn.execute(
                    f"SELECT name FROM hosts WHERE name IN ({','.join('?' * len(chunk))})", chunk))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return known


def _in_tx(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _tx(conn: sqlite3.Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
    """Run statements in one transaction; return the total affected row count."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        count = 0
        for sql, params in statements:
            count += conn.execute(sql, params).rowcount
        conn.execute("COMMIT")
        return count
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> list[str]:
    """Bring every registered component to its latest version; return what was applied.

    Several processes may open one database at once; a lock file beside it lets one
    migrate while the others wait and then find nothing left to do (executescript
    commits on its own, so a transaction alone cannot hold the versions read)."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:  # in memory: nobody else can see it
        return _migrate_locked(conn)
    fd = os.open(path + ".migrate-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Switching a new database to WAL needs an exclusive lock, and SQLite answers "database
        # is locked" without waiting when another connection switches at the same moment
        # (coordinators starting at once): so the switch happens under the same file lock.
        conn.execute("PRAGMA journal_mode=WAL")
        return _migrate_locked(conn)
    finally:
        os.close(fd)  # releases the lock


def _migrate_locked(conn: sqlite3.Connection) -> list[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (component TEXT NOT NULL, "
        "version INTEGER NOT NULL, applied_at REAL NOT NULL, PRIMARY KEY (component, version))")
    applied: list[str] = []
    for component, steps in schema.MIGRATIONS.items():
        row = conn.execute(
            "SELECT MAX(version) FROM schema_version WHERE component = ?", (component,)).fetchone()
        current = int(row[0] or 0)
        if current > len(steps):
            raise RuntimeError(
                f"database schema of {component!r} is version {current}, newer than this "
                f"coordinator knows ({len(steps)}); upgrade the coordinator")
        for version in range(current + 1, len(steps) + 1):
            # executescript commits on its own, so the step and its record go in one script.
            try:
                conn.executescript(
                    "BEGIN IMMEDIATE;\n" + steps[version - 1].strip().rstrip(";") + ";\n"
                    f"INSERT INTO schema_version VALUES ('{_sql_ident(component)}', {version}, "
                    f"{time.time()});\nCOMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            applied.append(f"{component}:{version}")
    return applied


def _sql_ident(name: str) -> str:
    if not name.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"bad schema component name {name!r}")
    return name
