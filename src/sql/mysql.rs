//! MySQL 8.0+ and MariaDB 10.6+ beneath the inbox and the outbox: connecting, the
//! settings warned about, applying a schema under a named lock, and the server's clock.

use super::{StoreError, StoreErrorKind, db_err, url_param};
use sqlx::{AssertSqlSafe, MySqlPool};
use std::time::Duration;

/// The server's clock in Unix milliseconds. `NOW(3)` is fixed for a statement;
/// `UNIX_TIMESTAMP` turns it back from the session's time zone.
pub(crate) const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// The named lock taken while creating steadfast's tables, so concurrent starts do not
/// race on `CREATE TABLE IF NOT EXISTS`.
const MIGRATE_LOCK: &str = "steadfast_schema";

/// Creates a store's table (`sql`, idempotent) within `timeout`, then warns about
/// settings that could lose a commit.
pub(crate) async fn migrate(
    pool: &MySqlPool,
    sql: String,
    timeout: Duration,
) -> Result<(), StoreError> {
    super::migrate(timeout, apply_schema(pool, sql), warn_unsafe_settings(pool)).await
}

/// Runs a schema script on one connection under a named lock (MySQL's DDL commits by
/// itself: there is no transaction to hold it in).
async fn apply_schema(pool: &MySqlPool, sql: String) -> Result<(), StoreError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(db_err("could not connect to create steadfast's table"))?;
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 30)")
        .bind(MIGRATE_LOCK)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err("could not take the schema lock"))?;
    if got != Some(1) {
        return Err(StoreError::of(
            StoreErrorKind::Timeout,
            "could not take the schema lock within 30s",
        ));
    }
    let applied = sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(db_err("could not create steadfast's table"));
    // The lock ends with the session too; release it so the pooled connection is clean.
    let _ = sqlx::query("DO RELEASE_LOCK(?)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await;
    applied
}

/// What the settings check reads: each value as text.
async fn settings(pool: &MySqlPool) -> Result<(String, String, String, String), sqlx::Error> {
    let (flush, sync, binlog): (String, String, String) = sqlx::query_as(
        "SELECT CAST(@@global.innodb_flush_log_at_trx_commit AS CHAR), \
         CAST(@@global.sync_binlog AS CHAR), CAST(@@global.log_bin AS CHAR)",
    )
    .fetch_one(pool)
    .await?;
    // MySQL 8 and MariaDB 11.1+ name it `transaction_isolation`; older MariaDB
    // `tx_isolation`.
    let isolation = match sqlx::query_scalar("SELECT CAST(@@transaction_isolation AS CHAR)")
        .fetch_one(pool)
        .await
    {
        Ok(v) => v,
        Err(_) => {
            sqlx::query_scalar("SELECT CAST(@@tx_isolation AS CHAR)")
                .fetch_one(pool)
                .await?
        }
    };
    Ok((flush, sync, binlog, isolation))
}

/// Warns when the server would acknowledge commits it could still lose, or when the
/// isolation level lets the inbox's looks see keys of transactions that roll back.
pub(crate) async fn warn_unsafe_settings(pool: &MySqlPool) {
    let Ok(Ok((flush, sync, binlog, isolation))) =
        tokio::time::timeout(Duration::from_secs(5), settings(pool)).await
    else {
        tracing::debug!("could not read the MySQL settings steadfast checks");
        return;
    };
    for w in unsafe_settings(&flush, &sync, &binlog, &isolation) {
        tracing::warn!("{w}");
    }
}

/// The warnings for these settings (as the server shows them).
fn unsafe_settings(flush: &str, sync: &str, binlog: &str, isolation: &str) -> Vec<String> {
    let mut out = Vec::new();
    if flush != "1" {
        out.push(format!(
            "MySQL innodb_flush_log_at_trx_commit is {flush}: a committed inbox key or outbox row can be lost in a server crash; set it to 1"
        ));
    }
    let binlog_on = matches!(binlog, "1" | "ON");
    if binlog_on && sync != "1" {
        out.push(format!(
            "MySQL sync_binlog is {sync} with binary logging on: a commit can be lost from the binary log (and from replicas) in a crash; set it to 1"
        ));
    }
    if isolation.eq_ignore_ascii_case("READ-UNCOMMITTED") {
        out.push(
            "MySQL transaction isolation is READ-UNCOMMITTED: the inbox could see a key marked by a transaction that then rolls back, and ack a message that was never handled; use READ-COMMITTED or REPEATABLE-READ"
                .to_owned(),
        );
    }
    out
}

/// Connects a pool to `url` (`mysql://user:password@host/database`). The password never
/// appears in errors or logs.
pub async fn connect(url: &str) -> Result<MySqlPool, StoreError> {
    let tls = url_param(url, "ssl-mode")
        .or_else(|| url_param(url, "sslmode"))
        .map(|m| m.to_ascii_lowercase());
    let plain = !matches!(
        tls.as_deref(),
        Some("required" | "verify_ca" | "verify_identity")
    );
    super::open_pool(url, "MySQL", plain.then_some("add ssl-mode=required")).await
}

/// MySQL / MariaDB as the stores see it: text ids, times in milliseconds from the server's clock.
#[derive(Debug)]
pub(crate) struct My;

super::dialect::millisecond_dialect!(My, sqlx::MySql, NOW_MS);

#[cfg(test)]
mod tests {
    use super::unsafe_settings;

    #[test]
    fn unsafe_settings_are_named() {
        assert!(unsafe_settings("1", "0", "0", "REPEATABLE-READ").is_empty());
        assert!(unsafe_settings("1", "1", "1", "READ-COMMITTED").is_empty());
        let w = unsafe_settings("2", "0", "1", "READ-UNCOMMITTED");
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("innodb_flush_log_at_trx_commit is 2"));
        assert!(w[1].contains("sync_binlog is 0"));
        assert!(w[2].contains("READ-UNCOMMITTED"));
    }
}
