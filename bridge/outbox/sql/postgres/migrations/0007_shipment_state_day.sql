-- Shipment states are forgotten by the day they last changed, not by the second: an update
-- that keeps every indexed value (the same day) is a HOT update, written beside the old row
-- on its own page, with no new entry in any index. Before, every update changed the indexed
-- updated_at, so every one wrote a new entry in both indexes. Room on each page for it:
-- fillfactor 80 (new pages; a VACUUM FULL would repack old ones).
ALTER TABLE shipment_state ADD COLUMN IF NOT EXISTS updated_day INTEGER;
UPDATE shipment_state SET updated_day = floor(updated_at / 86400)::integer;
ALTER TABLE shipment_state ALTER COLUMN updated_day SET NOT NULL;
DROP INDEX IF EXISTS shipment_state_age;
CREATE INDEX IF NOT EXISTS shipment_state_day ON shipment_state (updated_day);
ALTER TABLE shipment_state SET (fillfactor = 80);
