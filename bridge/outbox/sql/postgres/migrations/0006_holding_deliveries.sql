-- On SQLite this step narrows the per-shipment order index to the deliveries that can hold
-- a later one back (claimed, replayed or not yet due). PostgreSQL keeps 0004's rule: with
-- several replicas claiming at once, a delivery another replica has just claimed is marked
-- only in that replica's uncommitted transaction, while "pending" holds in every snapshot.
-- The step keeps both engines' versions alike.
SELECT 1;
