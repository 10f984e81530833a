-- What the sequencer knows of each item (kind + uuid): the state merged from every snapshot,
-- written in the same transaction as the deliveries it causes (bridge/state.py).
CREATE TABLE IF NOT EXISTS shipment_state (
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (kind, uuid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS shipment_state_age ON shipment_state (updated_at);
