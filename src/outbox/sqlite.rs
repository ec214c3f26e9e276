//! The SQLite outbox: `enqueue` in your transaction, published by **one** [`Relay`]
//! that polls (SQLite has no `LISTEN`; a wake-up from this process's own enqueues
//! shortens the wait).
//!
//! One relay per database file: SQLite has no `SKIP LOCKED`. Claims are still atomic
//! (SQLite serialises writers) and leased, so a second relay by mistake causes no loss,
//! only the contention of two writers on one file.
//!
//! [`Relay`]: super::Relay

use super::sql::{Outbox, OutboxDialect, OutboxSql, sql_outbox};
use crate::{
    envelope::{Envelope, MessageId},
    sql::{Dialect, Setup, StoreError, Table, sqlite::Lite},
};
use sqlx::{AssertSqlSafe, SqliteConnection, SqlitePool};
use std::{sync::Arc, time::Duration};

const SCHEMA: &str = include_str!("../../sql/sqlite/outbox.sql");

/// An outbox table in SQLite (default `steadfast_outbox`). Cheap to clone.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use steadfast::{Message, idempotency::sqlite::open, outbox::SqliteOutbox};
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced { order_id: i64 }
///
/// let pool = open("orders.db").await?;
/// let outbox = SqliteOutbox::new(pool.clone());
/// outbox.migrate().await?;
/// let mut tx = pool.begin().await?;
/// outbox.enqueue(&mut tx, &OrderPlaced { order_id: 7 }).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    core: Outbox<Lite>,
    claim: Arc<str>,
}

impl OutboxDialect for Lite {
    type Attempts = i64;

    /// Ids are bound as a JSON array: one statement whatever the batch size.
    fn by_ids(
        sql: &Arc<str>,
        ids: &[MessageId],
    ) -> Option<sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
        Some(sqlx::query(AssertSqlSafe(sql.clone())).bind(json))
    }
}

/// The statements, and the claim.
fn statements(t: &Table) -> (OutboxSql, Arc<str>) {
    let r = |s: &str| Lite::render(t, s);
    let claim = r("UPDATE {table} SET available_at = {now} + ?2 \
         WHERE seq IN (SELECT seq FROM {table} \
            WHERE state = 'pending' AND available_at <= {now} ORDER BY seq LIMIT ?1) \
         RETURNING id, seq, name, source, time, headers, payload, attempts");
    let sql = OutboxSql {
        insert: r(
            "INSERT INTO {table} (id, name, source, time, headers, payload, available_at, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, {now}, {now})",
        ),
        sent: r("UPDATE {table} SET state = 'sent', sent_at = {now} \
                 WHERE id IN (SELECT value FROM json_each(?1))"),
        delete_sent: r("DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?1))"),
        failed: r(
            "UPDATE {table} SET attempts = attempts + 1, last_error = ?1, \
                 state = CASE WHEN ?2 THEN 'parked' ELSE 'pending' END, \
                 available_at = {now} + ?3 WHERE id = ?4",
        ),
        purge: r("DELETE FROM {table} WHERE state = 'sent' AND sent_at < {now} - ?1"),
        parked: r(
            "SELECT id, name, attempts, coalesce(last_error, '') FROM {table} \
                 WHERE state = 'parked' ORDER BY seq LIMIT ?1",
        ),
        requeue: r(
            "UPDATE {table} SET state = 'pending', attempts = 0, available_at = {now} \
                 WHERE id = ?1 AND state = 'parked'",
        ),
        delete_parked: r("DELETE FROM {table} WHERE id = ?1 AND state = 'parked'"),
        pending: r("SELECT count(*) FROM {table} WHERE state = 'pending'"),
        backlog: r("SELECT count(*), coalesce({now} - min(created_at), 0), \
             (SELECT count(*) FROM {table} WHERE state = 'parked') FROM {table} WHERE state = 'pending'"),
        status: r(
            "SELECT coalesce(sum(state = 'pending'), 0), coalesce(sum(state = 'parked'), 0), \
                 ({now} - min(CASE WHEN state = 'pending' THEN created_at END)) / 1000.0 FROM {table}",
        ),
    };
    (sql, claim)
}

impl std::fmt::Debug for SqliteOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutbox")
            .field("table", &self.inner.core.setup.table.name)
            .finish_non_exhaustive()
    }
}

sql_outbox!(SqliteOutbox, "sqlite", {
    super::sql::returning_claim!(claim);

    fn wait(&self, max: Duration) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            // A wake-up may come before its transaction committed: look again shortly.
            if tokio::time::timeout(max, self.inner.core.wake.notified())
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(5).min(max)).await;
            }
        })
    }
});

impl SqliteOutbox {
    /// An outbox in table `steadfast_outbox`.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, Setup::new("steadfast_outbox"))
    }

    fn build(pool: SqlitePool, setup: Setup) -> Self {
        let (sql, claim) = statements(&setup.table);
        Self {
            inner: Arc::new(Inner {
                core: Outbox::new(pool, setup, sql),
                claim,
            }),
        }
    }

    fn rebuild(&self, setup: Setup) -> Self {
        Self::build(self.inner.core.pool.clone(), setup)
    }

    super::enqueue_methods!(SqliteConnection);

    /// Creates the table if it does not exist and warns about unsafe settings.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let core = &self.inner.core;
        crate::sql::sqlite::migrate(&core.pool, self.schema_sql(), core.setup.timeout).await
    }

    /// Writes a ready-made envelope in your transaction.
    pub async fn enqueue_envelope(
        &self,
        conn: &mut SqliteConnection,
        envelope: Envelope,
    ) -> Result<MessageId, StoreError> {
        let core = &self.inner.core;
        core.enqueue(conn, envelope, &core.sql.insert, None).await
    }
}
