//! SQLite beneath the inbox and the outbox: opening a database with safe settings, the
//! settings warned about, applying a schema, and SQLite's clock.

use super::{StoreError, StoreErrorKind, Table, bounded, db_err};
use sqlx::{AssertSqlSafe, SqlitePool};
use std::{path::Path, time::Duration};

/// SQLite's clock in Unix milliseconds.
pub(crate) const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// Creates a store's table (`sql`, idempotent) within `timeout`, then warns about
/// settings that could lose a commit.
pub(crate) async fn migrate(
    pool: &SqlitePool,
    sql: String,
    timeout: Duration,
) -> Result<(), StoreError> {
    let apply = async {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map(drop)
            .map_err(db_err("could not create steadfast's table"))
    };
    super::migrate(timeout, apply, warn_unsafe_settings(pool)).await
}

/// Adds `column` (of SQL type `ty`) to `table` if it lacks it: SQLite has no
/// `ADD COLUMN IF NOT EXISTS`. `column` and `ty` are this crate's constants.
pub(crate) async fn add_column(
    pool: &SqlitePool,
    table: &Table,
    column: &'static str,
    ty: &'static str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let (schema, name) = match table.name.split_once('.') {
        Some((schema, name)) => (schema, name),
        None => ("main", table.name.as_str()),
    };
    bounded(timeout, "adding a column to steadfast's table", async {
        let has: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pragma_table_info(?1, ?2) WHERE name = ?3")
                .bind(name)
                .bind(schema)
                .bind(column)
                .fetch_one(pool)
                .await
                .map_err(db_err("could not read steadfast's table's columns"))?;
        if has == 0 {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN {column} {ty}",
                table.name
            )))
            .execute(pool)
            .await
            .map_err(db_err("could not add a column to steadfast's table"))?;
        }
        Ok(())
    })
    .await
}

/// Opens (creating if missing) the SQLite database at `path` with the settings the
/// promise needs: WAL journal, `synchronous=FULL`, a 5 s busy timeout, foreign keys on.
pub async fn open(path: impl AsRef<Path>) -> Result<SqlitePool, StoreError> {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    let opts = SqliteConnectOptions::new()
        .filename(path.as_ref())
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let connect = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts);
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(e)) => Err(StoreError::of(
            StoreErrorKind::Unavailable,
            format!("could not open SQLite database {}", path.as_ref().display()),
        )
        .with_source(e)),
        Err(_) => Err(StoreError::of(
            StoreErrorKind::Timeout,
            "opening the SQLite database took over 15s",
        )),
    }
}

/// Warns when SQLite could lose a committed transaction or run without WAL.
pub(crate) async fn warn_unsafe_settings(pool: &SqlitePool) {
    let check = async {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await?;
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await?;
        Ok::<_, sqlx::Error>((mode, sync))
    };
    if let Ok(Ok((mode, sync))) = tokio::time::timeout(Duration::from_secs(5), check).await {
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "SQLite is not in WAL mode; use steadfast::idempotency::sqlite::open or journal_mode=WAL");
        }
        if sync < 2 {
            tracing::warn!(
                synchronous = sync,
                "SQLite synchronous is below FULL: a committed inbox key or outbox row can be lost in a power failure; set synchronous=FULL"
            );
        }
    }
}

/// SQLite as the stores see it: text ids, times in milliseconds from its own clock.
#[derive(Debug)]
pub(crate) struct Lite;

super::dialect::millisecond_dialect!(Lite, sqlx::Sqlite, NOW_MS);
