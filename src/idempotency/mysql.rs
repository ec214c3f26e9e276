//! The MySQL / MariaDB idempotency store and transactional inbox.
//!
//! Times are Unix milliseconds from the server's clock. MySQL has no `RETURNING` on an
//! upsert, so taking a key and marking it are an upsert that writes a fresh token only
//! when it wins, and a read of that token: two statements where PostgreSQL needs one.

use super::{
    StoreError,
    sql::{Inbox, InboxSql, Look, Param, Stmt, sql_inbox},
};
pub use crate::sql::mysql::connect;
use crate::sql::{Dialect, Setup, Table, mysql::My};
use sqlx::{MySqlConnection, MySqlPool};
use std::sync::Arc;

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
    inner: Arc<Inbox<My>>,
}

sql_inbox!(MySqlStore, MySqlPool, MySqlConnection);

/// The statements, and how a look is answered (one statement each).
fn statements(t: &Table) -> (InboxSql, Look) {
    let r = |s: &str| My::render(t, s);
    use Param::{Fingerprint, Lease, Retention, Token};
    // In `ON DUPLICATE KEY UPDATE` each assignment sees the ones before it: the token
    // is decided first, on the old row, and the other columns follow it.
    let inbox = InboxSql {
        // Placeholders are positional: the parameters repeat in their order.
        take: Stmt {
            sql: r(
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
            params: &[
                Token,
                Lease,
                Fingerprint,
                Retention,
                Token,
                Token,
                Token,
                Lease,
                Token,
                Token,
                Fingerprint,
            ],
        },
        holds: Some(r(
            "SELECT 1 FROM {table} WHERE grp = ? AND name = ? AND `key` = ? AND token = ?",
        )),
        state: r("SELECT state FROM {table} WHERE grp = ? AND name = ? AND `key` = ?"),
        fingerprint: r("SELECT fingerprint FROM {table} WHERE grp = ? AND name = ? AND `key` = ?"),
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
        mark: Stmt {
            sql: r(
                "INSERT INTO {table} (grp, name, `key`, state, token, done_at, fingerprint) \
             VALUES (?, ?, ?, 'done', ?, {now}, ?) \
             ON DUPLICATE KEY UPDATE \
             token = IF(state = 'held' OR (state = 'done' AND done_at <= {now} - ?), ?, token), \
             done_at = IF(token = ?, {now}, done_at), \
             lease_until = IF(token = ?, NULL, lease_until), \
             state = IF(token = ?, 'done', state), \
             fingerprint = IF(token = ?, COALESCE(?, fingerprint), fingerprint)",
            ),
            params: &[
                Token,
                Fingerprint,
                Retention,
                Token,
                Token,
                Token,
                Token,
                Token,
                Fingerprint,
            ],
        },
        cleanup: r("DELETE FROM {table} \
             WHERE (state = 'done' AND done_at < {now} - ?) \
                OR (state = 'held' AND lease_until < {now} - 3600000)"),
    };
    (
        inbox,
        Look::One(r("SELECT 1 FROM {table} \
             WHERE grp = ? AND name = ? AND `key` = ? AND state = 'done' AND done_at > {now} - ?")),
    )
}

impl MySqlStore {
    fn build(pool: MySqlPool, setup: Setup) -> Self {
        let (sql, look) = statements(&setup.table);
        Self {
            inner: Arc::new(Inbox::new(pool, setup, sql, look)),
        }
    }

    /// Creates the table if it does not exist, and warns about unsafe settings
    /// (`innodb_flush_log_at_trx_commit` ≠ 1, `sync_binlog` ≠ 1 with binary logging on,
    /// `READ-UNCOMMITTED` isolation).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        crate::sql::mysql::migrate(&self.inner.pool, self.schema_sql(), self.setup().timeout).await
    }
}
