-- SQLite queries, one named block each (loaded by bridge/outbox/sql/__init__.py).
-- Delivery ids of the form dlv_<32 hex> are stored as their 16 bytes (sqlite.py stored_id).

-- ---- outbox ------------------------------------------------------------------------------

-- name: insert_deliveries
-- One VALUES group; sqlite.py repeats it for up to INSERT_ROWS rows per statement.
INSERT OR IGNORE INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload,
    status, next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key,
    holds_item)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)

-- name: last_stored
-- When the newest delivery was stored (sqlite.py keeps later ones from being stored earlier).
SELECT enqueued_at FROM deliveries ORDER BY seq DESC LIMIT 1

-- name: clock_went_back
-- The clock went back further than CLOCK_STEP (sqlite.py): the rows stored on the clock
-- that was ahead are moved back by how far the newest of them was ahead, keeping their
-- order and their waits. enqueued_at moves too: max_age counts from when they were really
-- stored, and once moved no row is ahead any more, so this is done once (a restart, or a
-- `bridge dlq replay` beside `serve`, finds nothing to move). Rows stored since, and the
-- leases of sends in flight, are left as they are.
UPDATE deliveries SET next_attempt_at = next_attempt_at - :step,
    enqueued_at = enqueued_at - :step, updated_at = updated_at - :step
WHERE enqueued_at > :now

-- name: claim
-- Per-shipment order: a delivery waits while an earlier one (lower seq) of its item for
-- this sink is pending, in flight, waiting for a retry or not yet due. Those that can be in
-- the way are marked (holds_item, indexed by deliveries_holding, migration 0006): claimed
-- ones until settled, replayed ones, ones stored not yet due. An unmarked earlier one is
-- due and unleased, and due no later than this one (sqlite.py stores them in seq order with
-- times that never go back): it comes first among the candidates, and of each item only the
-- first candidate is taken.
-- A coalescing window (group_key 'coalesce:...') takes its place in that order as one
-- delivery, at its last member (the change its message is rendered from): only that member
-- is a candidate (claim_group brings the others), and only while no other member of its
-- window is in flight (a change stored after its window was claimed waits for that send).
-- It waits like any other; its members are marked when stored, and from the window's close
-- on (its last member due, or any member claimed or tried) it holds back its item's later
-- deliveries until it is
-- settled. A member that is not its window's last holds nothing back: a window never waits
-- for a delivery that waits for it. Deliveries made while a window is open are not held
-- by it: they go as they fall due.
-- Digest members neither wait nor hold back: a digest goes out when its window closes.
UPDATE deliveries SET attempts = attempts + 1, lease_until = :lease_until, updated_at = :now,
    holds_item = CASE WHEN group_key IS NULL OR group_key GLOB 'coalesce:*' THEN 1 END
WHERE seq IN (
    SELECT MIN(seq) FROM (
        SELECT d.seq, d.item_uuid, d.group_key, d.next_attempt_at FROM deliveries AS d
        WHERE d.status = 'pending' AND d.sink = :sink
        AND d.next_attempt_at <= :now AND (d.lease_until IS NULL OR d.lease_until <= :now)
        AND (d.group_key IS NOT NULL AND d.group_key NOT GLOB 'coalesce:*'  -- a digest's
            OR (d.group_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM deliveries AS f WHERE f.status = 'pending' AND f.sink = d.sink
                AND f.group_key = d.group_key AND (f.seq > d.seq OR f.lease_until > :now)))
            AND NOT EXISTS (
                SELECT 1 FROM deliveries AS e WHERE e.status = 'pending' AND e.holds_item = 1
                AND e.item_uuid = d.item_uuid AND e.sink = d.sink AND e.seq < d.seq
                AND (e.group_key IS NULL OR e.group_key IS NOT d.group_key
                     AND (e.next_attempt_at <= :now OR EXISTS (  -- closed: due, or tried
                         SELECT 1 FROM deliveries AS g WHERE g.status = 'pending'
                         AND g.sink = e.sink AND g.group_key = e.group_key
                         AND (g.lease_until IS NOT NULL OR g.last_error IS NOT NULL)))
                     AND NOT EXISTS (
                         SELECT 1 FROM deliveries AS f WHERE f.status = 'pending'
                         AND f.sink = e.sink AND f.group_key = e.group_key AND f.seq > e.seq))))
        ORDER BY d.next_attempt_at, d.seq LIMIT 4 * :limit) AS candidates
    -- One per item, `limit` at most, the first ones: the dispatcher claims again at once
    -- only after a full claim, and an item often has several deliveries due together.
    GROUP BY item_uuid, CASE WHEN group_key IS NULL OR group_key GLOB 'coalesce:*' THEN NULL
                             ELSE seq END
    ORDER BY MIN(next_attempt_at), MIN(seq) LIMIT :limit)
RETURNING id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until, seq

-- name: claim_group
UPDATE deliveries SET attempts = attempts + 1, lease_until = :lease_until, updated_at = :now
WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = :sink
              AND group_key = :group_key AND (lease_until IS NULL OR lease_until <= :now)
              ORDER BY seq LIMIT :limit)
RETURNING id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until, seq

-- name: complete
UPDATE deliveries SET status = 'delivered', lease_until = NULL, last_error = NULL,
    updated_at = ? WHERE id = ?

-- name: retry_at
UPDATE deliveries SET next_attempt_at = :when, last_error = :error, lease_until = NULL,
    updated_at = :now, attempts = MAX(attempts - :refund, 0)
WHERE id = :id AND status = 'pending'

-- name: dead_letter
UPDATE deliveries SET status = 'dead', last_error = ?, lease_until = NULL, updated_at = ?
WHERE id = ?

-- name: release
UPDATE deliveries SET attempts = MAX(attempts - 1, 0), lease_until = NULL
WHERE id = ? AND status = 'pending' AND lease_until = ?

-- name: release_every_lease
-- At start, holding the file's lock: any lease left is from a process of ours that died.
UPDATE deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL

-- name: next_due
-- The earliest of: when the first unleased delivery that no earlier one of its item holds
-- back becomes due (in the order of deliveries_due: the check runs for few rows), and when
-- a lease runs out (a scan, as ever). A leased delivery was its item's earliest pending
-- when claimed; only a replay can put one before it, and that one is due itself. So no
-- check there, where it would run for every pending row the scan passes.
SELECT MIN(t) FROM (
    SELECT * FROM (
        SELECT d.next_attempt_at AS t FROM deliveries AS d
        WHERE d.status = 'pending' AND d.sink = :sink
        AND (d.lease_until IS NULL OR d.lease_until <= d.next_attempt_at)
        AND (d.group_key IS NOT NULL AND d.group_key NOT GLOB 'coalesce:*'  -- as in claim,
            OR (d.group_key IS NULL OR NOT EXISTS (  -- at the time d falls due
                SELECT 1 FROM deliveries AS f WHERE f.status = 'pending' AND f.sink = d.sink
                AND f.group_key = d.group_key
                AND (f.seq > d.seq OR f.lease_until > d.next_attempt_at)))
            AND NOT EXISTS (
                SELECT 1 FROM deliveries AS e WHERE e.status = 'pending' AND e.holds_item = 1
                AND e.item_uuid = d.item_uuid AND e.sink = d.sink AND e.seq < d.seq
                AND (e.group_key IS NULL OR e.group_key IS NOT d.group_key
                     AND (e.next_attempt_at <= d.next_attempt_at OR EXISTS (
                         SELECT 1 FROM deliveries AS g WHERE g.status = 'pending'
                         AND g.sink = e.sink AND g.group_key = e.group_key
                         AND (g.lease_until IS NOT NULL OR g.last_error IS NOT NULL)))
                     AND NOT EXISTS (
                         SELECT 1 FROM deliveries AS f WHERE f.status = 'pending'
                         AND f.sink = e.sink AND f.group_key = e.group_key AND f.seq > e.seq))))
        ORDER BY d.next_attempt_at, d.seq LIMIT 1) AS unleased
    UNION ALL
    SELECT MIN(lease_until) FROM deliveries
    WHERE status = 'pending' AND sink = :sink AND lease_until > next_attempt_at
) AS candidates

-- name: get_delivery
SELECT id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until
FROM deliveries WHERE id = ?

-- name: list_dead
SELECT id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until
FROM deliveries WHERE status = 'dead' AND status <> 'pending'
ORDER BY updated_at DESC, seq DESC LIMIT ?

-- name: replay_all
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now,
    enqueued_at = :now, lease_until = NULL, updated_at = :now,
    holds_item = CASE WHEN group_key IS NULL OR group_key GLOB 'coalesce:*' THEN 1 END
WHERE status = 'dead' AND status <> 'pending' AND payload NOT IN (char(1), '{}')

-- name: replay_one
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now,
    enqueued_at = :now, lease_until = NULL, updated_at = :now,
    holds_item = CASE WHEN group_key IS NULL OR group_key GLOB 'coalesce:*' THEN 1 END
WHERE status = 'dead' AND status <> 'pending' AND id = :id
    AND payload NOT IN (char(1), '{}')

-- name: revive_unrendered
-- A rerouted batch's delivery stored dead because its template failed takes its new
-- rendering and is pending again, first for its shipment as a replayed dead letter is.
-- Nothing rendered: char(1) is the packed empty payload, '{}' an older release's. The
-- replays above leave such deliveries dead: there is nothing to send.
UPDATE deliveries SET payload = :payload, status = 'pending', attempts = 0,
    next_attempt_at = :due, enqueued_at = :now, updated_at = :now, last_error = NULL,
    lease_until = NULL, group_key = :group_key,
    holds_item = CASE WHEN :group_key IS NULL OR :group_key GLOB 'coalesce:*' THEN 1 END
WHERE id = :id AND status = 'dead' AND payload IN (char(1), '{}')

-- name: sweep_delivered
DELETE FROM deliveries WHERE status = 'delivered' AND status <> 'pending' AND updated_at < ?

-- name: count_settled
SELECT status, COUNT(*) FROM deliveries WHERE status <> 'pending' GROUP BY status

-- name: count_pending
SELECT COUNT(*) FROM deliveries WHERE status = 'pending'

-- name: pending_by_sink
-- Through deliveries_due (sink, next_attempt_at, seq), which holds the pending rows only.
SELECT sink, COUNT(*) FROM deliveries WHERE status = 'pending' GROUP BY sink

-- ---- a sink's memory ---------------------------------------------------------------------

-- name: recall
SELECT value FROM sink_memory WHERE scope = ? AND key = ?

-- name: remember
INSERT INTO sink_memory (scope, key, value, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at

-- name: forget_memories
DELETE FROM sink_memory WHERE updated_at < ?

-- ---- inbox -------------------------------------------------------------------------------

-- name: append_batch
INSERT INTO inbox (id, received_at, items, body) VALUES (?, ?, ?, ?)

-- name: waiting_batches
-- rerouted: sequenced once (a failed batch has no summary), then sent back by hand.
SELECT id, received_at, items, body, summary IS NOT NULL AS rerouted FROM inbox
WHERE status = 'waiting'
ORDER BY seq LIMIT ?

-- name: is_waiting
SELECT 1 FROM inbox WHERE id = ? AND status = 'waiting'

-- name: mark_sequenced
UPDATE inbox SET status = 'sequenced', deliveries = :deliveries, duplicates = :duplicates,
    summary = :summary, error = NULL, sequenced_at = :now
WHERE id = :id AND status = 'waiting'

-- name: mark_failed
UPDATE inbox SET status = 'failed', error = :error, summary = NULL, sequenced_at = :now
WHERE id = :id AND status = 'waiting'

-- name: list_batches
SELECT id, received_at, items, status, deliveries, duplicates, error, sequenced_at
FROM inbox ORDER BY seq DESC LIMIT ?

-- name: get_batch
SELECT id, received_at, items, status, deliveries, duplicates, error, sequenced_at, summary,
    body FROM inbox WHERE id = ?

-- name: reroute_one
UPDATE inbox SET status = 'waiting', error = NULL WHERE id = ? AND status <> 'waiting'

-- name: reroute_since
UPDATE inbox SET status = 'waiting', error = NULL
WHERE received_at >= ? AND status <> 'waiting'

-- name: count_waiting
SELECT COUNT(*), MIN(received_at) FROM inbox WHERE status = 'waiting'

-- name: count_failed
SELECT COUNT(*) FROM inbox WHERE status = 'failed' AND status <> 'waiting'

-- name: sweep_batches
-- A batch some dead letter still needs is kept: one whose template failed has nothing to
-- send, and `bridge batches reroute` renders it again from its batch (the subquery is read
-- once, through deliveries_settled).
DELETE FROM inbox WHERE status = 'sequenced' AND status <> 'waiting' AND sequenced_at < ?
    AND id NOT IN (SELECT batch_id FROM deliveries
                   WHERE status = 'dead' AND status <> 'pending'
                       AND payload IN (char(1), '{}') AND batch_id IS NOT NULL)

-- ---- schema ------------------------------------------------------------------------------

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)

-- name: ping_create
CREATE TABLE IF NOT EXISTS ping (x)

-- name: ping_delete
DELETE FROM ping

-- name: ping_room
-- While writes fail for want of room: a write that needs some (pages of the file, frames of
-- the WAL at its commit), committed, then undone by ping_delete in a transaction of its own
-- (pages freed in the transaction that wrote them are never written to the WAL).
INSERT INTO ping (x) VALUES (zeroblob(262144))

-- ---- shipment state ----------------------------------------------------------------------

-- name: get_states
-- One VALUES group; sqlite.py repeats it for up to INSERT_ROWS keys per statement. A join,
-- as `(kind, uuid) IN (VALUES ...)` is planned as a scan of the table. One statement for
-- many keys: the writer thread steps once per state found, not once per key asked.
SELECT s.kind, s.uuid, s.state FROM (VALUES (?, ?)) AS k
CROSS JOIN shipment_state AS s ON s.kind = k.column1 AND s.uuid = k.column2

-- name: update_states
-- A settle's states, written by update_states then insert_states: the states known are
-- updated, the others inserted (the insert skips those just updated). Not one upsert
-- (`ON CONFLICT DO UPDATE`): a statement of many rows that can fail midway keeps a copy of
-- every page it changes in a statement journal, a temporary file, to undo itself. With OR
-- IGNORE neither statement can fail midway, so SQLite keeps none: it had written as much
-- again as the WAL did, a tenth of a settle's CPU (benchmarks/state_cost.py). Nothing here
-- can trip a constraint: kind and uuid do not change, and no value is ever NULL.
-- One group of values; sqlite.py repeats it for up to INSERT_ROWS rows per statement.
UPDATE OR IGNORE shipment_state SET state = v.column3, updated_at = v.column4
FROM (VALUES (?, ?, ?, ?)) AS v
WHERE shipment_state.kind = v.column1 AND shipment_state.uuid = v.column2

-- name: insert_states
-- One VALUES group; sqlite.py repeats it for up to INSERT_ROWS rows per statement.
INSERT OR IGNORE INTO shipment_state (kind, uuid, state, updated_at) VALUES (?, ?, ?, ?)

-- name: forget_states
DELETE FROM shipment_state WHERE updated_at < ?
