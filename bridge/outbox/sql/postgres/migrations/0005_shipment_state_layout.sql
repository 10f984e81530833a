-- On SQLite this step rebuilds shipment_state as a rowid table (its states were too large for
-- a WITHOUT ROWID table's pages). A PostgreSQL table already keeps its rows apart from its
-- primary key's index, so nothing changes here; the step keeps both engines' versions alike.
SELECT 1;
