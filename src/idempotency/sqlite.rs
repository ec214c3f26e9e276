//! The SQLite idempotency store and transactional inbox.
//!
//! Times are Unix milliseconds from SQLite's own clock. SQLite has one writer at a time:
//! call [`SqliteStore::mark`] first in your transaction, so the transaction takes the
//! write lock at once instead of upgrading a read (which can fail with `SQLITE_BUSY`).

use super::{
    Begin, Fingerprint, IdempotencyStore, Key, Lease, StoreError, TakeKey, begin_with,
    steps::{CLEANUP, COMPLETE, FINGERPRINT, LOOK, MARK, RELEASE, REMAINING, STATE, TAKE},
    stored_fingerprint,
};
pub use crate::sql::sqlite::open;
use crate::sql::{Setup, Table, bounded, keyed, keyed_scalar, millis, run, sqlite::NOW_MS};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, SqliteConnection, SqlitePool};
use std::{fmt, sync::Arc, time::Duration};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../sql/sqlite/inbox.sql");

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
    setup: Setup,
    sql: Sql,
}

struct Sql {
    begin: Arc<str>,
    state: Arc<str>,
    fingerprint: Arc<str>,
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
                "INSERT INTO {table} (grp, name, key, state, token, lease_until, fingerprint) \
                 VALUES (?1, ?2, ?3, 'held', ?4, {now} + ?5, ?7) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'held', token = excluded.token, lease_until = excluded.lease_until, done_at = NULL, \
                     fingerprint = excluded.fingerprint \
                 WHERE (state = 'held' AND lease_until <= {now}) \
                    OR (state = 'done' AND done_at <= {now} - ?6) \
                 RETURNING token",
            ),
            state: r("SELECT state FROM {table} WHERE grp = ?1 AND name = ?2 AND key = ?3"),
            fingerprint: r(
                "SELECT fingerprint FROM {table} WHERE grp = ?1 AND name = ?2 AND key = ?3",
            ),
            done: r("SELECT 1 FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'done' \
                   AND done_at > {now} - ?4"),
            complete: r(
                "INSERT INTO {table} (grp, name, key, state, done_at, fingerprint) \
                 VALUES (?1, ?2, ?3, 'done', {now}, ?4) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = {now}, token = NULL, lease_until = NULL \
                 WHERE state = 'held'",
            ),
            release: r("DELETE FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'held' AND token = ?4"),
            remaining: r("SELECT lease_until - {now} FROM {table} \
                 WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'held' AND lease_until > {now}"),
            mark: r(
                "INSERT INTO {table} (grp, name, key, state, done_at, fingerprint) \
                 VALUES (?1, ?2, ?3, 'done', {now}, ?5) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = {now}, token = NULL, lease_until = NULL, \
                     fingerprint = coalesce(excluded.fingerprint, fingerprint) \
                 WHERE state = 'held' OR (state = 'done' AND done_at <= {now} - ?4) \
                 RETURNING 1",
            ),
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < {now} - ?1) \
                    OR (state = 'held' AND lease_until < {now} - 3600000)"),
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.inner.setup.table.name)
            .field("retention", &self.inner.setup.retention)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// A store in table `steadfast_inbox`, keeping completed keys for 7 days.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, Setup::new("steadfast_inbox"))
    }

    fn build(pool: SqlitePool, setup: Setup) -> Self {
        let sql = Sql::new(&setup.table);
        Self {
            inner: Arc::new(Inner { pool, setup, sql }),
        }
    }

    fn setup(&self) -> &Setup {
        &self.inner.setup
    }

    fn rebuild(&self, setup: Setup) -> Self {
        Self::build(self.inner.pool.clone(), setup)
    }

    crate::sql::store_methods!();
    super::inbox_methods!(SqliteConnection);

    /// Creates the table if it does not exist, and warns about unsafe settings (a
    /// journal mode other than WAL, `synchronous` below FULL). Tables of earlier versions
    /// get the `fingerprint` column.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (pool, setup) = (&self.inner.pool, self.setup());
        crate::sql::sqlite::migrate(pool, self.schema_sql(), setup.timeout).await?;
        crate::sql::sqlite::add_column(pool, &setup.table, "fingerprint", "TEXT", setup.timeout)
            .await
    }

    /// [`mark`](Self::mark) for an explicit key.
    pub async fn mark_key(
        &self,
        conn: &mut SqliteConnection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let q = keyed(&self.inner.sql.mark, key.parts())
            .bind(millis(self.setup().retention))
            .bind(key.fingerprint_text());
        let row = run(self.setup().timeout, MARK, q.fetch_optional(conn)).await?;
        Ok(row.is_some())
    }

    /// Deletes completed keys older than the retention and leases abandoned for over an
    /// hour; returns how many rows went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let q = sqlx::query(AssertSqlSafe(self.inner.sql.cleanup.clone()))
            .bind(millis(self.setup().retention));
        let done = run(self.setup().timeout, CLEANUP, q.execute(&self.inner.pool)).await?;
        Ok(done.rows_affected())
    }
}

impl TakeKey for SqliteStore {
    fn take<'a>(
        &'a self,
        key: Key<'a>,
        token: Uuid,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let q = keyed(&self.inner.sql.begin, key.parts())
            .bind(token.to_string())
            .bind(millis(lease))
            .bind(millis(self.setup().retention))
            .bind(key.fingerprint_text());
        let fut = run(
            self.setup().timeout,
            TAKE,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move { Ok(fut.await?.is_some()) })
    }

    fn state<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.state, key.parts());
        Box::pin(run(
            self.setup().timeout,
            STATE,
            q.fetch_optional(&self.inner.pool),
        ))
    }
}

impl IdempotencyStore for SqliteStore {
    fn fingerprint<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Fingerprint>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.fingerprint, key.parts());
        let fut = run(
            self.setup().timeout,
            FINGERPRINT,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move { Ok(stored_fingerprint(fut.await?)) })
    }

    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.remaining, key.parts());
        let fut = run(
            self.setup().timeout,
            REMAINING,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move {
            let ms: Option<i64> = fut.await?;
            Ok(ms
                .filter(|ms| *ms > 0)
                .map(|ms| Duration::from_millis(ms.unsigned_abs())))
        })
    }

    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(bounded(
            self.setup().timeout,
            "idempotency begin",
            begin_with(self, key, lease),
        ))
    }

    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        // A key done longer ago than the retention counts as new, as in `begin`/`mark`.
        let q = keyed(&self.inner.sql.done, key.parts()).bind(millis(self.setup().retention));
        let fut = run(
            self.setup().timeout,
            LOOK,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move { Ok(fut.await?.is_some()) })
    }

    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        _lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let q = keyed(&self.inner.sql.complete, key.parts()).bind(key.fingerprint_text());
        let fut = run(self.setup().timeout, COMPLETE, q.execute(&self.inner.pool));
        Box::pin(async move { fut.await.map(drop) })
    }

    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let q = keyed(&self.inner.sql.release, key.parts()).bind(lease.token.to_string());
        let fut = run(self.setup().timeout, RELEASE, q.execute(&self.inner.pool));
        Box::pin(async move { fut.await.map(drop) })
    }
}
