//! The SQLite idempotency store and transactional inbox.
//!
//! Times are Unix milliseconds from SQLite's own clock. SQLite has one writer at a time:
//! call [`SqliteStore::mark`] first in your transaction, so the transaction takes the
//! write lock at once instead of upgrading a read (which can fail with `SQLITE_BUSY`).

use super::{
    StoreError,
    sql::{Inbox, InboxSql, Look, Param, Stmt, sql_inbox},
};
pub use crate::sql::sqlite::open;
use crate::sql::{Dialect, Setup, Table, sqlite::Lite};
use sqlx::{SqliteConnection, SqlitePool};
use std::sync::Arc;

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
    inner: Arc<Inbox<Lite>>,
}

sql_inbox!(SqliteStore, SqlitePool, SqliteConnection);

/// The statements, and how a look is answered (one statement each).
fn statements(t: &Table) -> (InboxSql, Look) {
    let r = |s: &str| Lite::render(t, s);
    use Param::{Fingerprint, Lease, Retention, Token};
    let inbox = InboxSql {
        take: Stmt {
            sql: r(
                "INSERT INTO {table} (grp, name, key, state, token, lease_until, fingerprint) \
             VALUES (?1, ?2, ?3, 'held', ?4, {now} + ?5, ?7) \
             ON CONFLICT (grp, name, key) DO UPDATE \
             SET state = 'held', token = excluded.token, lease_until = excluded.lease_until, done_at = NULL, \
                 fingerprint = excluded.fingerprint \
             WHERE (state = 'held' AND lease_until <= {now}) \
                OR (state = 'done' AND done_at <= {now} - ?6) \
             RETURNING token",
            ),
            params: &[Token, Lease, Retention, Fingerprint],
        },
        holds: None,
        state: r("SELECT state FROM {table} WHERE grp = ?1 AND name = ?2 AND key = ?3"),
        fingerprint: r("SELECT fingerprint FROM {table} WHERE grp = ?1 AND name = ?2 AND key = ?3"),
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
        mark: Stmt {
            sql: r(
                "INSERT INTO {table} (grp, name, key, state, done_at, fingerprint) \
             VALUES (?1, ?2, ?3, 'done', {now}, ?5) \
             ON CONFLICT (grp, name, key) DO UPDATE \
             SET state = 'done', done_at = {now}, token = NULL, lease_until = NULL, \
                 fingerprint = coalesce(excluded.fingerprint, fingerprint) \
             WHERE state = 'held' OR (state = 'done' AND done_at <= {now} - ?4) \
             RETURNING 1",
            ),
            params: &[Retention, Fingerprint],
        },
        cleanup: r("DELETE FROM {table} \
             WHERE (state = 'done' AND done_at < {now} - ?1) \
                OR (state = 'held' AND lease_until < {now} - 3600000)"),
    };
    (
        inbox,
        Look::One(r("SELECT 1 FROM {table} \
             WHERE grp = ?1 AND name = ?2 AND key = ?3 AND state = 'done' \
               AND done_at > {now} - ?4")),
    )
}

impl SqliteStore {
    fn build(pool: SqlitePool, setup: Setup) -> Self {
        let (sql, look) = statements(&setup.table);
        Self {
            inner: Arc::new(Inbox::new(pool, setup, sql, look)),
        }
    }

    /// Creates the table if it does not exist, and warns about unsafe settings (a
    /// journal mode other than WAL, `synchronous` below FULL). Tables of earlier versions
    /// get the `fingerprint` column.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (pool, setup) = (&self.inner.pool, self.setup());
        crate::sql::sqlite::migrate(pool, self.schema_sql(), setup.timeout).await?;
        crate::sql::sqlite::add_column(pool, &setup.table, "fingerprint", "TEXT", setup.timeout)
            .await
    }
}
