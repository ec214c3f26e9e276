//! The transactional outbox: messages written in the same database transaction as the
//! business data, published by a [`Relay`] once that transaction committed.
//!
//! Publishing straight from a handler or a request can lose a message (the process dies
//! after the commit, before the publish) or send a message for a change that was rolled
//! back (publish, then the commit fails). The outbox closes both windows:
//!
//! 1. the write side is an inherent `enqueue(&mut PgConnection | &mut SqliteConnection,
//!    &M)` (`PostgresOutbox::enqueue`, `SqliteOutbox::enqueue`, behind the `postgres` and
//!    `sqlite` features): the compiler makes you pass the connection of *your*
//!    transaction, so the row commits or rolls back with your data;
//! 2. the [`Relay`] claims committed rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so
//!    several relays are safe), publishes them through any
//!    [`Transport`](crate::transport::Transport) awaiting the broker's confirmation, and
//!    only then marks them sent. A relay killed between the confirmation and the mark
//!    publishes the row again: a duplicate with the same message id, absorbed by the
//!    consumer's idempotency — never a loss.
//!
//! Rows are never read with an `id > last_seen` cursor: every claim looks at all pending
//! rows, so a transaction that commits late (with a lower sequence number than rows
//! already sent) is still published. A row that keeps failing (unroutable, rejected,
//! oversize) is *parked* with its error and attempt count and blocks no row behind it.
//!
//! The relay side is the small [`OutboxSource`] trait, so one [`Relay`] serves every
//! backend. See `docs/outbox.md` for the guarantees and failure windows.

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod relay;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod steps;

#[cfg(feature = "mysql")]
pub use mysql::MySqlOutbox;
#[cfg(feature = "postgres")]
pub use postgres::PostgresOutbox;
pub use relay::{
    BACKLOG_OLDEST_AGE, BACKLOG_PENDING, Relay, RelayBuilder, RelayConfigError, RelayStats,
};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteOutbox;

pub use crate::sql::{StoreError, StoreErrorKind};
use crate::{envelope::Envelope, envelope::MessageId};
use futures::future::BoxFuture;
use std::time::Duration;

/// A row claimed by a relay: the envelope to publish and how often it failed before.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Claimed {
    /// The message; its id is the row's id.
    pub envelope: Envelope,
    /// Failed publish attempts so far.
    pub attempts: u32,
}

impl Claimed {
    /// A claimed row.
    pub fn new(envelope: Envelope, attempts: u32) -> Self {
        Self { envelope, attempts }
    }
}

/// A row whose publish failed, as the relay reports it back to the store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FailedRow {
    /// The row (and message) id.
    pub id: MessageId,
    /// Why it failed (kept in the row).
    pub error: String,
    /// Park the row: stop trying until an operator requeues it.
    pub park: bool,
    /// When to try again if not parked.
    pub retry_after: Duration,
}

/// How far behind an outbox is: rows waiting to be published and the age of the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Backlog {
    /// Pending rows (not yet confirmed by the broker, not parked).
    pub pending: u64,
    /// How long the oldest pending row has waited (zero when there is none).
    pub oldest_age: Duration,
    /// Parked rows (failed for good, waiting for an operator).
    pub parked: u64,
}

impl Backlog {
    /// A backlog of `pending` rows, the oldest `oldest_age` old, and no parked row.
    pub fn new(pending: u64, oldest_age: Duration) -> Self {
        Self {
            pending,
            oldest_age,
            parked: 0,
        }
    }

    /// The same backlog with `parked` parked rows.
    pub fn with_parked(mut self, parked: u64) -> Self {
        self.parked = parked;
        self
    }
}

/// A parked row, as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedRow {
    /// The row (and message) id.
    pub id: MessageId,
    /// The message's wire name.
    pub name: String,
    /// Failed publish attempts.
    pub attempts: u32,
    /// The last error.
    pub error: String,
}

/// An outbox table at a glance, for operators (`steadfast outbox status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Rows parked after repeated failures, waiting for an operator.
    pub parked: i64,
    /// How long the oldest pending row has waited, if there is one.
    pub oldest_pending_age: Option<Duration>,
}

impl OutboxStatus {
    #[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
    pub(crate) fn new(pending: i64, parked: i64, oldest_secs: Option<f64>) -> Self {
        Self {
            pending,
            parked,
            oldest_pending_age: oldest_secs
                .filter(|s| s.is_finite())
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        }
    }
}

/// The relay's view of an outbox table. Implemented by `PostgresOutbox` and
/// `SqliteOutbox`; implement it to relay from another store.
///
/// Rules: [`claim`](Self::claim) returns committed pending rows whose time has come, in
/// sequence order, and hides them from other claims for `lease` (a crashed relay's rows
/// come back when it ends); it must never use a cursor that could skip rows committed
/// out of order.
pub trait OutboxSource: Send + Sync + 'static {
    /// `"postgres"`, `"sqlite"`, ...
    fn backend(&self) -> &'static str;

    /// The table's name, the `outbox.table` label of the relay's metrics (default
    /// `"outbox"`).
    fn table(&self) -> &str {
        "outbox"
    }

    /// Claims up to `limit` pending rows for `lease`.
    fn claim(
        &self,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>>;

    /// Marks rows sent (the broker confirmed them), in one statement.
    fn mark_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes rows the broker confirmed, in one statement: what a relay with a zero
    /// [`retention`](RelayBuilder::retention) does instead of
    /// [`mark_sent`](Self::mark_sent). The default marks them sent (a later
    /// [`purge_sent`](Self::purge_sent) removes them); the PostgreSQL and SQLite outboxes
    /// delete, which writes no new row version.
    fn delete_sent<'a>(&'a self, ids: &'a [MessageId]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.mark_sent(ids)
    }

    /// Records failed publishes: attempts + 1, the error, parked or retried later.
    fn mark_failed<'a>(&'a self, rows: &'a [FailedRow]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes rows sent more than `older_than` ago; returns how many.
    fn purge_sent(&self, older_than: Duration) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// How many rows are pending, how old the oldest is and how many are parked, for the
    /// relay's gauges.
    /// `None` when the store cannot tell (the default).
    fn backlog(&self) -> BoxFuture<'_, Result<Option<Backlog>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Waits until new rows may be there (a notification) or `max` passed.
    fn wait(&self, max: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(max))
    }

    /// Claims like [`claim`](Self::claim), but in a transaction that stays open while the
    /// batch is published (a [`HeldBatch`]): the rows are written as sent (or locked, to be
    /// deleted with `delete`) by the claim itself, the outcome is recorded by committing,
    /// and a batch dropped unpublished, or its relay's connection lost, rolls back and
    /// frees its rows at once. No transaction may stay idle longer than `lease` (a hung
    /// relay's rows free themselves). `None`, the default: the store claims with leases
    /// only, and the relay records outcomes with [`mark_sent`](Self::mark_sent) and
    /// [`mark_failed`](Self::mark_failed). The PostgreSQL outbox holds its claims.
    fn claim_held(
        &self,
        limit: usize,
        lease: Duration,
        delete: bool,
    ) -> Option<BoxFuture<'_, Result<HeldBatch, StoreError>>> {
        let _ = (limit, lease, delete);
        None
    }
}

/// A batch claimed inside a transaction that stays open while it is published (see
/// [`OutboxSource::claim_held`]). Recording its outcome is one commit; dropping it rolls
/// the transaction back, and its rows are pending again at once.
pub struct HeldBatch {
    /// The claimed rows, in sequence order.
    pub rows: Vec<Claimed>,
    finish: Box<dyn FinishHeld>,
}

impl HeldBatch {
    /// A held batch of `rows`, ended by `finish`.
    pub fn new(rows: Vec<Claimed>, finish: impl FinishHeld) -> Self {
        Self {
            rows,
            finish: Box::new(finish),
        }
    }

    /// Records the outcome and commits: `sent` are the rows the broker confirmed,
    /// `failures` the others. An error means nothing of the batch was recorded (its
    /// transaction is gone): every row is pending again.
    pub async fn finish(
        self,
        sent: &[MessageId],
        failures: &[FailedRow],
    ) -> Result<(), StoreError> {
        self.finish.finish(sent, failures).await
    }
}

impl std::fmt::Debug for HeldBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldBatch")
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

/// Ends a [`HeldBatch`]'s transaction; implemented by the store that claimed it.
pub trait FinishHeld: Send + 'static {
    /// Records `failures` (attempts + 1, the error, parked or retried later), makes
    /// `sent` final and commits.
    fn finish<'a>(
        self: Box<Self>,
        sent: &'a [MessageId],
        failures: &'a [FailedRow],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Headers as stored in a row: a JSON array of `[name, value]` pairs.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn headers_json(h: &crate::envelope::Headers) -> String {
    let pairs: Vec<(&str, &str)> = h.iter().collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// Builds an envelope from a stored row. Unreadable headers are dropped with a warning
/// rather than blocking the row.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn envelope_from_row(
    id: MessageId,
    name: String,
    source: Option<String>,
    time: Option<String>,
    headers: &str,
    payload: Vec<u8>,
) -> Envelope {
    let headers = match serde_json::from_str::<Vec<(String, String)>>(headers) {
        Ok(pairs) => pairs.into_iter().collect(),
        Err(e) => {
            tracing::warn!(%id, error = %e, "outbox row has unreadable headers; publishing without them");
            crate::envelope::Headers::new()
        }
    };
    Envelope {
        id,
        name,
        source,
        time,
        attempt: 1,
        headers,
        payload: payload.into(),
    }
}

/// The envelope for `msg`, carrying the trace context of `cx` when given.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn encode<M: crate::Message>(
    msg: &M,
    cx: Option<&crate::Context>,
) -> Result<Envelope, StoreError> {
    use crate::envelope::header;
    let mut env = Envelope::encode(msg)
        .map_err(|e| StoreError::of(StoreErrorKind::Encode, "cannot enqueue").with_source(e))?;
    // The enqueuing code's span is the producer's context, captured now: the relay
    // publishes later, outside it.
    #[cfg(feature = "otel")]
    crate::otel::inject_current(&mut env.headers);
    if let Some(cx) = cx
        && env.headers.get(header::TRACEPARENT).is_none()
    {
        for h in [header::TRACEPARENT, header::TRACESTATE] {
            if let Some(v) = cx.headers().get(h) {
                env.headers.insert(h, v);
            }
        }
    }
    Ok(env)
}

/// The enqueue methods every SQL outbox shares, written once, for the connection type
/// `$conn`: `enqueue` and `enqueue_from`. The outbox provides `enqueue_envelope`.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
macro_rules! enqueue_methods {
    ($conn:ty) => {
        /// Writes `msg` to the outbox in your transaction `conn` (`&mut tx` works). It is
        /// published after the transaction commits, and never if it rolls back. Returns
        /// the message id (the row id).
        pub async fn enqueue<M: $crate::Message>(
            &self,
            conn: &mut $conn,
            msg: &M,
        ) -> Result<$crate::MessageId, $crate::sql::StoreError> {
            self.enqueue_envelope(conn, super::encode(msg, None)?).await
        }

        /// [`enqueue`](Self::enqueue) from a handler: the outgoing message carries the
        /// trace context (`traceparent`, `tracestate`) of the delivery being handled.
        pub async fn enqueue_from<M: $crate::Message>(
            &self,
            conn: &mut $conn,
            msg: &M,
            cx: &$crate::Context,
        ) -> Result<$crate::MessageId, $crate::sql::StoreError> {
            self.enqueue_envelope(conn, super::encode(msg, Some(cx))?)
                .await
        }
    };
}
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) use enqueue_methods;
