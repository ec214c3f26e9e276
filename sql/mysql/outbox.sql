-- steadfast transactional outbox (MySQL 8.0+ / MariaDB 10.6+: FOR UPDATE SKIP LOCKED).
-- Times are Unix milliseconds from the server's clock. `{table}` is the table name
-- (default `steadfast_outbox`), `{index}` a prefix for index names. Idempotent.
CREATE TABLE IF NOT EXISTS {table} (
    seq          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The envelope id (UUIDv7): the message id on the wire.
    id           CHAR(36)     NOT NULL,
    name         VARCHAR(255) NOT NULL,
    source       TEXT,
    time         VARCHAR(64),
    headers      LONGTEXT     NOT NULL,
    payload      LONGBLOB     NOT NULL,
    state        VARCHAR(8)   NOT NULL DEFAULT 'pending',
    available_at BIGINT       NOT NULL,
    attempts     INT          NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   BIGINT       NOT NULL,
    sent_at      BIGINT,
    UNIQUE KEY {index}_id (id),
    -- Claims walk the pending rows in sequence order.
    KEY {index}_pending (state, seq),
    KEY {index}_sent_at (state, sent_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
