-- Coalescing windows take their place in a shipment's order at a sink (queries.sql, claim):
-- a window claimed before holds back its item's later deliveries until it is settled. A
-- window tried before the upgrade (in flight, or waiting for a retry) is marked as a claim
-- marks it now; the claim's rule takes only a window's last member as the one that holds.
UPDATE deliveries SET holds_item = 1
WHERE status = 'pending' AND group_key GLOB 'coalesce:*'
    AND (lease_until IS NOT NULL OR last_error IS NOT NULL);
