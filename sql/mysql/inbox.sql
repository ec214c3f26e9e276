-- steadfast idempotency keys and transactional inbox (MySQL 8.0+ / MariaDB 10.6+).
-- Times are Unix milliseconds from the server's clock. `{table}` is the table name
-- (default `steadfast_inbox`), `{index}` a prefix for index names. Idempotent.
-- Each part of a key is at most 255 characters (the primary key fits InnoDB's 3072 bytes).
CREATE TABLE IF NOT EXISTS {table} (
    grp         VARCHAR(255) NOT NULL,
    name        VARCHAR(255) NOT NULL,
    `key`       VARCHAR(255) NOT NULL,
    -- 'held' while a worker runs the handler under a lease; 'done' after success.
    state       VARCHAR(8)   NOT NULL,
    -- The lease's token while held; the marking transaction's token once done.
    token       CHAR(36),
    lease_until BIGINT,
    done_at     BIGINT,
    -- The payload's fingerprint, to flag a key reused for another payload.
    fingerprint CHAR(32),
    PRIMARY KEY (grp, name, `key`),
    KEY {index}_done_at (state, done_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
