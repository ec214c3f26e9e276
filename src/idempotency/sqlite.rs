//! The SQLite idempotency store and transactional inbox.
//!
//! Times are Unix milliseconds from SQLite's own clock. SQLite has one writer at a time:
//! call [`SqliteStore::mark`] first in your transaction, so the transaction takes the
//! write lock at once instead of upgrading a read (which can fail with `SQLITE_BUSY`).

use super::{Begin, IdempotencyStore, Key, Lease, StoreError};
use crate::{
    context::Context,
    outbox::{Table, bounded, db_err},
};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, Row, SqliteConnection, SqlitePool};
use std::{fmt, path::Path, sync::Arc, time::Duration};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../sql/sqlite/inbox.sql");
/// SQLite's clock in Unix milliseconds.
pub(crate) const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// Idempotency keys and the transactional inbox in a SQLite table (default
/// `steadfast_inbox`). The same contract as
/// [`PostgresStore`](super::PostgresStore): give it to the worker and call
/// [`mark`](Self::mark) in your handler's transaction.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use steadfast::idempotency::{SqliteStore, sqlite::open};
/// let pool = open("app.db").await?; // WAL, synchronous=FULL, busy timeout
/// let inbox = SqliteStore::new(pool.clone());
/// inbox.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    table: Table,
    retention: Duration,
    timeout: Duration,
    sql: Sql,
}

struct Sql {
    begin: Arc<str>,
    state: Arc<str>,
    done: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    remaining: Arc<str>,
    mark: Arc<str>,
    cleanup: Arc<str>,
}

impl Sql {
    fn new(t: &Table) -> Self {
        let r = |s: &str| Arc::<str>::from(t.render(s).replace("{now}", NOW_MS));
        Self {
            begin: r(
                "INSERT INTO {table} (grp, name, key, state, token, lease_until) \
                 VALUES (?1, ?2, ?3, 'held', ?4, {now} + ?5) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'held', token = excluded.token, lease_until = excluded.lease_until, done_at = NULL \
                 WHERE (state = 'held' AND lease_until <= {now}) \
                    OR (state = 'done' AND done_at <= {now} - ?6) \
                 RETURNING token",
            ),
            state: r("SELECT state FROM {table} WHERE grp = ?1 AND name = ?2 AND key = ?3"),
            done: r("SELECT 1 FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'done' \
                   AND done_at > {now} - ?4"),
            complete: r("INSERT INTO {table} (grp, name, key, state, done_at) \
                 VALUES (?1, ?2, ?3, 'done', {now}) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = {now}, token = NULL, lease_until = NULL \
                 WHERE state = 'held'"),
            release: r("DELETE FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'held' AND token = ?4"),
            remaining: r("SELECT lease_until - {now} FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'held' AND lease_until > {now}"),
            mark: r("INSERT INTO {table} (grp, name, key, state, done_at) \
                 VALUES (?1, ?2, ?3, 'done', {now}) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = {now}, token = NULL, lease_until = NULL \
                 WHERE state = 'held' OR (state = 'done' AND done_at <= {now} - ?4) \
                 RETURNING 1"),
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < {now} - ?1) \
                    OR (state = 'held' AND lease_until < {now} - 3600000)"),
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.inner.table.name)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// A store in table `steadfast_inbox`, keeping completed keys for 7 days.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(
            pool,
            Table::parse("steadfast_inbox").expect("a valid constant name"),
            Duration::from_secs(7 * 24 * 3600),
            Duration::from_secs(10),
        )
    }

    fn build(pool: SqlitePool, table: Table, retention: Duration, timeout: Duration) -> Self {
        let sql = Sql::new(&table);
        Self {
            inner: Arc::new(Inner {
                pool,
                table,
                retention,
                timeout,
                sql,
            }),
        }
    }

    /// Uses table `name` instead of `steadfast_inbox`.
    pub fn with_table(self, name: &str) -> Result<Self, StoreError> {
        let table = Table::parse(name)?;
        let i = &self.inner;
        Ok(Self::build(i.pool.clone(), table, i.retention, i.timeout))
    }

    /// Keeps completed keys for `retention` (default 7 days).
    #[must_use]
    pub fn with_retention(self, retention: Duration) -> Self {
        let i = &self.inner;
        Self::build(i.pool.clone(), i.table.clone(), retention, i.timeout)
    }

    /// Bounds every store call (default 10 s).
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let i = &self.inner;
        Self::build(i.pool.clone(), i.table.clone(), i.retention, timeout)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The SQL that creates the table, for your own migrations. Idempotent.
    pub fn schema_sql(&self) -> String {
        self.inner.table.render(SCHEMA)
    }

    /// Creates the table if it does not exist, and warns about unsafe settings (a
    /// journal mode other than WAL, `synchronous` below FULL).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = self.schema_sql();
        let pool = &self.inner.pool;
        bounded(self.inner.timeout, "creating the inbox table", async {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(drop)
                .map_err(db_err("could not create the inbox table"))
        })
        .await?;
        warn_unsafe_settings(pool).await;
        Ok(())
    }

    /// Marks the delivery of `cx` handled, inside your transaction `conn`. Returns
    /// `false` if it was handled before: then do nothing and return `Ok(())`.
    pub async fn mark(
        &self,
        conn: &mut SqliteConnection,
        cx: &Context,
    ) -> Result<bool, StoreError> {
        let marked = self
            .mark_key(
                conn,
                Key {
                    group: cx.group(),
                    name: cx.name(),
                    key: cx.idempotency_key(),
                },
            )
            .await?;
        cx.note_marked();
        Ok(marked)
    }

    /// [`mark`](Self::mark) for an explicit key.
    pub async fn mark_key(
        &self,
        conn: &mut SqliteConnection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let fut = async {
            sqlx::query(AssertSqlSafe(self.inner.sql.mark.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(millis(self.inner.retention))
                .fetch_optional(conn)
                .await
                .map_err(db_err("could not mark the inbox key"))
        };
        let row = bounded(self.inner.timeout, "inbox mark", fut).await?;
        Ok(row.is_some())
    }

    /// Deletes completed keys older than the retention and leases abandoned for over an
    /// hour; returns how many rows went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let fut = async {
            sqlx::query(AssertSqlSafe(self.inner.sql.cleanup.clone()))
                .bind(millis(self.inner.retention))
                .execute(&self.inner.pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(db_err("could not clean up the inbox"))
        };
        bounded(self.inner.timeout, "inbox cleanup", fut).await
    }

    /// Runs [`cleanup`](Self::cleanup) every `every` until the handle is aborted.
    pub fn spawn_cleanup(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                if let Err(e) = store.cleanup().await {
                    tracing::warn!(error = %e, "inbox cleanup failed");
                }
            }
        })
    }

    async fn begin_inner(&self, key: Key<'_>, lease: Duration) -> Result<Begin, StoreError> {
        let sql = &self.inner.sql;
        for _ in 0..2 {
            let token = Uuid::now_v7();
            let got = sqlx::query(AssertSqlSafe(sql.begin.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(token.to_string())
                .bind(millis(lease))
                .bind(millis(self.inner.retention))
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(db_err("could not take the idempotency key"))?;
            if got.is_some() {
                return Ok(Begin::Acquired(Lease { token }));
            }
            let state = sqlx::query(AssertSqlSafe(sql.state.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(db_err("could not read the idempotency key"))?;
            match state.map(|r| r.try_get::<String, _>(0)).transpose() {
                Ok(Some(s)) if s == "done" => return Ok(Begin::AlreadyDone),
                Ok(Some(_)) => return Ok(Begin::InFlight),
                Ok(None) => continue,
                Err(e) => return Err(db_err("could not read the idempotency key")(e)),
            }
        }
        Ok(Begin::InFlight)
    }
}

impl IdempotencyStore for SqliteStore {
    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let fut = async move {
            let ms: Option<i64> =
                sqlx::query_scalar(AssertSqlSafe(self.inner.sql.remaining.clone()))
                    .bind(key.group)
                    .bind(key.name)
                    .bind(key.key)
                    .fetch_optional(&self.inner.pool)
                    .await
                    .map_err(db_err("could not read the idempotency lease"))?;
            Ok(ms
                .filter(|ms| *ms > 0)
                .map(|ms| Duration::from_millis(ms.unsigned_abs())))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency lease", fut))
    }

    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(bounded(
            self.inner.timeout,
            "idempotency begin",
            self.begin_inner(key, lease),
        ))
    }

    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        // A key done longer ago than the retention counts as new, as in `begin`/`mark`.
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.done.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(millis(self.inner.retention))
                .fetch_optional(&self.inner.pool)
                .await
                .map(|row| row.is_some())
                .map_err(db_err("could not look up the inbox key"))
        };
        Box::pin(bounded(self.inner.timeout, "inbox lookup", fut))
    }

    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        _lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.complete.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .execute(&self.inner.pool)
                .await
                .map(drop)
                .map_err(db_err("could not complete the idempotency key"))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency complete", fut))
    }

    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.release.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(lease.token.to_string())
                .execute(&self.inner.pool)
                .await
                .map(drop)
                .map_err(db_err("could not release the idempotency key"))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency release", fut))
    }
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
        Ok(Err(e)) => Err(StoreError::new(format!(
            "could not open SQLite database {}",
            path.as_ref().display()
        ))
        .with_source(e)),
        Err(_) => Err(StoreError::new("opening the SQLite database took over 15s")),
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
