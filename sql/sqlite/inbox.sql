-- steadfast idempotency keys and transactional inbox (SQLite). Times are Unix milliseconds.
-- `{table}` is the table name (default `steadfast_inbox`), `{index}` a prefix for index names.
CREATE TABLE IF NOT EXISTS {table} (
    grp         TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('held', 'done')),
    token       TEXT,
    lease_until INTEGER,
    done_at     INTEGER,
    -- The payload's fingerprint, to flag a key reused for another payload (tables of
    -- earlier versions get it from `migrate`).
    fingerprint TEXT,
    PRIMARY KEY (grp, name, key)
);
CREATE INDEX IF NOT EXISTS {index}_done_at ON {table} (done_at) WHERE state = 'done';
