//! PostgreSQL beneath the inbox and the outbox: connecting, the settings warned about,
//! applying a schema under an advisory lock.

use super::{Step, StoreError, db_err, run, url_param};
use sqlx::{AssertSqlSafe, PgPool};
use std::time::Duration;

/// The advisory lock taken while creating steadfast's tables, so concurrent starts do not
/// race on `CREATE TABLE IF NOT EXISTS`.
pub(crate) const MIGRATE_LOCK: i64 = 0x5354_4541_4446_4153; // "STEADFAS"

/// Creates a store's table (`sql`, idempotent) within `timeout`, then warns about
/// settings that could lose a commit.
pub(crate) async fn migrate(
    pool: &PgPool,
    sql: String,
    timeout: Duration,
) -> Result<(), StoreError> {
    super::migrate(timeout, apply_schema(pool, sql), warn_unsafe_settings(pool)).await
}

/// Runs a schema script in one transaction under steadfast's advisory lock.
pub(crate) async fn apply_schema(pool: &PgPool, sql: String) -> Result<(), StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db_err("could not start the schema transaction"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err("could not take the schema lock"))?;
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .map_err(db_err("could not create steadfast's table"))?;
    tx.commit()
        .await
        .map_err(db_err("could not commit steadfast's schema"))
}

/// Warns when the server would acknowledge commits it could still lose.
pub(crate) async fn warn_unsafe_settings(pool: &PgPool) {
    if server_setting(pool, "synchronous_commit").await.as_deref() == Some("off") {
        tracing::warn!(
            "PostgreSQL synchronous_commit is off: a committed inbox key or outbox row can be lost in a server crash; set it to on"
        );
    }
}

/// A server setting's value (`SHOW name`, within 5 s); `None` when it cannot be read.
/// `name` is one of this crate's constants, never user input.
pub(crate) async fn server_setting(pool: &PgPool, name: &'static str) -> Option<String> {
    let step = Step {
        doing: "reading a server setting",
        failed: "could not read a server setting",
    };
    let fut =
        sqlx::query_scalar::<_, String>(AssertSqlSafe(format!("SHOW {name}"))).fetch_one(pool);
    run(Duration::from_secs(5), step, fut).await.ok()
}

/// Connects a pool to `url` (for example `DATABASE_URL`). The password never appears in
/// errors or logs.
pub async fn connect(url: &str) -> Result<PgPool, StoreError> {
    let plain = matches!(
        url_param(url, "sslmode").as_deref(),
        None | Some("disable" | "allow")
    );
    super::open_pool(url, "PostgreSQL", plain.then_some("add sslmode=require")).await
}

/// PostgreSQL as the stores see it: `uuid` ids, spans in seconds, `now()`.
#[derive(Debug)]
pub(crate) struct Pg;

impl super::Dialect for Pg {
    type Db = sqlx::Postgres;
    type Span = f64;
    type Uuid = uuid::Uuid;

    fn span(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    fn positive(secs: f64) -> Option<Duration> {
        (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
    }

    fn age(secs: f64) -> Duration {
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default()
    }

    fn uuid(id: uuid::Uuid) -> uuid::Uuid {
        id
    }

    fn read_uuid(v: uuid::Uuid) -> Result<uuid::Uuid, uuid::Error> {
        Ok(v)
    }

    fn rows_affected(done: &<Self::Db as sqlx::Database>::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn render(t: &super::Table, sql: &str) -> std::sync::Arc<str> {
        t.render(sql).into()
    }
}
