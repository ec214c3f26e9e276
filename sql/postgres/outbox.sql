-- steadfast transactional outbox (PostgreSQL).
-- `{table}` is the table name (default `steadfast_outbox`), `{index}` a prefix for index names.
-- Idempotent: safe to run at every start or from your own migrations.
CREATE TABLE IF NOT EXISTS {table} (
    -- The envelope id (UUIDv7): the message id on the wire.
    id           uuid        PRIMARY KEY,
    -- Publication order; never used as a cursor (rows commit out of order).
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    name         text        NOT NULL,
    source       text,
    time         text,
    headers      jsonb       NOT NULL DEFAULT '[]',
    payload      bytea       NOT NULL,
    -- 'pending' until the broker confirmed, then 'sent'; 'parked' after repeated failure.
    state        text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'parked')),
    -- A pending row is claimable from this time on (claim lease or retry backoff).
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);
-- The claim walks this in sequence order; `available_at` in the index lets it pass the
-- rows other batches hold (claimed, not yet marked sent) without reading the table.
CREATE INDEX IF NOT EXISTS {index}_claim ON {table} (seq, available_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS {index}_sent_at ON {table} (sent_at) WHERE state = 'sent';
-- The relay counts parked rows every 10 s (its `steadfast.outbox.parked` gauge).
CREATE INDEX IF NOT EXISTS {index}_parked ON {table} (seq) WHERE state = 'parked';
