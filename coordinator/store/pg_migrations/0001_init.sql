-- The fleet, as in the SQLite store: each record is a JSON document; indexed
-- columns are copies of the fields we filter on. Add columns in new files
-- (0002_....sql); never edit a file that has shipped.
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL,
    -- bumped by every change to what is placed on the host: placement claims
    -- compare it (optimistic concurrency between coordinators)
    generation BIGINT NOT NULL DEFAULT 0,
    data JSONB NOT NULL);
CREATE INDEX hosts_up_by_heartbeat ON hosts (last_heartbeat) WHERE state = 'up';

CREATE TABLE vms (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    data JSONB NOT NULL);
CREATE INDEX vms_host ON vms (host);

CREATE TABLE migrations (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    phase TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    data JSONB NOT NULL);
CREATE INDEX migrations_vm ON migrations (vm, created_at);
CREATE INDEX migrations_active ON migrations (created_at)
    WHERE phase NOT IN ('completed', 'failed', 'cancelled');

CREATE TABLE documents (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    data JSONB NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (collection, key));

-- Once-per-fleet loops: one holder per name until expires_at (database clock);
-- token grows with every change of holder (fencing).
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL);
