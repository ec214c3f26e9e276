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

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod looks;
pub mod memory;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod steps;

pub use memory::MemoryStore;
#[cfg(feature = "mysql")]
pub use mysql::MySqlStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

pub use crate::sql::{StoreError, StoreErrorKind};
use futures::future::BoxFuture;
use std::time::Duration;
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
    /// The fingerprint of the payload that came with the key, kept by the store so a key
    /// reused for another payload can be flagged (`None`: not compared).
    pub fingerprint: Option<Fingerprint>,
}

/// A fingerprint of a payload: 122 bits of its SHA-1 (a name-based UUID), shown as 32
/// hexadecimal digits. Kept with an idempotency key so a second message with the same
/// key and another payload is flagged (see
/// [`WorkerBuilder::on_payload_mismatch`](crate::worker::WorkerBuilder::on_payload_mismatch)).
/// Not a security measure: it tells payloads apart, it does not authenticate them.
///
/// ```
/// use steadfast::idempotency::Fingerprint;
/// let a = Fingerprint::of(br#"{"order_id":1,"cents":100}"#);
/// assert_eq!(a, Fingerprint::of(br#"{"order_id":1,"cents":100}"#));
/// assert_ne!(a, Fingerprint::of(br#"{"order_id":1,"cents":999}"#));
/// assert_eq!(a.to_string().parse::<Fingerprint>().unwrap(), a);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(Uuid);

impl Fingerprint {
    /// The fingerprint of `payload`'s bytes.
    pub fn of(payload: &[u8]) -> Self {
        Self(Uuid::new_v5(&Uuid::NAMESPACE_OID, payload))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s.trim()).map(Self)
    }
}

impl<'a> Key<'a> {
    /// The key `key` of message `name` in group `group`, without a fingerprint.
    pub const fn new(group: &'a str, name: &'a str, key: &'a str) -> Self {
        Self {
            group,
            name,
            key,
            fingerprint: None,
        }
    }

    /// The same key with the fingerprint of the payload that came with it.
    #[must_use]
    pub const fn with_fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.fingerprint = Some(fingerprint);
        self
    }

    /// The fingerprint as a SQL store keeps it (32 hexadecimal digits, or NULL).
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn fingerprint_text(&self) -> Option<String> {
        self.fingerprint.map(|f| f.to_string())
    }

    /// The three parts, in the order the SQL stores bind them.
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn parts(self) -> [&'a str; 3] {
        [self.group, self.name, self.key]
    }
}

/// A store of idempotency keys. Implemented for memory, PostgreSQL, SQLite and MySQL.
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

    /// The payload fingerprint kept with `key` (its
    /// [`fingerprint`](Key::fingerprint) is ignored here), if the key has a row and one
    /// was given when it was taken or marked. The worker asks after
    /// [`Begin::AlreadyDone`] or [`Begin::InFlight`], and flags a duplicate whose payload
    /// differs. The default, `None`, compares nothing.
    fn fingerprint<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Fingerprint>, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }
}

/// `steadfast.idempotency.payload_mismatch` (counter): deliveries whose idempotency key
/// was seen before with another payload, labelled `messaging.consumer.group.name` and
/// `messaging.message.name`.
pub const PAYLOAD_MISMATCH: &str = "steadfast.idempotency.payload_mismatch";

/// What a worker does with a delivery whose idempotency key was seen before with another
/// payload (a producer reusing keys, as payment APIs guard against). Set with
/// [`WorkerBuilder::on_payload_mismatch`](crate::worker::WorkerBuilder::on_payload_mismatch).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMismatch {
    /// Log a warning and count [`PAYLOAD_MISMATCH`], then treat the delivery as the
    /// duplicate its key says it is (the default).
    #[default]
    Warn,
    /// Warn and count as well, and dead-letter the delivery with a reason that names the
    /// key and both fingerprints, instead of acking it as a duplicate.
    DeadLetter,
}

/// After `begin` or a look found `key` taken: compares the payload fingerprint kept with
/// it to the one that came now. A difference is logged and counted; its description is
/// returned (the dead letter's reason where the worker is told to dead-letter).
pub(crate) async fn payload_mismatch(
    store: &dyn IdempotencyStore,
    key: Key<'_>,
    timeout: Duration,
) -> Option<String> {
    let now = key.fingerprint?;
    let kept = match tokio::time::timeout(timeout, store.fingerprint(key)).await {
        Ok(Ok(kept)) => kept?,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not read the payload fingerprint; not compared");
            return None;
        }
        Err(_) => return None,
    };
    if kept == now {
        return None;
    }
    let reason = format!(
        "idempotency key `{}` of `{}` was first seen with another payload (fingerprint {kept}, this one {now})",
        crate::envelope::truncate(key.key, 200),
        key.name
    );
    tracing::warn!(group = key.group, name = key.name, "{reason}");
    metrics::counter!(
        PAYLOAD_MISMATCH,
        "messaging.consumer.group.name" => key.group.to_owned(),
        "messaging.message.name" => key.name.to_owned()
    )
    .increment(1);
    Some(reason)
}

/// A fingerprint column as read: absent, NULL or unreadable is none.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn stored_fingerprint(row: Option<Option<String>>) -> Option<Fingerprint> {
    row.flatten().and_then(|s| s.parse().ok())
}

/// The inbox methods every SQL store shares, written once: `with_retention`, `mark`
/// for the connection type `$conn`, `spawn_cleanup`. The store provides `setup`,
/// `rebuild`, `mark_key` and `cleanup`.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
macro_rules! inbox_methods {
    ($conn:ty) => {
        /// Keeps completed keys for `retention` (default 7 days): a duplicate arriving
        /// later than that runs the handler again. Make it longer than the broker can
        /// hold a message.
        #[must_use]
        pub fn with_retention(self, retention: std::time::Duration) -> Self {
            let mut setup = self.setup().clone();
            setup.retention = retention;
            self.rebuild(setup)
        }

        /// Marks the delivery of `cx` handled, inside your transaction `conn`. Returns
        /// `false` if it was handled before: then do nothing and return `Ok(())`.
        ///
        /// Race-safe: two deliveries of the same message marking at once end with one
        /// `true` (the second waits on the first's row lock and sees it done once it
        /// commits; if the first rolls back, the second goes ahead).
        pub async fn mark(
            &self,
            conn: &mut $conn,
            cx: &$crate::Context,
        ) -> Result<bool, $crate::sql::StoreError> {
            let key = $crate::idempotency::Key::new(cx.group(), cx.name(), cx.idempotency_key())
                .with_fingerprint(cx.payload_fingerprint());
            let marked = self.mark_key(conn, key).await?;
            cx.note_marked();
            Ok(marked)
        }

        /// Runs [`cleanup`](Self::cleanup) every `every` until the returned handle is
        /// aborted or dropped with the runtime. Errors are logged and retried next time.
        pub fn spawn_cleanup(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
            let store = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every.max(std::time::Duration::from_secs(1)));
                loop {
                    tick.tick().await;
                    match store.cleanup().await {
                        Ok(n) if n > 0 => tracing::debug!(removed = n, "inbox cleanup"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "inbox cleanup failed"),
                    }
                }
            })
        }
    };
}
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) use inbox_methods;
