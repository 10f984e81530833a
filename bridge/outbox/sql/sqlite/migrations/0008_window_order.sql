-- Coalescing windows take their place in a shipment's order at a sink (queries.sql, claim):
-- a window's members are marked when stored, and once the window has closed its last member
-- holds back its item's later deliveries until it is settled. Windows stored before the
-- upgrade are marked here, those waiting for a retry included.
UPDATE deliveries SET holds_item = 1
WHERE status = 'pending' AND group_key GLOB 'coalesce:*';
