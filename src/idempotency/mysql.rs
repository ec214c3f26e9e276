//! The MySQL / MariaDB idempotency store and transactional inbox.
//!
//! Times are Unix milliseconds from the server's clock. MySQL has no `RETURNING` on an
//! upsert, so taking a key and marking it are an upsert that writes a fresh token only
//! when it wins, and a read of that token: two statements where PostgreSQL needs one.

use super::{
    Begin, Fingerprint, IdempotencyStore, Key, Lease, StoreError, TakeKey, begin_with,
    steps::{CLEANUP, COMPLETE, FINGERPRINT, LOOK, MARK, RELEASE, REMAINING, STATE, TAKE},
    stored_fingerprint,
};
pub use crate::sql::mysql::connect;
use crate::sql::{Setup, Table, bounded, keyed, keyed_scalar, millis, mysql::NOW_MS, run};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool};
use std::{fmt, sync::Arc, time::Duration};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../sql/mysql/inbox.sql");

/// Idempotency keys and the transactional inbox in a MySQL 8.0+ or MariaDB 10.6+ table
/// (default `steadfast_inbox`). The same contract as
/// [`PostgresStore`](super::PostgresStore): give it to the worker and call
/// [`mark`](Self::mark) in your handler's transaction.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use steadfast::idempotency::{MySqlStore, mysql::connect};
/// let pool = connect("mysql://app@127.0.0.1:3306/app").await?;
/// let inbox = MySqlStore::new(pool.clone());
/// inbox.migrate().await?; // warns about innodb_flush_log_at_trx_commit, sync_binlog
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    setup: Setup,
    sql: Sql,
}

struct Sql {
    begin: Arc<str>,
    holds: Arc<str>,
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
        // In `ON DUPLICATE KEY UPDATE` each assignment sees the ones before it: the token
        // is decided first, on the old row, and the other columns follow it.
        Self {
            // ?1-3 key, ?4 token, ?5 lease, ?6 fingerprint, ?7 retention, ?8 token,
            // ?9 token, ?10 token, ?11 lease, ?12 token, ?13 token, ?14 fingerprint.
            begin: r(
                "INSERT INTO {table} (grp, name, `key`, state, token, lease_until, fingerprint) \
                 VALUES (?, ?, ?, 'held', ?, {now} + ?, ?) \
                 ON DUPLICATE KEY UPDATE \
                 token = IF((state = 'held' AND lease_until <= {now}) \
                    OR (state = 'done' AND done_at <= {now} - ?), ?, token), \
                 state = IF(token = ?, 'held', state), \
                 lease_until = IF(token = ?, {now} + ?, lease_until), \
                 done_at = IF(token = ?, NULL, done_at), \
                 fingerprint = IF(token = ?, ?, fingerprint)",
            ),
            holds: r(
                "SELECT 1 FROM {table} WHERE grp = ? AND name = ? AND `key` = ? AND token = ?",
            ),
            state: r("SELECT state FROM {table} WHERE grp = ? AND name = ? AND `key` = ?"),
            fingerprint: r(
                "SELECT fingerprint FROM {table} WHERE grp = ? AND name = ? AND `key` = ?",
            ),
            done: r("SELECT 1 FROM {table} \
                 WHERE grp = ? AND name = ? AND `key` = ? AND state = 'done' AND done_at > {now} - ?"),
            complete: r(
                "INSERT INTO {table} (grp, name, `key`, state, done_at, fingerprint) \
                 VALUES (?, ?, ?, 'done', {now}, ?) \
                 ON DUPLICATE KEY UPDATE \
                 done_at = IF(state = 'held', {now}, done_at), \
                 lease_until = IF(state = 'held', NULL, lease_until), \
                 state = 'done'",
            ),
            release: r("DELETE FROM {table} \
                 WHERE grp = ? AND name = ? AND `key` = ? AND state = 'held' AND token = ?"),
            remaining: r("SELECT lease_until - {now} FROM {table} \
                 WHERE grp = ? AND name = ? AND `key` = ? AND state = 'held' AND lease_until > {now}"),
            // ?1-3 key, ?4 token, ?5 fingerprint, ?6 retention, ?7 token, ?8 token,
            // ?9 token, ?10 token, ?11 fingerprint.
            mark: r(
                "INSERT INTO {table} (grp, name, `key`, state, token, done_at, fingerprint) \
                 VALUES (?, ?, ?, 'done', ?, {now}, ?) \
                 ON DUPLICATE KEY UPDATE \
                 token = IF(state = 'held' OR (state = 'done' AND done_at <= {now} - ?), ?, token), \
                 done_at = IF(token = ?, {now}, done_at), \
                 lease_until = IF(token = ?, NULL, lease_until), \
                 state = IF(token = ?, 'done', state), \
                 fingerprint = IF(token = ?, COALESCE(?, fingerprint), fingerprint)",
            ),
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < {now} - ?) \
                    OR (state = 'held' AND lease_until < {now} - 3600000)"),
        }
    }
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.inner.setup.table.name)
            .field("retention", &self.inner.setup.retention)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// A store in table `steadfast_inbox`, keeping completed keys for 7 days.
    pub fn new(pool: MySqlPool) -> Self {
        Self::build(pool, Setup::new("steadfast_inbox"))
    }

    fn build(pool: MySqlPool, setup: Setup) -> Self {
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
    super::inbox_methods!(MySqlConnection);

    /// Creates the table if it does not exist, and warns about unsafe settings
    /// (`innodb_flush_log_at_trx_commit` ≠ 1, `sync_binlog` ≠ 1 with binary logging on,
    /// `READ-UNCOMMITTED` isolation).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        crate::sql::mysql::migrate(&self.inner.pool, self.schema_sql(), self.setup().timeout).await
    }

    /// [`mark`](Self::mark) for an explicit key.
    pub async fn mark_key(
        &self,
        conn: &mut MySqlConnection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let token = Uuid::now_v7().to_string();
        let fingerprint = key.fingerprint_text();
        let q = keyed(&self.inner.sql.mark, key.parts())
            .bind(&token)
            .bind(&fingerprint)
            .bind(millis(self.setup().retention))
            .bind(&token)
            .bind(&token)
            .bind(&token)
            .bind(&token)
            .bind(&token)
            .bind(&fingerprint);
        let timeout = self.setup().timeout;
        run(timeout, MARK, q.execute(&mut *conn)).await?;
        // The row is locked by this transaction now: it holds this token if and only if
        // this mark won it.
        let holds = keyed(&self.inner.sql.holds, key.parts()).bind(&token);
        Ok(run(timeout, MARK, holds.fetch_optional(conn))
            .await?
            .is_some())
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

impl TakeKey for MySqlStore {
    fn take<'a>(
        &'a self,
        key: Key<'a>,
        token: Uuid,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let token = token.to_string();
            let lease = millis(lease);
            let fingerprint = key.fingerprint_text();
            let q = keyed(&self.inner.sql.begin, key.parts())
                .bind(&token)
                .bind(lease)
                .bind(&fingerprint)
                .bind(millis(self.setup().retention))
                .bind(&token)
                .bind(&token)
                .bind(&token)
                .bind(lease)
                .bind(&token)
                .bind(&token)
                .bind(&fingerprint);
            let timeout = self.setup().timeout;
            run(timeout, TAKE, q.execute(&self.inner.pool)).await?;
            let holds = keyed(&self.inner.sql.holds, key.parts()).bind(&token);
            let row = run(timeout, TAKE, holds.fetch_optional(&self.inner.pool)).await?;
            Ok(row.is_some())
        })
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

impl IdempotencyStore for MySqlStore {
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
