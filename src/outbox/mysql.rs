//! The MySQL / MariaDB outbox: `enqueue` in your transaction, claimed by [`Relay`]s with
//! `FOR UPDATE SKIP LOCKED` (MySQL 8.0+, MariaDB 10.6+), so several relays are safe.
//!
//! MySQL has no `LISTEN/NOTIFY`: a relay polls, at an interval that adapts to the
//! traffic, and wakes at once when its own process enqueues. After a claim that found
//! rows the first look comes 10 ms later, then 20, 40, ... up to the relay's
//! [`poll_interval`](super::RelayBuilder::poll_interval) (default 1 s) while nothing
//! comes. A row enqueued by another process therefore waits at most the current
//! interval: tens of milliseconds under steady traffic, up to the poll interval after a
//! quiet spell (see `docs/outbox.md`).
//!
//! [`Relay`]: super::Relay

use super::{
    Claimed, envelope_from_row,
    sql::{Outbox, OutboxDialect, OutboxSql, sql_outbox},
    steps::CLAIM,
};
use crate::{
    envelope::{Envelope, MessageId},
    sql::{Dialect, Setup, StoreError, Table, bounded, db_err, millis, mysql::My},
};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

const SCHEMA: &str = include_str!("../../sql/mysql/outbox.sql");

/// The first poll after a claim that found rows; doubled while claims come back empty.
const FIRST_POLL: Duration = Duration::from_millis(10);

/// An outbox table in MySQL 8.0+ or MariaDB 10.6+ (default `steadfast_outbox`). Cheap to
/// clone.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use steadfast::{Message, idempotency::mysql::connect, outbox::MySqlOutbox};
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced { order_id: i64 }
///
/// let pool = connect("mysql://app@127.0.0.1:3306/app").await?;
/// let outbox = MySqlOutbox::new(pool.clone());
/// outbox.migrate().await?;
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (?)").bind(7_i64).execute(&mut *tx).await?;
/// outbox.enqueue(&mut tx, &OrderPlaced { order_id: 7 }).await?;
/// tx.commit().await?; // the order and the message, or neither
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    core: Outbox<My>,
    claim: Arc<str>,
    lease: Arc<str>,
    /// Claims in a row that found nothing: the next poll waits `FIRST_POLL * 2^idle`.
    idle: AtomicU32,
}

impl OutboxDialect for My {
    type Attempts = i32;

    fn by_ids(
        sql: &Arc<str>,
        ids: &[MessageId],
    ) -> Option<sqlx::query::Query<'static, sqlx::MySql, sqlx::mysql::MySqlArguments>> {
        if ids.is_empty() {
            return None;
        }
        let (sql, slots) = with_ids(sql, ids.len());
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in 0..slots {
            q = q.bind(ids[i.min(ids.len() - 1)].to_string());
        }
        Some(q)
    }
}

/// The statements, and the claim's two (lock, then lease).
fn statements(t: &Table) -> (OutboxSql, Arc<str>, Arc<str>) {
    let r = |s: &str| My::render(t, s);
    // Rows locked by another claim, or by a transaction still inserting them, are
    // skipped, never waited for.
    let claim = r(
        "SELECT seq, id, name, source, time, headers, payload, attempts FROM {table} \
         WHERE state = 'pending' AND available_at <= {now} \
         ORDER BY seq LIMIT ? FOR UPDATE SKIP LOCKED",
    );
    let lease = r("UPDATE {table} SET available_at = {now} + ? WHERE seq IN ({ids})");
    let sql = OutboxSql {
        insert: r(
            "INSERT INTO {table} (id, name, source, time, headers, payload, available_at, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, {now}, {now})",
        ),
        sent: r("UPDATE {table} SET state = 'sent', sent_at = {now} WHERE id IN ({ids})"),
        delete_sent: r("DELETE FROM {table} WHERE id IN ({ids})"),
        failed: r(
            "UPDATE {table} SET attempts = attempts + 1, last_error = ?, \
                 state = IF(?, 'parked', 'pending'), available_at = {now} + ? WHERE id = ?",
        ),
        purge: r("DELETE FROM {table} WHERE state = 'sent' AND sent_at < {now} - ?"),
        parked: r(
            "SELECT id, name, attempts, COALESCE(last_error, '') FROM {table} \
                 WHERE state = 'parked' ORDER BY seq LIMIT ?",
        ),
        requeue: r(
            "UPDATE {table} SET state = 'pending', attempts = 0, available_at = {now} \
                 WHERE id = ? AND state = 'parked'",
        ),
        delete_parked: r("DELETE FROM {table} WHERE id = ? AND state = 'parked'"),
        pending: r("SELECT COUNT(*) FROM {table} WHERE state = 'pending'"),
        backlog: r(
            "SELECT COUNT(*), CAST(COALESCE({now} - MIN(created_at), 0) AS SIGNED), \
                 (SELECT COUNT(*) FROM {table} WHERE state = 'parked') \
                 FROM {table} WHERE state = 'pending'",
        ),
        status: r(
            "SELECT CAST(COALESCE(SUM(state = 'pending'), 0) AS SIGNED), \
                 CAST(COALESCE(SUM(state = 'parked'), 0) AS SIGNED), \
                 CAST(({now} - MIN(CASE WHEN state = 'pending' THEN created_at END)) / 1000 AS DOUBLE) \
                 FROM {table}",
        ),
    };
    (sql, claim, lease)
}

/// `sql` with its `{ids}` list made of `n` placeholders rounded up to a power of two (the
/// caller repeats the last id), so a few statements serve every batch size.
fn with_ids(sql: &str, n: usize) -> (String, usize) {
    let slots = n.max(1).next_power_of_two();
    let list = vec!["?"; slots].join(", ");
    (sql.replace("{ids}", &list), slots)
}

impl std::fmt::Debug for MySqlOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlOutbox")
            .field("table", &self.inner.core.setup.table.name)
            .finish_non_exhaustive()
    }
}

sql_outbox!(MySqlOutbox, "mysql", {
    fn claim(
        &self,
        limit: usize,
        lease: Duration,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        Box::pin(bounded(
            self.setup().timeout,
            CLAIM.doing,
            self.claim_inner(limit, lease),
        ))
    }

    fn wait(&self, max: Duration) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            // Adaptive: short right after work, doubling while claims find nothing.
            let idle = self.inner.idle.load(Ordering::Relaxed).min(16);
            let poll = FIRST_POLL.saturating_mul(1 << idle).min(max);
            if tokio::time::timeout(poll, self.inner.core.wake.notified())
                .await
                .is_ok()
            {
                // A wake-up may come before its transaction committed: look shortly after,
                // and from the shortest poll again if that finds nothing.
                self.inner.idle.store(0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2).min(max)).await;
            }
        })
    }
});

impl MySqlOutbox {
    /// An outbox in table `steadfast_outbox`.
    pub fn new(pool: MySqlPool) -> Self {
        Self::build(pool, Setup::new("steadfast_outbox"))
    }

    fn build(pool: MySqlPool, setup: Setup) -> Self {
        let (sql, claim, lease) = statements(&setup.table);
        Self {
            inner: Arc::new(Inner {
                core: Outbox::new(pool, setup, sql),
                claim,
                lease,
                idle: AtomicU32::new(0),
            }),
        }
    }

    fn rebuild(&self, setup: Setup) -> Self {
        Self::build(self.inner.core.pool.clone(), setup)
    }

    super::enqueue_methods!(MySqlConnection);

    /// Creates the table if it does not exist and warns about unsafe settings.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let core = &self.inner.core;
        crate::sql::mysql::migrate(&core.pool, self.schema_sql(), core.setup.timeout).await
    }

    /// Writes a ready-made envelope in your transaction. The relay may look before the
    /// commit and find nothing; it then looks again after its shortest poll.
    pub async fn enqueue_envelope(
        &self,
        conn: &mut MySqlConnection,
        envelope: Envelope,
    ) -> Result<MessageId, StoreError> {
        let core = &self.inner.core;
        core.enqueue(conn, envelope, &core.sql.insert, None).await
    }

    /// Claims in one short transaction: lock up to `limit` committed pending rows that no
    /// other claim holds, push their `available_at` past the lease, commit. Read committed,
    /// so the rows looked at and passed over are not kept locked.
    async fn claim_inner(&self, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        let mut conn = self
            .inner
            .core
            .pool
            .acquire()
            .await
            .map_err(db_err(CLAIM.failed))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(db_err(CLAIM.failed))?;
        let mut tx = conn.begin().await.map_err(db_err(CLAIM.failed))?;
        type Row = (
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            Vec<u8>,
            i32,
        );
        let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(self.inner.claim.clone()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err(CLAIM.failed))?;
        if rows.is_empty() {
            tx.rollback().await.map_err(db_err(CLAIM.failed))?;
            self.inner.idle.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        self.inner.idle.store(0, Ordering::Relaxed);
        let (sql, slots) = with_ids(&self.inner.lease, rows.len());
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(millis(lease));
        for i in 0..slots {
            q = q.bind(rows[i.min(rows.len() - 1)].0);
        }
        q.execute(&mut *tx).await.map_err(db_err(CLAIM.failed))?;
        tx.commit().await.map_err(db_err(CLAIM.failed))?;
        let mut out = Vec::with_capacity(rows.len());
        for (_, id, name, source, time, headers, payload, attempts) in rows {
            let id: MessageId = id.parse().map_err(|e| {
                db_err("could not read a claimed outbox row")(sqlx::Error::Decode(Box::new(e)))
            })?;
            let env = envelope_from_row(id, name, source, time, &headers, payload);
            out.push(Claimed::new(env, u32::try_from(attempts).unwrap_or(0)));
        }
        Ok(out)
    }
}
