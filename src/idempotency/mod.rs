//! Idempotency: run a handler once per key, however often the broker delivers.
//!
//! The worker calls [`IdempotencyStore::begin`] before the handler. `Acquired` runs the
//! handler under a lease; [`complete`](IdempotencyStore::complete) marks the key done only
//! after the handler succeeded and its outgoing messages were confirmed, and
//! [`release`](IdempotencyStore::release) frees it after a failure so the retry runs the
//! handler again (marking a key seen *before* the handler runs would turn a failed
//! message's redelivery into a silent drop). A worker that crashes holding a lease loses
//! it when the lease expires, so its redelivery runs again.
//!
//! Keys are scoped by consumer group and message name: two groups handle the same message
//! independently, and `OrderPlaced{order_id: 1}` never shadows `OrderCancelled{order_id: 1}`.

#[cfg(feature = "postgres")]
mod looks;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

use futures::future::BoxFuture;
use std::{error::Error as StdError, fmt, time::Duration};
use uuid::Uuid;

/// The outcome of [`IdempotencyStore::begin`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// This worker holds the key until the lease ends; run the handler.
    Acquired(Lease),
    /// The key was completed before: ack without running the handler.
    AlreadyDone,
    /// Another worker holds a live lease: retry later.
    InFlight,
}

/// Proof of holding a key; `complete` and `release` act only for the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// A token unique to this acquisition.
    pub token: Uuid,
}

impl Lease {
    /// A fresh lease token.
    pub fn new() -> Self {
        Self {
            token: Uuid::now_v7(),
        }
    }
}

impl Default for Lease {
    fn default() -> Self {
        Self::new()
    }
}

/// The key of one message for one group.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    /// The consumer group.
    pub group: &'a str,
    /// The message's wire name.
    pub name: &'a str,
    /// The message's idempotency key (a `#[message(key)]` field, or the message id).
    pub key: &'a str,
}

/// A store of idempotency keys. Implemented for memory, PostgreSQL and SQLite.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Tries to take `key` for `lease` time.
    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>>;

    /// Marks `key` done (after success). A no-op if it is already done.
    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Frees `key` after a failure, if `lease` still holds it.
    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Whether `key` is done (completed, or marked in a committed handler transaction),
    /// without taking it. Used by workers built with
    /// [`WorkerBuilder::inbox`](crate::worker::WorkerBuilder::inbox), which leave
    /// concurrency to the inbox `mark`. The default, `false`, runs the handler and lets
    /// its `mark` decide.
    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(false) })
    }

    /// How long the lease now holding `key` has left, if it is held (after
    /// [`Begin::InFlight`]). The worker puts such a delivery back for that long rather
    /// than looking again every few milliseconds: the holder may have died, and then the
    /// key frees itself only when its lease ends — while every look is a delivery, and
    /// brokers limit deliveries. The default, `None`, means "unknown": the worker then
    /// looks again after the retry policy's first delay.
    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }
}

/// A store failed; the worker treats it as a transient failure (the message is retried).
#[derive(Debug)]
pub struct StoreError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl StoreError {
    /// A store error with a message (never containing credentials).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}
