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
    PRIMARY KEY (grp, name, key)
);
CREATE INDEX IF NOT EXISTS {index}_done_at ON {table} (done_at) WHERE state = 'done';
