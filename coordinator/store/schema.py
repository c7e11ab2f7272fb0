"""Numbered schema migrations per component, applied in order at open time.

The SQLite store's schema (PostgreSQL's core schema is ``pg_migrations/*.sql``;
other components apply to both). ``MIGRATIONS[component]`` is a list of SQL scripts; step *n* (1-based) brings
the component to version *n*. Applied versions live in ``schema_version``.
Append steps; never change one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: dict[str, list[str]] = {
    "core": [
        # v1: the fleet. Records are JSON documents; indexed columns are copies
        # of the fields we filter on.
        """
        CREATE TABLE hosts (
            name TEXT PRIMARY KEY, state TEXT NOT NULL, last_heartbeat REAL NOT NULL,
            data TEXT NOT NULL);
        CREATE TABLE vms (
            name TEXT PRIMARY KEY, host TEXT NOT NULL, data TEXT NOT NULL);
        CREATE TABLE migrations (
            id TEXT PRIMARY KEY, vm TEXT NOT NULL, phase TEXT NOT NULL,
            created_at REAL NOT NULL, data TEXT NOT NULL);
        """,
        # v2: lookups by host, by VM and of unfinished migrations.
        """
        CREATE INDEX vms_host ON vms (host);
        CREATE INDEX migrations_vm ON migrations (vm, created_at);
        CREATE INDEX migrations_phase ON migrations (phase);
        """,
        # v3: feature documents (see novacron.coordinator.store).
        """
        CREATE TABLE documents (
            collection TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY (collection, key));
        """,
        # v4: placement claims (Store.claim_vm) and leases (Store.acquire_lease), as in
        # PostgreSQL's pg_migrations/0001_init.sql.
        """
        ALTER TABLE hosts ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE leases (
            name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL,
            expires_at REAL NOT NULL);
        """,
    ],
    # One identity per host name: the first registration binds the name to the agent's
    # credential ("cert:<CN>" or "token:<sha256>"); only an admin's retire releases it.
    "identity": [
        """
        CREATE TABLE host_identities (
            name TEXT PRIMARY KEY, identity TEXT NOT NULL, bound_at DOUBLE PRECISION NOT NULL);
        """,
    ],
}


def register(component: str, steps: list[str]) -> None:
    """Declare ``component``'s migrations (call at import time, before the store opens)."""
    if component in MIGRATIONS and MIGRATIONS[component] != steps:
        raise ValueError(f"schema component {component!r} is already registered differently")
    MIGRATIONS[component] = list(steps)
