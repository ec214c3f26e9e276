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
    Backlog, Claimed, FailedRow, OutboxSource, OutboxStatus, ParkedRow, Table, bounded, db_err,
    encode, envelope_from_row, headers_json,
};
use crate::{
    Context, Message,
    envelope::{Envelope, MessageId},
    idempotency::{
        StoreError,
        sqlite::{NOW_MS, warn_unsafe_settings},
    },
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
    table: Table,
    timeout: Duration,
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
            .field("table", &self.inner.table.name)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteOutbox {
    /// An outbox in table `steadfast_outbox`.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(
            pool,
            Table::parse("steadfast_outbox").expect("a valid constant name"),
            Duration::from_secs(10),
        )
    }

    fn build(pool: SqlitePool, table: Table, timeout: Duration) -> Self {
        let sql = Sql::new(&table);
        Self {
            inner: Arc::new(Inner {
                pool,
                table,
                timeout,
                sql,
                wake: Notify::new(),
            }),
        }
    }

    /// Uses table `name` instead of `steadfast_outbox`.
    pub fn with_table(self, name: &str) -> Result<Self, StoreError> {
        let table = Table::parse(name)?;
        let i = &self.inner;
        Ok(Self::build(i.pool.clone(), table, i.timeout))
    }

    /// Bounds every relay-side database call (default 10 s).
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let i = &self.inner;
        Self::build(i.pool.clone(), i.table.clone(), timeout)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The SQL that creates the table, for your own migrations. Idempotent.
    pub fn schema_sql(&self) -> String {
        self.inner.table.render(SCHEMA)
    }

    /// Creates the table if it does not exist and warns about unsafe settings.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = self.schema_sql();
        let pool = &self.inner.pool;
        bounded(self.inner.timeout, "creating the outbox table", async {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(drop)
                .map_err(db_err("could not create the outbox table"))
        })
        .await?;
        warn_unsafe_settings(pool).await;
        Ok(())
    }

    /// Writes `msg` to the outbox in your transaction `conn` (`&mut tx` works). Published
    /// after the commit, never if the transaction rolls back. Returns the message id.
    pub async fn enqueue<M: Message>(
        &self,
        conn: &mut SqliteConnection,
        msg: &M,
    ) -> Result<MessageId, StoreError> {
        self.enqueue_envelope(conn, encode(msg, None)?).await
    }

    /// [`enqueue`](Self::enqueue) from a handler, carrying the delivery's trace context.
    pub async fn enqueue_from<M: Message>(
        &self,
        conn: &mut SqliteConnection,
        msg: &M,
        cx: &Context,
    ) -> Result<MessageId, StoreError> {
        self.enqueue_envelope(conn, encode(msg, Some(cx))?).await
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
        bounded(self.inner.timeout, "outbox enqueue", async {
            insert
                .execute(conn)
                .await
                .map_err(db_err("could not write the outbox row"))
        })
        .await?;
        // Before the commit: the relay may look too early and then waits one poll
        // interval; never a loss, since every claim reads all pending rows.
        self.inner.wake.notify_one();
        Ok(envelope.id)
    }

    /// Up to `limit` parked rows, oldest first, with their errors.
    pub async fn parked(&self, limit: i64) -> Result<Vec<ParkedRow>, StoreError> {
        let fut = async {
            let rows = sqlx::query(AssertSqlSafe(self.inner.sql.parked.clone()))
                .bind(limit)
                .fetch_all(&self.inner.pool)
                .await
                .map_err(db_err("could not list parked outbox rows"))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let read = || -> Result<ParkedRow, sqlx::Error> {
                    let id: String = r.try_get(0)?;
                    Ok(ParkedRow {
                        id: id.parse().unwrap_or_else(|_| MessageId::nil()),
                        name: r.try_get(1)?,
                        attempts: u32::try_from(r.try_get::<i64, _>(2)?).unwrap_or(0),
                        error: r.try_get(3)?,
                    })
                };
                out.push(read().map_err(db_err("could not read parked outbox rows"))?);
            }
            Ok(out)
        };
        bounded(self.inner.timeout, "listing parked rows", fut).await
    }

    /// Puts a parked row back in line. Returns whether it was parked.
    pub async fn requeue(&self, id: MessageId) -> Result<bool, StoreError> {
        let fut = async {
            sqlx::query(AssertSqlSafe(self.inner.sql.requeue.clone()))
                .bind(id.to_string())
                .execute(&self.inner.pool)
                .await
                .map(|r| r.rows_affected() == 1)
                .map_err(db_err("could not requeue the outbox row"))
        };
        bounded(self.inner.timeout, "requeueing a row", fut).await
    }

    /// Pending and parked rows and the age of the oldest pending one, in one query.
    pub async fn status(&self) -> Result<OutboxStatus, StoreError> {
        const SQL: &str = "SELECT coalesce(sum(state = 'pending'), 0), coalesce(sum(state = 'parked'), 0), ({now} - min(CASE WHEN state = 'pending' THEN created_at END)) / 1000.0 FROM {table}";
        let fut = async {
            let (pending, parked, oldest): (i64, i64, Option<f64>) = sqlx::query_as(AssertSqlSafe(
                self.inner.table.render(SQL).replace("{now}", NOW_MS),
            ))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db_err("could not read the outbox status"))?;
            Ok(OutboxStatus::new(pending, parked, oldest))
        };
        bounded(self.inner.timeout, "reading the outbox status", fut).await
    }

    /// How many rows wait to be published.
    pub async fn pending(&self) -> Result<i64, StoreError> {
        let fut = async {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.inner.sql.pending.clone()))
                .fetch_one(&self.inner.pool)
                .await
                .map_err(db_err("could not count pending outbox rows"))
        };
        bounded(self.inner.timeout, "counting pending rows", fut).await
    }

    async fn claim_inner(&self, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(self.inner.sql.claim.clone()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(millis(lease))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_err("could not claim outbox rows"))?;
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
    /// Runs `sql` with `ids` as its JSON array parameter, bounded; `what` names the step
    /// for a timeout and for a database error.
    async fn by_ids(
        &self,
        sql: &Arc<str>,
        ids: &[MessageId],
        what: (&'static str, &'static str),
    ) -> Result<(), StoreError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
        let fut = async move {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(json)
                .execute(&self.inner.pool)
                .await
                .map(drop)
                .map_err(db_err(what.1))
        };
        bounded(self.inner.timeout, what.0, fut).await
    }
}

impl OutboxSource for SqliteOutbox {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Option<Backlog>, StoreError>> {
        let fut = async {
            let (n, age_ms): (i64, i64) =
                sqlx::query_as(AssertSqlSafe(self.inner.sql.backlog.clone()))
                    .fetch_one(&self.inner.pool)
                    .await
                    .map_err(db_err("could not measure the outbox backlog"))?;
            Ok(Some(Backlog::new(
                u64::try_from(n).unwrap_or(0),
                Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
            )))
        };
        Box::pin(bounded(self.inner.timeout, "measuring the backlog", fut))
    }

    fn claim(
        &self,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        Box::pin(bounded(
            self.inner.timeout,
            "claiming outbox rows",
            self.claim_inner(limit, lease),
        ))
    }

    fn mark_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.by_ids(
            &self.inner.sql.sent,
            ids,
            ("marking rows sent", "could not mark outbox rows sent"),
        ))
    }

    fn delete_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.by_ids(
            &self.inner.sql.delete_sent,
            ids,
            ("deleting sent rows", "could not delete sent outbox rows"),
        ))
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
                    .map_err(db_err("could not record an outbox failure"))?;
            }
            Ok(())
        };
        Box::pin(bounded(self.inner.timeout, "recording failures", fut))
    }

    fn purge_sent(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.purge.clone()))
                .bind(millis(older_than))
                .execute(&self.inner.pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(db_err("could not purge sent outbox rows"))
        };
        Box::pin(bounded(self.inner.timeout, "purging sent rows", fut))
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
