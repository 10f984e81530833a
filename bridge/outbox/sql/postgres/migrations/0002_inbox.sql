-- The inbox: one row per accepted batch, written before the 200. BIGSERIAL is not commit
-- ordered across replicas: the sequencer takes the oldest WAITING rows, never "seq > x".
CREATE TABLE IF NOT EXISTS inbox (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    received_at DOUBLE PRECISION NOT NULL,
    items INTEGER NOT NULL,
    body BYTEA NOT NULL,
    status TEXT NOT NULL DEFAULT 'waiting',
    deliveries INTEGER,
    duplicates INTEGER,
    error TEXT,
    summary TEXT,
    sequenced_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS inbox_waiting ON inbox (seq) WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS inbox_settled ON inbox (sequenced_at) WHERE status <> 'waiting';
-- The same settled-rows index as SQLite's, instead of one over every row.
DROP INDEX IF EXISTS deliveries_by_status;
CREATE INDEX IF NOT EXISTS deliveries_settled
    ON deliveries (status, updated_at) WHERE status <> 'pending';
-- "state" is for shipments now: what a sink remembers (a Slack thread) is its memory.
ALTER TABLE sink_state RENAME TO sink_memory;
