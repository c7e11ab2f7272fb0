"""PostgreSQL storage: the one source of truth for any number of coordinators.

asyncpg with a small connection pool. Records are JSONB documents with the
filtered fields copied into columns, as in the SQLite store. The schema is the
numbered files in ``pg_migrations/`` (component ``core``) plus the components
features register in ``schema.MIGRATIONS``; coordinators starting at once apply
them one at a time under an advisory lock.

What makes several coordinators safe: placement claims compare a host's
``generation`` in the transaction that inserts the VM (``claim_vm``);
once-per-fleet loops hold a row in ``leases`` (database clock, fencing token);
``notify``/``listen`` carry events between coordinators (LISTEN/NOTIFY).
Heartbeats arriving together are applied by one ``UPDATE ... FROM unnest(...)``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from importlib import resources
from typing import Any

import asyncpg

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
    Listener,
    Store,
    group_sightings,
    newest_heartbeats,
    schema,
)

log = logging.getLogger("novacron.coordinator.store")

# pg_advisory_lock key serialising schema migrations ("NovaCron" in ASCII).
MIGRATION_LOCK = 0x4E6F766143726F6E
# NOTIFY payloads must stay below 8000 bytes.
MAX_NOTIFY_BYTES = 7900
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def core_migrations() -> list[str]:
    """The SQL files of pg_migrations/, in order; file NNNN is version NNNN."""
    folder = resources.files("novacron.coordinator.store") / "pg_migrations"
    files = sorted((f.name, f) for f in folder.iterdir() if _FILE.match(f.name))
    steps = []
    for i, (name, f) in enumerate(files, start=1):
        if int(name[:4]) != i:
            raise RuntimeError(f"pg_migrations: expected file {i:04d}_*.sql, found {name}")
        steps.append(f.read_text())
    return steps


def placeholders(sql: str) -> str:
    """``?`` -> ``$1, $2 ...`` outside quoted text (the Store's raw SQL uses ``?``)."""
    out, n, quote = [], 0, ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(ch)
    return "".join(out)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class PostgresStore(Store):
    def __init__(self, dsn: str, *, pool_size: int = 10) -> None:
        self.dsn, self.pool_size = dsn, pool_size
        self._pool: asyncpg.Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listeners: dict[str, list[Listener]] = {}
        self.heartbeats = HeartbeatBatcher(self._write_heartbeats)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size,
                                               init=_init_connection)
        async with self.pool.acquire() as conn:
            applied = await _migrate(conn)
        if applied:
            log.info("schema migrated", extra={"applied": applied})

    async def close(self) -> None:
        await self.heartbeats.close()
        if self._listen_conn is not None:
            await self._listen_conn.close()
            self._listen_conn = None
        self._listeners.clear()
        if self._pool is not None:
            await self._pool.close()
        self._pool = None

    async def schema_versions(self) -> dict[str, int]:
        rows = await self.query("SELECT component, MAX(version) FROM schema_version GROUP BY component")
        return {str(c): int(v) for c, v in rows}

    # -- hosts ---------------------------------------------------------------------------

    async def put_host(self, host: Host) -> None:
        await self.pool.execute(
            "INSERT INTO hosts (name, state, last_heartbeat, data) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
            "last_heartbeat = excluded.last_heartbeat, data = excluded.data, "
            "generation = hosts.generation + 1",
            host.name, host.state, host.last_heartbeat, host.record())

    async def get_host(self, name: str) -> Host | None:
        await self.heartbeats.settled()  # this coordinator's heartbeats are read back
        row = await self.pool.fetchrow("SELECT data, generation FROM hosts WHERE name = $1", name)
        return _host(row) if row else None

    async def list_hosts(self) -> list[Host]:
        await self.heartbeats.settled()
        rows = await self.pool.fetch("SELECT data, generation FROM hosts ORDER BY name")
        return [_host(r) for r in rows]

    async def _write_heartbeats(self, items: list[tuple[str, dict[str, Any], float]]) -> set[str]:
        latest = newest_heartbeats(items)  # newest wins
        rows = await self.pool.fetch(
            "UPDATE hosts AS h SET state = $4, last_heartbeat = u.at, "
            "data = h.data || u.fields || jsonb_build_object('state', $4::text, "
            "'last_heartbeat', u.at) "
            "FROM unnest($1::text[], $2::jsonb[], $3::float8[]) AS u(name, fields, at) "
            "WHERE h.name = u.name RETURNING h.name",  # names only: no record decoded on the loop
            list(latest), [f for f, _ in latest.values()], [t for _, t in latest.values()],
            HOST_UP)
        return {r["name"] for r in rows}

    async def mark_down(self, older_than: float, fence: tuple[str, str, int] | None = None,
                        ) -> list[str]:
        lease, holder, token = fence if fence else ("", "", 0)
        rows = await self.pool.fetch(
            "UPDATE hosts SET state = $1, data = data || jsonb_build_object('state', $1::text) "
            "WHERE state = $2 AND last_heartbeat < $3 AND ($4 = '' OR EXISTS ("
            "  SELECT 1 FROM leases WHERE name = $4 AND holder = $5 AND token = $6 "
            "  AND expires_at > now())) RETURNING name",
            HOST_DOWN, HOST_UP, older_than, lease, holder, token)
        return sorted(r["name"] for r in rows)

    async def delete_host(self, name: str) -> bool:
        return await self.execute("DELETE FROM hosts WHERE name = ?", (name,)) > 0

    # -- VMs -----------------------------------------------------------------------------

    async def put_vm(self, vm: VM) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO vms (name, host, data) VALUES ($1, $2, $3) ON CONFLICT (name) "
                "DO UPDATE SET host = excluded.host, data = excluded.data",
                vm.name, vm.host, _asdict(vm))
            await conn.execute("UPDATE hosts SET generation = generation + 1 WHERE name = $1",
                               vm.host)

    async def put_vm_if(self, vm: VM, state: str, host: str | None = None) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "UPDATE vms SET host = $2, data = $3 WHERE name = $1 AND data->>'state' = $4 "
                "AND host = coalesce($5::text, host) RETURNING 1",
                vm.name, vm.host, _asdict(vm), state, host)
            if done is None:
                return False
            await conn.execute("UPDATE hosts SET generation = generation + 1 WHERE name = $1",
                               vm.host)
        return True

    async def claim_vm(self, vm: VM, generation: int) -> Claim:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # The row lock taken here holds a concurrent claim on this host until we
                # commit; it then finds the generation moved and places again.
                bumped = await conn.fetchval(
                    "UPDATE hosts SET generation = generation + 1 WHERE name = $1 "
                    "AND generation = $2 RETURNING generation", vm.host, generation)
                if bumped is None:
                    return "stale"
                inserted = await conn.fetchval(
                    "INSERT INTO vms (name, host, data) VALUES ($1, $2, $3) "
                    "ON CONFLICT (name) DO NOTHING RETURNING 1", vm.name, vm.host, _asdict(vm))
                if inserted is None:
                    raise _Taken  # rolls the bump back too: nothing changed on the host
        except _Taken:
            return "taken"
        return "claimed"

    async def get_vm(self, name: str) -> VM | None:
        row = await self.pool.fetchrow("SELECT data FROM vms WHERE name = $1", name)
        return VM(**row["data"]) if row else None

    async def list_vms(self, host: str | None = None) -> list[VM]:
        if host is None:
            rows = await self.pool.fetch("SELECT data FROM vms ORDER BY name")
        else:
            rows = await self.pool.fetch("SELECT data FROM vms WHERE host = $1 ORDER BY name", host)
        return [VM(**r["data"]) for r in rows]

    async def vm_summaries(self) -> list[VMSummary]:
        rows = await self.pool.fetch(
            "SELECT name, host, data->>'state', data->'spec'->>'vcpus', data->'spec'->>'memory_mb' "
            "FROM vms ORDER BY name")
        return [VMSummary(n, h, s or "", summary_int(cpus), summary_int(mem)) for n, h, s, cpus, mem in rows]

    async def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        hosts = await self.pool.fetch("SELECT state, COUNT(*) FROM hosts GROUP BY state")
        vms = await self.pool.fetch("SELECT COALESCE(data->>'state', ''), COUNT(*) FROM vms GROUP BY 1")
        return {s: int(n) for s, n in hosts}, {s: int(n) for s, n in vms}

    async def vms_to_reconcile(self) -> dict[str, list[str]]:
        # seen: (VM, up host whose last heartbeat listed it); odd: VMs creating, migrating,
        # or seen on a host other than their record's
        rows = await self.pool.fetch(
            "WITH seen AS (SELECT j.vm, h.name AS host FROM hosts h, "
            "                jsonb_array_elements_text(CASE WHEN jsonb_typeof(h.data->'vms') = 'array' "
            "                  THEN h.data->'vms' ELSE '[]'::jsonb END) AS j(vm) WHERE h.state = $1), "
            "odd AS (SELECT name FROM vms WHERE data->>'state' IN ('creating', 'migrating') "
            "        UNION SELECT s.vm FROM seen s JOIN vms v ON v.name = s.vm WHERE s.host <> v.host) "
            "SELECT odd.name, seen.host FROM odd LEFT JOIN seen ON seen.vm = odd.name "
            "ORDER BY odd.name, seen.host", HOST_UP)
        return group_sightings((r[0], r[1]) for r in rows)

    async def delete_vm(self, name: str) -> bool:
        return await self.execute("DELETE FROM vms WHERE name = ?", (name,)) > 0

    # -- migrations ----------------------------------------------------------------------

    async def put_migration(self, mig: Migration) -> None:
        await self.pool.execute(
            "INSERT INTO migrations (id, vm, phase, created_at, data) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (id) DO UPDATE SET phase = excluded.phase, data = excluded.data",
            mig.id, mig.vm, mig.phase, mig.created_at, _asdict(mig))

    async def get_migration(self, mig_id: str) -> Migration | None:
        row = await self.pool.fetchrow("SELECT data FROM migrations WHERE id = $1", mig_id)
        return Migration(**row["data"]) if row else None

    async def list_migrations(self, vm: str | None = None, limit: int = 100) -> list[Migration]:
        if vm is None:
            rows = await self.pool.fetch(
                "SELECT data FROM migrations ORDER BY created_at DESC, id LIMIT $1", limit)
        else:
            rows = await self.pool.fetch(
                "SELECT data FROM migrations WHERE vm = $1 ORDER BY created_at DESC, id LIMIT $2",
                vm, limit)
        return [Migration(**r["data"]) for r in rows]

    async def active_migrations(self) -> list[Migration]:
        rows = await self.pool.fetch(
            "SELECT data FROM migrations WHERE phase <> ALL($1::text[]) ORDER BY created_at",
            sorted(MIGRATION_TERMINAL))
        return [Migration(**r["data"]) for r in rows]

    # -- documents -----------------------------------------------------------------------

    async def put_doc(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO documents (collection, key, data, updated_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (collection, key) DO UPDATE SET data = excluded.data, "
            "updated_at = excluded.updated_at", collection, key, doc, time.time())

    async def get_doc(self, collection: str, key: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT data FROM documents WHERE collection = $1 AND key = $2", collection, key)
        return dict(row["data"]) if row else None

    async def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        rows = await self.pool.fetch(
            "SELECT key, data FROM documents WHERE collection = $1 ORDER BY key", collection)
        return [(str(r["key"]), dict(r["data"])) for r in rows]

    async def delete_doc(self, collection: str, key: str) -> bool:
        return await self.execute(
            "DELETE FROM documents WHERE collection = ? AND key = ?", (collection, key)) > 0

    # -- leases --------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        token = await self.pool.fetchval(
            "INSERT INTO leases (name, holder, token, expires_at) "
            "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "token = CASE WHEN leases.holder = excluded.holder THEN leases.token "
            "ELSE leases.token + 1 END, expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at <= now() "
            "RETURNING token", name, holder, float(ttl_s))
        return int(token) if token is not None else None

    async def release_lease(self, name: str, holder: str) -> None:
        await self.pool.execute(
            "UPDATE leases SET expires_at = now() WHERE name = $1 AND holder = $2", name, holder)

    # -- notifications -------------------------------------------------------------------

    async def notify(self, channel: str, payload: str) -> bool:
        if len(payload.encode()) > MAX_NOTIFY_BYTES:
            log.warning("notification too large to send; listeners re-read instead",
                        extra={"channel": channel, "bytes": len(payload.encode())})
            return False
        await self.pool.execute("SELECT pg_notify($1, $2)", channel, payload)
        return True

    async def listen(self, channel: str, callback: Listener) -> bool:
        # One connection outside the pool holds every LISTEN of this store.
        if self._listen_conn is None:
            self._listen_conn = await asyncpg.connect(self.dsn)
        if channel not in self._listeners:
            self._listeners[channel] = []
            await self._listen_conn.add_listener(channel, self._dispatch)
        self._listeners[channel].append(callback)
        return True

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in list(self._listeners.get(channel, ())):
            try:
                callback(channel, payload)
            except Exception:
                log.exception("notification listener failed", extra={"channel": channel})

    # -- host identities -----------------------------------------------------------------

    async def bind_host_identity(self, name: str, identity: str, now: float) -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO host_identities (name, identity, bound_at) "
                               "VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                               name, identity, now)
            return str(await conn.fetchval("SELECT identity FROM host_identities WHERE name = $1",
                                           name))

    async def get_host_identity(self, name: str) -> str | None:
        value = await self.pool.fetchval("SELECT identity FROM host_identities WHERE name = $1", name)
        return None if value is None else str(value)

    async def release_host_identity(self, name: str) -> bool:
        return await self.execute("DELETE FROM host_identities WHERE name = ?", (name,)) > 0

    # -- raw -----------------------------------------------------------------------------

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        status = await self.pool.execute(placeholders(sql), *params)
        last = status.rsplit(" ", 1)[-1]  # "INSERT 0 1", "UPDATE 3", "CREATE TABLE"
        return int(last) if last.isdigit() else 0

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.pool.fetch(placeholders(sql), *params)]


class _Taken(Exception):
    """Raised inside claim_vm's transaction to roll it back."""


def _host(row: Any) -> Host:
    return Host(**row["data"], generation=int(row["generation"]))


def _asdict(record: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(record)


async def _migrate(conn: asyncpg.Connection) -> list[str]:
    """Bring every component to its latest version, one coordinator at a time."""
    components = {"core": core_migrations(),
                  **{c: s for c, s in schema.MIGRATIONS.items() if c != "core"}}
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (component TEXT NOT NULL, "
            "version INTEGER NOT NULL, applied_at DOUBLE PRECISION NOT NULL, "
            "PRIMARY KEY (component, version))")
        applied: list[str] = []
        for component, steps in components.items():
            current = int(await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version WHERE component = $1",
                component))
            if current > len(steps):
                raise RuntimeError(
                    f"database schema of {component!r} is version {current}, newer than this "
                    f"coordinator knows ({len(steps)}); upgrade the coordinator")
            for version in range(current + 1, len(steps) + 1):
                async with conn.transaction():  # PostgreSQL DDL is transactional
                    await conn.execute(steps[version - 1])
                    await conn.execute("INSERT INTO schema_version VALUES ($1, $2, $3)",
                                       component, version, time.time())
                applied.append(f"{component}:{version}")
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
