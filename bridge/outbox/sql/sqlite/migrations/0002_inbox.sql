-- The inbox: one row per accepted batch, written before the 200; the sequencer routes it
-- afterwards. `seq` is the acceptance order (one writer commits them in that order).
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    items INTEGER NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'waiting',
    deliveries INTEGER,
    duplicates INTEGER,
    error TEXT,
    summary TEXT,
    sequenced_at REAL
);
CREATE INDEX IF NOT EXISTS inbox_waiting ON inbox (seq) WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS inbox_settled ON inbox (sequenced_at) WHERE status <> 'waiting';
-- "state" is for shipments now: what a sink remembers (a Slack thread) is its memory.
ALTER TABLE sink_state RENAME TO sink_memory;
