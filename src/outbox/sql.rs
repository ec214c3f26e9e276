//! The SQL outbox, written once over a [`Dialect`]: enqueueing in the user's
//! transaction, the leased claim where the database returns the rows it updates, marking
//! rows sent, failed or parked, purging, the backlog and the parked rows. A database
//! supplies its statements ([`OutboxSql`]), how it binds a list of ids
//! ([`OutboxDialect`]), and what it alone does (PostgreSQL's `LISTEN/NOTIFY` and held
//! claims, MySQL's claim transaction and adaptive polling); `outbox/<db>.rs` holds those
//! and its public outbox type, made by [`sql_outbox!`](crate::outbox::sql::sql_outbox).

use super::{
    Backlog, Claimed, FailedRow, OutboxStatus, ParkedRow, envelope_from_row, headers_json,
    steps::{
        BACKLOG, CLAIM, DELETE_PARKED, ENQUEUE, FAILED, PARKED, PENDING, PURGE, REQUEUE, STATUS,
    },
};
use crate::{
    envelope::{Envelope, MessageId},
    sql::{Dialect, Setup, Step, StoreError, bounded, db_err, run},
};
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type,
    query::Query,
};
use std::{sync::Arc, time::Duration};
use tokio::sync::Notify;

/// How a database takes a list of message ids as one statement's parameter.
pub(crate) trait OutboxDialect: Dialect {
    /// The count of attempts as stored (`INT` or SQLite's `INTEGER`).
    type Attempts: crate::sql::Value<Self::Db> + Copy + Unpin;

    /// `sql` with `ids` bound as its list (`None`: nothing to run for an empty list).
    fn by_ids(
        sql: &Arc<str>,
        ids: &[MessageId],
    ) -> Option<Query<'static, Self::Db, <Self::Db as Database>::Arguments>>;
}

/// The outbox's statements in one database's SQL.
pub(crate) struct OutboxSql {
    /// Inserts a row: id, name, source, time, headers (JSON text), payload.
    pub(crate) insert: Arc<str>,
    /// Marks the listed rows sent.
    pub(crate) sent: Arc<str>,
    /// Deletes the listed rows (zero retention).
    pub(crate) delete_sent: Arc<str>,
    /// Records a failure: error, park, retry after, id.
    pub(crate) failed: Arc<str>,
    /// Deletes rows sent longer ago than the span bound.
    pub(crate) purge: Arc<str>,
    /// Parked rows, oldest first, up to the limit bound: id, name, attempts, error.
    pub(crate) parked: Arc<str>,
    /// Puts the parked row with the id bound back in line.
    pub(crate) requeue: Arc<str>,
    /// Deletes the row with the id bound if it is parked (never a pending or sent one).
    pub(crate) delete_parked: Arc<str>,
    /// The count of pending rows.
    pub(crate) pending: Arc<str>,
    /// The count of pending rows and the oldest one's age, as the dialect's span.
    pub(crate) backlog: Arc<str>,
    /// Pending and parked counts and the oldest pending row's age in seconds.
    pub(crate) status: Arc<str>,
}

/// An outbox in one table of one database.
pub(crate) struct Outbox<D: Dialect> {
    pub(crate) pool: Pool<D::Db>,
    pub(crate) setup: Setup,
    pub(crate) sql: OutboxSql,
    /// Woken by this process's enqueues, for databases without a notification.
    pub(crate) wake: Notify,
}

impl<D: OutboxDialect> Outbox<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db> + Type<D::Db>,
    String: for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db> + Type<D::Db>,
    Option<String>: for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db>,
    Vec<u8>: for<'r> Decode<'r, D::Db> + Type<D::Db>,
    i64: for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db> + Type<D::Db>,
    bool: for<'q> Encode<'q, D::Db> + Type<D::Db>,
    Option<f64>: for<'r> Decode<'r, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    u32: TryFrom<D::Attempts>,
{
    pub(crate) fn new(pool: Pool<D::Db>, setup: Setup, sql: OutboxSql) -> Self {
        Self {
            pool,
            setup,
            sql,
            wake: Notify::new(),
        }
    }

    fn timeout(&self) -> Duration {
        self.setup.timeout
    }

    /// Writes `envelope` with `sql` (the insert, or PostgreSQL's insert that notifies
    /// `channel`) in the user's transaction on `conn`.
    pub(crate) async fn enqueue(
        &self,
        conn: &mut <D::Db as Database>::Connection,
        envelope: Envelope,
        sql: &Arc<str>,
        channel: Option<&str>,
    ) -> Result<MessageId, StoreError> {
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(D::uuid(*envelope.id.as_uuid()))
            .bind(envelope.name.as_str())
            .bind(envelope.source.clone())
            .bind(envelope.time.clone())
            .bind(headers_json(&envelope.headers))
            .bind(&envelope.payload[..]);
        if let Some(channel) = channel {
            q = q.bind(channel);
        }
        run(self.timeout(), ENQUEUE, q.execute(conn)).await?;
        // Before the commit: a relay woken by it may look too early and then waits one
        // poll; never a loss, since every claim reads all pending rows.
        self.wake.notify_one();
        Ok(envelope.id)
    }

    pub(crate) async fn parked(&self, limit: i64) -> Result<Vec<ParkedRow>, StoreError> {
        let q = sqlx::query_as::<_, (D::Uuid, String, D::Attempts, String)>(AssertSqlSafe(
            self.sql.parked.clone(),
        ))
        .bind(limit);
        let rows = run(self.timeout(), PARKED, q.fetch_all(&self.pool)).await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, attempts, error)| ParkedRow {
                id: D::read_uuid(id).map_or_else(|_| MessageId::nil(), MessageId::from),
                name,
                attempts: u32::try_from(attempts).unwrap_or(0),
                error,
            })
            .collect())
    }

    pub(crate) async fn requeue(&self, id: MessageId) -> Result<bool, StoreError> {
        self.on_parked(&self.sql.requeue, id, REQUEUE).await
    }

    pub(crate) async fn delete_parked(&self, id: MessageId) -> Result<bool, StoreError> {
        self.on_parked(&self.sql.delete_parked, id, DELETE_PARKED)
            .await
    }

    /// Runs `sql` on the parked row `id` (bound first) as `step`: whether it was parked.
    async fn on_parked(
        &self,
        sql: &Arc<str>,
        id: MessageId,
        step: Step,
    ) -> Result<bool, StoreError> {
        let q = sqlx::query(AssertSqlSafe(sql.clone())).bind(D::uuid(*id.as_uuid()));
        let done = run(self.timeout(), step, q.execute(&self.pool)).await?;
        Ok(D::rows_affected(&done) == 1)
    }

    pub(crate) async fn status(&self) -> Result<OutboxStatus, StoreError> {
        let q =
            sqlx::query_as::<_, (i64, i64, Option<f64>)>(AssertSqlSafe(self.sql.status.clone()));
        let (pending, parked, oldest) =
            run(self.timeout(), STATUS, q.fetch_one(&self.pool)).await?;
        Ok(OutboxStatus::new(pending, parked, oldest))
    }

    pub(crate) async fn pending(&self) -> Result<i64, StoreError> {
        let q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.sql.pending.clone()));
        run(self.timeout(), PENDING, q.fetch_one(&self.pool)).await
    }

    pub(crate) async fn backlog(&self) -> Result<Option<Backlog>, StoreError> {
        let q = sqlx::query_as::<_, (i64, D::Span, i64)>(AssertSqlSafe(self.sql.backlog.clone()));
        let (n, age, parked) = run(self.timeout(), BACKLOG, q.fetch_one(&self.pool)).await?;
        Ok(Some(
            Backlog::new(u64::try_from(n).unwrap_or(0), D::age(age))
                .with_parked(u64::try_from(parked).unwrap_or(0)),
        ))
    }

    /// Claims with `sql`, an `UPDATE ... RETURNING` that leases up to `limit` pending
    /// rows (bound first) for `lease` (bound second); the rows in claim order.
    pub(crate) async fn claim_returning(
        &self,
        sql: &Arc<str>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(D::span(lease));
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(db_err(CLAIM.failed))?;
        read_claimed::<D>(rows)
    }

    /// Runs `sql` with `ids` as its list, as `step`.
    pub(crate) async fn by_ids(
        &self,
        sql: &Arc<str>,
        ids: &[MessageId],
        step: Step,
    ) -> Result<(), StoreError> {
        let Some(q) = D::by_ids(sql, ids) else {
            return Ok(());
        };
        run(self.timeout(), step, q.execute(&self.pool))
            .await
            .map(drop)
    }

    /// The statement recording `row`'s failure.
    pub(crate) fn failed(
        &self,
        row: &FailedRow,
    ) -> Query<'static, D::Db, <D::Db as Database>::Arguments> {
        sqlx::query(AssertSqlSafe(self.sql.failed.clone()))
            .bind(crate::envelope::truncate(&row.error, 2000))
            .bind(row.park)
            .bind(D::span(row.retry_after))
            .bind(D::uuid(*row.id.as_uuid()))
    }

    pub(crate) async fn mark_failed(&self, rows: &[FailedRow]) -> Result<(), StoreError> {
        bounded(self.timeout(), FAILED.doing, async {
            for row in rows {
                self.failed(row)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err(FAILED.failed))?;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn purge_sent(&self, older_than: Duration) -> Result<u64, StoreError> {
        let q = sqlx::query(AssertSqlSafe(self.sql.purge.clone())).bind(D::span(older_than));
        let done = run(self.timeout(), PURGE, q.execute(&self.pool)).await?;
        Ok(D::rows_affected(&done))
    }
}

/// Claimed rows (`id, seq, name, source, time, headers, payload, attempts`) in claim
/// order: `UPDATE ... RETURNING` does not keep it.
pub(crate) fn read_claimed<D: OutboxDialect>(
    rows: Vec<<D::Db as Database>::Row>,
) -> Result<Vec<Claimed>, StoreError>
where
    String: for<'r> Decode<'r, D::Db> + Type<D::Db>,
    Option<String>: for<'r> Decode<'r, D::Db>,
    Vec<u8>: for<'r> Decode<'r, D::Db> + Type<D::Db>,
    i64: for<'r> Decode<'r, D::Db> + Type<D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
    u32: TryFrom<D::Attempts>,
{
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let read = || -> Result<(i64, Claimed), sqlx::Error> {
            let id = D::read_uuid(r.try_get::<D::Uuid, _>(0)?)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            let seq: i64 = r.try_get(1)?;
            let headers: String = r.try_get(5)?;
            let env = envelope_from_row(
                id.into(),
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                &headers,
                r.try_get(6)?,
            );
            let attempts = u32::try_from(r.try_get::<D::Attempts, _>(7)?).unwrap_or(0);
            Ok((seq, Claimed::new(env, attempts)))
        };
        out.push(read().map_err(db_err("could not read a claimed outbox row"))?);
    }
    out.sort_by_key(|(seq, _)| *seq);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

/// A database's public outbox type over [`Outbox`]: the builder methods, `enqueue`,
/// `parked`, `requeue`, `delete_parked`, `status`, `pending` and the shared part of
/// [`OutboxSource`](super::OutboxSource), written once. The type holds `inner.core`, an
/// `Outbox`, and has `rebuild(&self, Setup) -> Self` and `enqueue_envelope` of its own;
/// the items in braces (`claim` and what else the database does its own way) complete
/// its `OutboxSource`.
macro_rules! sql_outbox {
    ($store:ident, $backend:literal, { $($source:item)* }) => {
        impl $store {
            fn setup(&self) -> &$crate::sql::Setup {
                &self.inner.core.setup
            }

            $crate::sql::store_methods!();

            /// Up to `limit` parked rows, oldest first, with their errors.
            pub async fn parked(
                &self,
                limit: i64,
            ) -> Result<Vec<$crate::outbox::ParkedRow>, $crate::sql::StoreError> {
                self.inner.core.parked(limit).await
            }

            /// Puts a parked row back in line. Returns whether it was parked.
            pub async fn requeue(
                &self,
                id: $crate::MessageId,
            ) -> Result<bool, $crate::sql::StoreError> {
                self.inner.core.requeue(id).await
            }

            /// Deletes a parked row (never a pending or sent one). Returns whether it was
            /// parked.
            pub async fn delete_parked(
                &self,
                id: $crate::MessageId,
            ) -> Result<bool, $crate::sql::StoreError> {
                self.inner.core.delete_parked(id).await
            }

            /// Pending and parked rows and the age of the oldest pending one, in one query.
            pub async fn status(
                &self,
            ) -> Result<$crate::outbox::OutboxStatus, $crate::sql::StoreError> {
                self.inner.core.status().await
            }

            /// How many rows wait to be published.
            pub async fn pending(&self) -> Result<i64, $crate::sql::StoreError> {
                self.inner.core.pending().await
            }
        }

        impl $crate::outbox::OutboxSource for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn table(&self) -> &str {
                &self.inner.core.setup.table.name
            }

            fn backlog(
                &self,
            ) -> futures::future::BoxFuture<
                '_,
                Result<Option<$crate::outbox::Backlog>, $crate::sql::StoreError>,
            > {
                Box::pin(self.inner.core.backlog())
            }

            fn mark_sent<'a>(
                &'a self,
                ids: &'a [$crate::MessageId],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::sql::StoreError>> {
                let core = &self.inner.core;
                Box::pin(core.by_ids(&core.sql.sent, ids, $crate::outbox::steps::SENT))
            }

            fn delete_sent<'a>(
                &'a self,
                ids: &'a [$crate::MessageId],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::sql::StoreError>> {
                let core = &self.inner.core;
                Box::pin(core.by_ids(
                    &core.sql.delete_sent,
                    ids,
                    $crate::outbox::steps::DELETE_SENT,
                ))
            }

            fn mark_failed<'a>(
                &'a self,
                rows: &'a [$crate::outbox::FailedRow],
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::sql::StoreError>> {
                Box::pin(self.inner.core.mark_failed(rows))
            }

            fn purge_sent(
                &self,
                older_than: std::time::Duration,
            ) -> futures::future::BoxFuture<'_, Result<u64, $crate::sql::StoreError>> {
                Box::pin(self.inner.core.purge_sent(older_than))
            }

            $($source)*
        }
    };
}
pub(crate) use sql_outbox;

/// `OutboxSource::claim` for a database that claims with one `UPDATE ... RETURNING`,
/// the statement at `self.inner.$($claim).+`.
macro_rules! returning_claim {
    ($($claim:ident).+) => {
        fn claim(
            &self,
            limit: usize,
            lease: std::time::Duration,
        ) -> futures::future::BoxFuture<
            '_,
            Result<Vec<$crate::outbox::Claimed>, $crate::sql::StoreError>,
        > {
            let core = &self.inner.core;
            Box::pin($crate::sql::bounded(
                core.setup.timeout,
                $crate::outbox::steps::CLAIM.doing,
                core.claim_returning(&self.inner.$($claim).+, limit, lease),
            ))
        }
    };
}
pub(crate) use returning_claim;
