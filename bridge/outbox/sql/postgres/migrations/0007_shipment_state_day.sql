-- Shipment states are forgotten by the day they last changed, not by the second: an update
-- that keeps every indexed value (the same day) is a HOT update, written beside the old row
-- on its own page, with no new entry in any index. Before, every update changed the indexed
-- updated_at, so every one wrote a new entry in both indexes. Room on each page for it:
-- fillfactor 80 (set first, so the table's rewrite below packs its pages so).
-- The day is a generated column: a replica of the release before, still writing states
-- without it during a rolling upgrade (or after a rollback), keeps working.
ALTER TABLE shipment_state SET (fillfactor = 80);
ALTER TABLE shipment_state ADD COLUMN IF NOT EXISTS updated_day INTEGER
    GENERATED ALWAYS AS (floor(updated_at / 86400)::integer) STORED;
DROP INDEX IF EXISTS shipment_state_age;
CREATE INDEX IF NOT EXISTS shipment_state_day ON shipment_state (updated_day);
