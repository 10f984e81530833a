-- On PostgreSQL this step indexes shipment states by the day they last changed, so that an
-- update on the same day changes no indexed value and is written as a HOT update. SQLite
-- rewrites the index entries of every column an UPDATE sets, changed or not, so a day
-- column would save nothing here (taking the updated_at index away altogether saved ~4% of
-- a settle's system CPU in benchmarks/state_cost.py, within the noise). The step keeps
-- both engines' versions alike.
SELECT 1;
