-- shipment_state as a rowid table: in a WITHOUT ROWID table a state over ~1 KB (a tracking
-- history of a few steps) spilled into an overflow page of its own, and rows inserted in
-- random uuid order left pages half full: 2.3 states per 4 KB page. Here a row stays whole
-- on its page up to ~4 KB, new rows fill pages in the order they come, and only the small
-- (kind, uuid) index is written in random order.
CREATE TABLE shipment_state_new (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (kind, uuid)
);
INSERT INTO shipment_state_new (kind, uuid, state, updated_at)
    SELECT kind, uuid, state, updated_at FROM shipment_state ORDER BY updated_at;
DROP TABLE shipment_state;
ALTER TABLE shipment_state_new RENAME TO shipment_state;
CREATE INDEX shipment_state_age ON shipment_state (updated_at);
