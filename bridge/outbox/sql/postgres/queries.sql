-- PostgreSQL queries, one named block each (loaded by bridge/outbox/sql/__init__.py).

-- ---- outbox ------------------------------------------------------------------------------

-- name: insert_deliveries
-- One statement per call; ON CONFLICT skips repeated items. $12 is now.
INSERT INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload, status,
    next_attempt_at, last_error, group_key, created_at, enqueued_at, updated_at)
SELECT *, $12::float8, $12::float8, $12::float8 FROM unnest($1::text[], $2::text[],
    $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::float8[],
    $10::text[], $11::text[])
ON CONFLICT (id) DO NOTHING RETURNING 1

-- name: claim
-- Per-shipment order: a delivery waits while an earlier one (lower seq) of its item for
-- this sink is pending, in flight, waiting for a retry or not yet due (deliveries_by_item).
-- A coalescing window (group_key 'coalesce:...') takes its place in that order as one
-- delivery, at its last member (the change its message is rendered from): only that member
-- is a candidate (claim_group brings the others), and only while no other member of its
-- window is in flight (a change stored after its window was claimed waits for that send).
-- It waits like any other, and from its close on (its last member due, or any member in
-- flight or tried) it holds back its item's later
-- deliveries (deliveries_windows). A member that is not its window's last holds nothing
-- back: a window never waits for a delivery that waits for it. Deliveries made while a
-- window is open are not held by it: they go as they fall due.
-- Digest members neither wait nor hold back: a digest goes out when its window closes.
-- Across replicas too: an earlier delivery that another replica claimed stays pending, in
-- every snapshot, until that replica commits its outcome.
-- The OR makes the check a subplan, one index probe per candidate. NOT EXISTS alone may be
-- planned as an anti join, which with stale statistics (a backlog just stored) scanned
-- every pending row for each candidate: seconds per claim of 50 at 100,000 pending.
UPDATE deliveries SET attempts = attempts + 1, lease_until = $1, updated_at = $2
WHERE seq IN (SELECT d.seq FROM deliveries AS d WHERE d.status = 'pending' AND d.sink = $3
              AND d.next_attempt_at <= $2 AND (d.lease_until IS NULL OR d.lease_until <= $2)
              AND (d.group_key IS NOT NULL AND d.group_key NOT LIKE 'coalesce:%'  -- a digest's
                  OR (d.group_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM deliveries AS f WHERE f.status = 'pending'
                      AND f.sink = d.sink AND f.group_key = d.group_key
                      AND (f.seq > d.seq OR f.lease_until > $2)))
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries AS e WHERE e.status = 'pending'
                      AND e.group_key IS NULL AND e.item_uuid = d.item_uuid AND e.sink = d.sink
                      AND e.seq < d.seq)
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries AS w WHERE w.status = 'pending'
                      AND w.group_key LIKE 'coalesce:%' AND w.item_uuid = d.item_uuid
                      AND w.sink = d.sink AND w.seq < d.seq
                      AND w.group_key IS DISTINCT FROM d.group_key
                      AND (w.next_attempt_at <= $2 OR EXISTS (  -- closed: due, or tried
                          SELECT 1 FROM deliveries AS g WHERE g.status = 'pending'
                          AND g.sink = w.sink AND g.group_key = w.group_key
                          AND (g.lease_until IS NOT NULL OR g.last_error IS NOT NULL)))
                      AND (w.group_key IS NULL OR NOT EXISTS (  -- a subplan too, as above
                          SELECT 1 FROM deliveries AS f WHERE f.status = 'pending'
                          AND f.sink = w.sink AND f.group_key = w.group_key
                          AND f.seq > w.seq))))
              ORDER BY d.next_attempt_at, d.seq LIMIT $4 FOR UPDATE OF d SKIP LOCKED)
RETURNING id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until, seq

-- name: claim_group
UPDATE deliveries SET attempts = attempts + 1, lease_until = $1, updated_at = $2
WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND sink = $3
              AND group_key = $4 AND (lease_until IS NULL OR lease_until <= $2)
              ORDER BY seq LIMIT $5 FOR UPDATE SKIP LOCKED)
RETURNING id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until, seq

-- name: complete
UPDATE deliveries SET status = 'delivered', lease_until = NULL, last_error = NULL,
    updated_at = $1 WHERE id = ANY($2::text[])

-- name: retry_at
UPDATE deliveries SET next_attempt_at = $1, last_error = $2, lease_until = NULL,
    updated_at = $3, attempts = GREATEST(attempts - $4, 0)
WHERE id = $5 AND status = 'pending'

-- name: dead_letter
UPDATE deliveries SET status = 'dead', last_error = $1, lease_until = NULL, updated_at = $2
WHERE id = $3

-- name: release
UPDATE deliveries AS d SET attempts = GREATEST(d.attempts - 1, 0), lease_until = NULL
FROM unnest($1::text[], $2::float8[]) AS c(id, lease_until)
WHERE d.id = c.id AND d.status = 'pending' AND d.lease_until = c.lease_until

-- name: next_due
-- The earliest of: when the first unleased delivery that no earlier one of its item holds
-- back becomes due (in the order of deliveries_due: the check runs for few rows), and when
-- a lease runs out (a scan, as ever). A leased delivery was its item's earliest pending
-- when claimed; only a replay can put one before it, and that one is due itself. So no
-- check there, where it would run for every pending row the scan passes.
SELECT MIN(t) FROM (
    SELECT * FROM (
        SELECT d.next_attempt_at AS t FROM deliveries AS d
        WHERE d.status = 'pending' AND d.sink = $1
        AND (d.lease_until IS NULL OR d.lease_until <= d.next_attempt_at)
        AND (d.group_key IS NOT NULL AND d.group_key NOT LIKE 'coalesce:%'  -- as in claim,
            OR (d.group_key IS NULL OR NOT EXISTS (  -- at the time d falls due
                SELECT 1 FROM deliveries AS f WHERE f.status = 'pending' AND f.sink = d.sink
                AND f.group_key = d.group_key
                AND (f.seq > d.seq OR f.lease_until > d.next_attempt_at)))
            AND NOT EXISTS (
                SELECT 1 FROM deliveries AS e WHERE e.status = 'pending' AND e.group_key IS NULL
                AND e.item_uuid = d.item_uuid AND e.sink = d.sink AND e.seq < d.seq)
            -- A window closed by the time this one is due holds it back.
            AND NOT EXISTS (
                SELECT 1 FROM deliveries AS w WHERE w.status = 'pending'
                AND w.group_key LIKE 'coalesce:%' AND w.item_uuid = d.item_uuid
                AND w.sink = d.sink AND w.seq < d.seq AND w.group_key IS DISTINCT FROM d.group_key
                AND (w.next_attempt_at <= d.next_attempt_at OR EXISTS (
                    SELECT 1 FROM deliveries AS g WHERE g.status = 'pending'
                    AND g.sink = w.sink AND g.group_key = w.group_key
                    AND (g.lease_until IS NOT NULL OR g.last_error IS NOT NULL)))
                AND (w.group_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM deliveries AS f WHERE f.status = 'pending' AND f.sink = w.sink
                    AND f.group_key = w.group_key AND f.seq > w.seq))))
        ORDER BY d.next_attempt_at, d.seq LIMIT 1) AS unleased
    UNION ALL
    SELECT MIN(lease_until) FROM deliveries
    WHERE status = 'pending' AND sink = $1 AND lease_until > next_attempt_at
) AS candidates

-- name: get_delivery
SELECT id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until
FROM deliveries WHERE id = $1

-- name: list_dead
SELECT id, sink, route, item_uuid, kind, batch_id, payload, status, attempts,
    next_attempt_at, last_error, created_at, enqueued_at, updated_at, group_key, lease_until
FROM deliveries WHERE status = 'dead' AND status <> 'pending'
ORDER BY updated_at DESC, seq DESC LIMIT $1

-- name: replay_all
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $1,
    enqueued_at = $1, lease_until = NULL, updated_at = $1
WHERE status = 'dead' AND status <> 'pending' AND payload <> '{}'

-- name: replay_ids
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $1,
    enqueued_at = $1, lease_until = NULL, updated_at = $1
WHERE status = 'dead' AND status <> 'pending' AND id = ANY($2::text[]) AND payload <> '{}'

-- name: revive_unrendered
-- A rerouted batch's delivery stored dead because its template failed (nothing rendered:
-- its payload is '{}') takes its new rendering and is pending again, first for its shipment
-- as a replayed dead letter is. The replays above leave such deliveries dead.
UPDATE deliveries AS d SET payload = v.payload, status = 'pending', attempts = 0,
    next_attempt_at = v.due, enqueued_at = $5, updated_at = $5, last_error = NULL,
    lease_until = NULL, group_key = v.group_key
FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[]) AS v(id, payload, due, group_key)
WHERE d.id = v.id AND d.status = 'dead' AND d.payload = '{}'

-- name: sweep_delivered
DELETE FROM deliveries WHERE status = 'delivered' AND status <> 'pending' AND updated_at < $1

-- name: count_by_status
SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status

-- name: pending_by_sink
SELECT sink, COUNT(*) AS n FROM deliveries WHERE status = 'pending' GROUP BY sink

-- name: notify_deliveries
SELECT pg_notify('bridge_deliveries', '')

-- ---- a sink's memory ---------------------------------------------------------------------

-- name: recall
SELECT value FROM sink_memory WHERE scope = $1 AND key = $2

-- name: remember
INSERT INTO sink_memory (scope, key, value, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at

-- name: forget_memories
DELETE FROM sink_memory WHERE updated_at < $1

-- ---- inbox -------------------------------------------------------------------------------

-- name: append_batch
-- The NOTIFY reaches the sequencer, whichever replica holds it, when this commits.
WITH stored AS (INSERT INTO inbox (id, received_at, items, body) VALUES ($1, $2, $3, $4)
                RETURNING 1)
SELECT pg_notify('bridge_inbox', '') FROM stored

-- name: waiting_batches
-- rerouted: sequenced once (a failed batch has no summary), then sent back by hand.
SELECT id, received_at, items, body, summary IS NOT NULL AS rerouted FROM inbox
WHERE status = 'waiting' ORDER BY seq LIMIT $1

-- name: settle_batch
-- Marked first: a batch no longer waiting (settled already) stores no delivery. $1-$12 as
-- in insert_deliveries; $13 the batch id, $14 its summary.
WITH marked AS (
    UPDATE inbox SET status = 'sequenced', summary = $14, error = NULL, sequenced_at = $12
    WHERE id = $13 AND status = 'waiting' RETURNING 1
), stored AS (
    INSERT INTO deliveries (id, sink, route, item_uuid, kind, batch_id, payload, status,
        next_attempt_at, last_error, group_key, created_at, enqueued_at, updated_at)
    SELECT *, $12::float8, $12::float8, $12::float8 FROM unnest($1::text[], $2::text[],
        $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::float8[],
        $10::text[], $11::text[])
    WHERE EXISTS (SELECT 1 FROM marked)
    ON CONFLICT (id) DO NOTHING RETURNING 1
)
SELECT (SELECT COUNT(*) FROM marked) AS marked, (SELECT COUNT(*) FROM stored) AS new

-- name: count_sequenced
UPDATE inbox SET deliveries = $1, duplicates = $2 WHERE id = $3

-- name: mark_failed
UPDATE inbox SET status = 'failed', error = $1, summary = NULL, sequenced_at = $2
WHERE id = $3 AND status = 'waiting'

-- name: list_batches
SELECT id, received_at, items, status, deliveries, duplicates, error, sequenced_at
FROM inbox ORDER BY seq DESC LIMIT $1

-- name: get_batch
SELECT id, received_at, items, status, deliveries, duplicates, error, sequenced_at, summary,
    body FROM inbox WHERE id = $1

-- name: reroute_ids
UPDATE inbox SET status = 'waiting', error = NULL
WHERE id = ANY($1::text[]) AND status <> 'waiting'

-- name: reroute_since
UPDATE inbox SET status = 'waiting', error = NULL WHERE received_at >= $1 AND status <> 'waiting'

-- name: notify_inbox
SELECT pg_notify('bridge_inbox', '')

-- name: count_waiting
SELECT COUNT(*) AS n, MIN(received_at) AS oldest FROM inbox WHERE status = 'waiting'

-- name: count_failed
SELECT COUNT(*) FROM inbox WHERE status = 'failed' AND status <> 'waiting'

-- name: sweep_batches
-- A batch some dead letter still needs is kept: one whose template failed has nothing to
-- send, and `bridge batches reroute` renders it again from its batch.
DELETE FROM inbox WHERE status = 'sequenced' AND status <> 'waiting' AND sequenced_at < $1
    AND id NOT IN (SELECT batch_id FROM deliveries
                   WHERE status = 'dead' AND status <> 'pending' AND payload = '{}'
                       AND batch_id IS NOT NULL)

-- ---- schema and locks --------------------------------------------------------------------

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)

-- name: migration_lock
-- Held to the end of the migrating transaction: replicas starting together wait their turn.
SELECT pg_advisory_xact_lock($1)

-- name: try_sequencer_lock
-- A session lock on the sequencer's own connection: released the moment that connection
-- ends, so a replica that dies hands the sequencer over within the others' poll.
SELECT pg_try_advisory_lock($1)

-- name: unlock_sequencer
SELECT pg_advisory_unlock($1)

-- name: sequencer_heartbeat
-- The holder's word that it is alive: every statement on its session moves the session's
-- state_change (postgres.py SEQUENCER_HEARTBEAT).
SELECT 1

-- name: sequencer_holder
-- The session holding the sequencer's lock ($1, a bigint: pg_locks shows it as its two
-- halves) in this database (pg_locks covers the whole server, and every database has a
-- lock of that number), and how long it has run nothing by the server's clock: silent
-- while idle (in a transaction or not); a statement running is busy, not silent (0). NULL
-- when this role may not see that session's activity (pg_read_all_stats).
SELECT l.pid, CASE WHEN a.state IN ('idle', 'idle in transaction',
                                     'idle in transaction (aborted)')
                   THEN EXTRACT(EPOCH FROM clock_timestamp() - a.state_change)::float8
                   WHEN a.state IS NOT NULL THEN 0.0 END AS silent_for
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid::bigint = ($1::bigint >> 32) AND l.objid::bigint = ($1::bigint & 4294967295)
LIMIT 1

-- name: end_session
-- Its lock and open transaction go with it (postgres.py then waits for the lock).
SELECT pg_terminate_backend($1)

-- name: server_time
-- The server's clock, seconds since 1970 (postgres.py CLOCK_OFF_WARN).
SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8

-- name: is_standby
SELECT pg_is_in_recovery()

-- name: ping
SELECT 1 FROM deliveries LIMIT 1 FOR UPDATE SKIP LOCKED

-- ---- shipment state ----------------------------------------------------------------------

-- name: get_states
SELECT s.kind, s.uuid, s.state FROM shipment_state AS s
JOIN unnest($1::text[], $2::text[]) AS k(kind, uuid) ON s.kind = k.kind AND s.uuid = k.uuid

-- name: put_states
-- updated_day (generated from updated_at), not updated_at, is indexed (0007): a state written
-- again on the same day changes no indexed value, so PostgreSQL writes it as a HOT update.
INSERT INTO shipment_state (kind, uuid, state, updated_at)
SELECT k.kind, k.uuid, k.state, $4::float8 FROM unnest($1::text[], $2::text[], $3::text[])
    AS k(kind, uuid, state)
ON CONFLICT (kind, uuid) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at

-- name: forget_states
-- By the day through the index, then to the second.
DELETE FROM shipment_state
WHERE updated_day <= floor($1::float8 / 86400)::integer AND updated_at < $1
