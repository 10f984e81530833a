-- The schema of isendu-bridge 0.1.0 (commit 29d60bf), as its SQLite store made it:
-- frozen here so that upgrades are tested on what that release really wrote.
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sink TEXT NOT NULL,
    route TEXT NOT NULL,
    item_uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    batch_id TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    group_key TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (sink, next_attempt_at, seq) WHERE status = 'pending';
-- Settled rows only (dead-letter list, sweep): a pending row pays for no entry here, which
-- keeps one index update off every intake. Pending rows are counted through deliveries_due.
-- Queries repeat `status <> 'pending'` word for word: only then does SQLite use this index.
DROP INDEX IF EXISTS deliveries_by_status;
CREATE INDEX IF NOT EXISTS deliveries_settled
    ON deliveries (status, updated_at) WHERE status <> 'pending';
CREATE INDEX IF NOT EXISTS deliveries_groups
    ON deliveries (sink, group_key, seq) WHERE status = 'pending' AND group_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS sink_state (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
PRAGMA user_version = 1;
