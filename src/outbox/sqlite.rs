//! The SQLite outbox: `enqueue` in your transaction, published by **one** [`Relay`]
//! that polls (SQLite has no `LISTEN`; a wake-up from this process's own enqueues
//! shortens the wait).
//!
//! One relay per database file: SQLite has no `SKIP LOCKED`. Claims are still atomic
//! (SQLite serialises writers) and leased, so a second relay by mistake causes no loss,
//! only the contention of two writers on one file.
//!
//! [`Relay`]: super::Relay

use super::{
    Backlog, Claimed, FailedRow, OutboxSource, OutboxStatus, ParkedRow, envelope_from_row,
    headers_json,
    steps::{
        BACKLOG, CLAIM, DELETE_SENT, ENQUEUE, FAILED, PARKED, PENDING, PURGE, REQUEUE, SENT, STATUS,
    },
};
use crate::{
    envelope::{Envelope, MessageId},
    sql::{Setup, Step, StoreError, Table, bounded, db_err, millis, run, sqlite::NOW_MS},
};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, Row, SqliteConnection, SqlitePool};
use std::{fmt, sync::Arc, time::Duration};
use tokio::sync::Notify;

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
    pool: SqlitePool,
    setup: Setup,
    sql: Sql,
    wake: Notify,
}

struct Sql {
    insert: Arc<str>,
    claim: Arc<str>,
    sent: Arc<str>,
    delete_sent: Arc<str>,
    failed: Arc<str>,
    purge: Arc<str>,
    parked: Arc<str>,
    requeue: Arc<str>,
    pending: Arc<str>,
    backlog: Arc<str>,
}

impl Sql {
    fn new(t: &Table) -> Self {
        let r = |s: &str| Arc::<str>::from(t.render(s).replace("{now}", NOW_MS));
        Self {
            insert: r(
                "INSERT INTO {table} (id, name, source, time, headers, payload, available_at, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, {now}, {now})",
            ),
            claim: r("UPDATE {table} SET available_at = {now} + ?2 \
                 WHERE seq IN (SELECT seq FROM {table} \
                    WHERE state = 'pending' AND available_at <= {now} ORDER BY seq LIMIT ?1) \
                 RETURNING id, seq, name, source, time, headers, payload, attempts"),
            // Ids are bound as a JSON array: one statement whatever the batch size.
            sent: r("UPDATE {table} SET state = 'sent', sent_at = {now} \
                 WHERE id IN (SELECT value FROM json_each(?1))"),
            delete_sent: r("DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?1))"),
            failed: r(
                "UPDATE {table} SET attempts = attempts + 1, last_error = ?2, \
                 state = CASE WHEN ?3 THEN 'parked' ELSE 'pending' END, \
                 available_at = {now} + ?4 WHERE id = ?1",
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
            pending: r("SELECT count(*) FROM {table} WHERE state = 'pending'"),
            backlog: r(
                "SELECT count(*), coalesce({now} - min(created_at), 0) FROM {table} WHERE state = 'pending'",
            ),
        }
    }
}

impl fmt::Debug for SqliteOutbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteOutbox")
            .field("table", &self.inner.setup.table.name)
            .finish_non_exhaustive()
    }
}

impl SqliteOutbox {
    /// An outbox in table `steadfast_outbox`.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, Setup::new("steadfast_outbox"))
    }

    fn build(pool: SqlitePool, setup: Setup) -> Self {
        let sql = Sql::new(&setup.table);
        Self {
            inner: Arc::new(Inner {
                pool,
                setup,
                sql,
                wake: Notify::new(),
            }),
        }
    }

    fn setup(&self) -> &Setup {
        &self.inner.setup
    }

    fn rebuild(&self, setup: Setup) -> Self {
        Self::build(self.inner.pool.clone(), setup)
    }

    crate::sql::store_methods!();
    super::enqueue_methods!(SqliteConnection);

    /// Creates the table if it does not exist and warns about unsafe settings.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        crate::sql::sqlite::migrate(&self.inner.pool, self.schema_sql(), self.setup().timeout).await
    }

    /// Writes a ready-made envelope in your transaction.
    pub async fn enqueue_envelope(
        &self,
        conn: &mut SqliteConnection,
        envelope: Envelope,
    ) -> Result<MessageId, StoreError> {
        let insert = sqlx::query(AssertSqlSafe(self.inner.sql.insert.clone()))
            .bind(envelope.id.to_string())
            .bind(&envelope.name)
            .bind(&envelope.source)
            .bind(&envelope.time)
            .bind(headers_json(&envelope.headers))
            .bind(&envelope.payload[..]);
        run(self.setup().timeout, ENQUEUE, insert.execute(conn)).await?;
        // Before the commit: the relay may look too early and then waits one poll
        // interval; never a loss, since every claim reads all pending rows.
        self.inner.wake.notify_one();
        Ok(envelope.id)
    }

    /// Up to `limit` parked rows, oldest first, with their errors.
    pub async fn parked(&self, limit: i64) -> Result<Vec<ParkedRow>, StoreError> {
        let q = sqlx::query_as::<_, (String, String, i64, String)>(AssertSqlSafe(
            self.inner.sql.parked.clone(),
        ))
        .bind(limit);
        let rows = run(self.setup().timeout, PARKED, q.fetch_all(&self.inner.pool)).await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, attempts, error)| ParkedRow {
                id: id.parse().unwrap_or_else(|_| MessageId::nil()),
                name,
                attempts: u32::try_from(attempts).unwrap_or(0),
                error,
            })
            .collect())
    }

    /// Puts a parked row back in line. Returns whether it was parked.
    pub async fn requeue(&self, id: MessageId) -> Result<bool, StoreError> {
        let q = sqlx::query(AssertSqlSafe(self.inner.sql.requeue.clone())).bind(id.to_string());
        let done = run(self.setup().timeout, REQUEUE, q.execute(&self.inner.pool)).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Pending and parked rows and the age of the oldest pending one, in one query.
    pub async fn status(&self) -> Result<OutboxStatus, StoreError> {
        const SQL: &str = "SELECT coalesce(sum(state = 'pending'), 0), coalesce(sum(state = 'parked'), 0), ({now} - min(CASE WHEN state = 'pending' THEN created_at END)) / 1000.0 FROM {table}";
        let q = sqlx::query_as::<_, (i64, i64, Option<f64>)>(AssertSqlSafe(
            self.setup().table.render(SQL).replace("{now}", NOW_MS),
        ));
        let (pending, parked, oldest) =
            run(self.setup().timeout, STATUS, q.fetch_one(&self.inner.pool)).await?;
        Ok(OutboxStatus::new(pending, parked, oldest))
    }

    /// How many rows wait to be published.
    pub async fn pending(&self) -> Result<i64, StoreError> {
        let q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.inner.sql.pending.clone()));
        run(self.setup().timeout, PENDING, q.fetch_one(&self.inner.pool)).await
    }

    async fn claim_inner(&self, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.claim.clone()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(millis(lease))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_err(CLAIM.failed))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let read = || -> Result<(i64, Claimed), sqlx::Error> {
                let id: String = r.try_get(0)?;
                let id: MessageId = id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                let seq: i64 = r.try_get(1)?;
                let headers: String = r.try_get(5)?;
                let env = envelope_from_row(
                    id,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    &headers,
                    r.try_get(6)?,
                );
                let attempts = u32::try_from(r.try_get::<i64, _>(7)?).unwrap_or(0);
                Ok((seq, Claimed::new(env, attempts)))
            };
            out.push(read().map_err(db_err("could not read a claimed outbox row"))?);
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }
}

impl SqliteOutbox {
    /// Runs `sql` with `ids` as its JSON array parameter, as `step`.
    async fn by_ids(
        &self,
        sql: &Arc<str>,
        ids: &[MessageId],
        step: Step,
    ) -> Result<(), StoreError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
        let q = sqlx::query(AssertSqlSafe(sql.clone())).bind(json);
        run(self.setup().timeout, step, q.execute(&self.inner.pool))
            .await
            .map(drop)
    }
}

impl OutboxSource for SqliteOutbox {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Option<Backlog>, StoreError>> {
        let q = sqlx::query_as::<_, (i64, i64)>(AssertSqlSafe(self.inner.sql.backlog.clone()));
        let fut = run(self.setup().timeout, BACKLOG, q.fetch_one(&self.inner.pool));
        Box::pin(async move {
            let (n, age_ms) = fut.await?;
            Ok(Some(Backlog::new(
                u64::try_from(n).unwrap_or(0),
                Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
            )))
        })
    }

    fn claim(
        &self,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        Box::pin(bounded(
            self.setup().timeout,
            CLAIM.doing,
            self.claim_inner(limit, lease),
        ))
    }

    fn mark_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.by_ids(&self.inner.sql.sent, ids, SENT))
    }

    fn delete_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.by_ids(&self.inner.sql.delete_sent, ids, DELETE_SENT))
    }

    fn mark_failed<'a>(&'a self, rows: &'a [FailedRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        let fut = async move {
            for row in rows {
                sqlx::query(AssertSqlSafe(self.inner.sql.failed.clone()))
                    .bind(row.id.to_string())
                    .bind(crate::envelope::truncate(&row.error, 2000))
                    .bind(row.park)
                    .bind(millis(row.retry_after))
                    .execute(&self.inner.pool)
                    .await
                    .map_err(db_err(FAILED.failed))?;
            }
            Ok(())
        };
        Box::pin(bounded(self.setup().timeout, FAILED.doing, fut))
    }

    fn purge_sent(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        let q = sqlx::query(AssertSqlSafe(self.inner.sql.purge.clone())).bind(millis(older_than));
        let fut = run(self.setup().timeout, PURGE, q.execute(&self.inner.pool));
        Box::pin(async move { Ok(fut.await?.rows_affected()) })
    }

    fn wait(&self, max: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // A wake-up may come before its transaction committed: look again shortly.
            if tokio::time::timeout(max, self.inner.wake.notified())
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(5).min(max)).await;
            }
        })
    }
}
