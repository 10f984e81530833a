-- Per-shipment order, cheaper: 0004's index held every pending delivery under a random key
-- (its item's uuid), so storing and settling each one wrote a random page of it: half of
-- the outbox's own cost of storing and completing 100,000 (benchmarks/claim_cost.py). Only deliveries that were claimed (in flight, or waiting for a retry), replayed
-- or stored not yet due can hold back a later one of their item: they are marked, and the
-- index keeps them alone, a few hundred rows while deliveries flow. A later delivery that is
-- due beside an earlier unmarked one never passes it: claims take candidates oldest first
-- and at most one per item (queries.sql, claim).
ALTER TABLE deliveries ADD COLUMN holds_item INTEGER;
-- What 0004's rule held back before the upgrade is held back after it: every pending
-- delivery outside a digest is marked, once. Not only those already tried: an earlier
-- release's replay, or its clock stepping back, can have left one due later than a later
-- one of its item, which the claim's ordering alone would then let pass. Each mark goes
-- when its delivery is settled.
UPDATE deliveries SET holds_item = 1 WHERE status = 'pending' AND group_key IS NULL;
DROP INDEX IF EXISTS deliveries_by_item;
CREATE INDEX deliveries_holding ON deliveries (item_uuid, sink, seq)
    WHERE status = 'pending' AND holds_item = 1;
