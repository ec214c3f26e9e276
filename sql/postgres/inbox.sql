-- steadfast idempotency keys and transactional inbox (PostgreSQL).
-- `{table}` is the table name (default `steadfast_inbox`), `{index}` a prefix for index names.
-- Idempotent: safe to run at every start or from your own migrations.
CREATE TABLE IF NOT EXISTS {table} (
    grp         text        NOT NULL,
    name        text        NOT NULL,
    key         text        NOT NULL,
    -- 'held' while a worker runs the handler under a lease; 'done' after success.
    state       text        NOT NULL CHECK (state IN ('held', 'done')),
    token       uuid,
    lease_until timestamptz,
    done_at     timestamptz,
    -- The payload's fingerprint, to flag a key reused for another payload.
    fingerprint text,
    PRIMARY KEY (grp, name, key)
);
-- Tables created by steadfast before the fingerprint was kept.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS fingerprint text;
CREATE INDEX IF NOT EXISTS {index}_done_at ON {table} (done_at) WHERE state = 'done';
