-- steadfast transactional outbox (SQLite). Times are Unix milliseconds.
-- `{table}` is the table name (default `steadfast_outbox`), `{index}` a prefix for index names.
CREATE TABLE IF NOT EXISTS {table} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The envelope id (UUIDv7): the message id on the wire.
    id           TEXT    NOT NULL UNIQUE,
    name         TEXT    NOT NULL,
    source       TEXT,
    time         TEXT,
    headers      TEXT    NOT NULL DEFAULT '[]',
    payload      BLOB    NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'parked')),
    available_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    sent_at      INTEGER
);
CREATE INDEX IF NOT EXISTS {index}_pending ON {table} (seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS {index}_sent_at ON {table} (sent_at) WHERE state = 'sent';
-- The relay counts parked rows every 10 s (its `steadfast.outbox.parked` gauge).
CREATE INDEX IF NOT EXISTS {index}_parked ON {table} (seq) WHERE state = 'parked';
