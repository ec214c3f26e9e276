//! NATS JetStream transport (feature `nats`, async-nats).
//!
//! One file-backed work stream captures `{prefix}.>`: a message named `orders.placed`
//! is published on `{prefix}.orders.placed` with `Nats-Msg-Id` = its id and the
//! CloudEvents attributes as `ce-*` headers. Each consumer group is a durable pull
//! consumer with explicit acks whose filter is the group's subjects. Retries and
//! deferrals are `Nak`s with a delay (the server holds the message); dead letters go to
//! a second stream, `{stream}_DLQ`, on `{prefix}-dlq.{group}`, and the original is
//! `Term`ed once the dead letter's PubAck arrived. A message that reaches the server's
//! delivery limit (a worker that crashes on it) is moved there by the
//! `MAX_DELIVERIES` advisory. See `docs/nats.md` for the tables and version notes.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use steadfast::transport::nats::NatsTransport;
//! let transport = NatsTransport::connect("nats://127.0.0.1:4222").await?;
//! # Ok(()) }
//! ```

mod acker;
mod advisory;
mod config;
mod consume;
mod dead_letters;
mod publish;
mod suspects;
mod topology;

pub use config::NatsBuilder;

use crate::{
    envelope::Envelope,
    transport::{
        DeadLetter, DeadLetterVisitor, DeliveryStream, Health, Subscription, Transport,
        TransportError, TransportErrorKind,
    },
};
use config::Settings;
use futures::future::BoxFuture;
use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

/// How long readiness says "reconnecting" after JetStream last reported a passing state
/// (an operation that keeps failing renews it; one that succeeds ends it).
const UNAVAILABLE_SHOWN: Duration = Duration::from_secs(10);

/// How many deferred deliveries a process remembers before it starts over.
const MAX_DEFERRALS_REMEMBERED: usize = 100_000;

/// A NATS JetStream transport. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    settings: Settings,
    server: ServerVersion,
    closed: AtomicBool,
    /// When JetStream last answered a publish or settle with a passing state (no
    /// leader, no quorum), in milliseconds since `started` (0: it answered since).
    /// Readiness says reconnecting for [`UNAVAILABLE_SHOWN`] after such an answer.
    jetstream_unavailable: AtomicU64,
    /// A fixed point for `jetstream_unavailable`.
    started: std::time::Instant,
    /// Deferrals made by this process, per (consumer, stream sequence): subtracted from
    /// the server's delivery count so a deferral does not use an attempt.
    deferrals: Mutex<HashMap<(Arc<str>, u64), u32>>,
    /// Suspects of crash loops, their ledger and the returns this process explains.
    suspects: suspects::Suspects,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("NatsTransport")
            .field("url", &s.url_redacted)
            .field("prefix", &s.prefix)
            .field("stream", &s.stream)
            .field("server", &self.inner.server)
            .finish_non_exhaustive()
    }
}

/// The server's version, for the features that differ (multiple filter subjects: 2.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ServerVersion(u32, u32, u32);

impl ServerVersion {
    fn parse(v: &str) -> Self {
        let mut it = v
            .trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        Self(
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    }

    /// Consumers accept `filter_subjects` (several filters) from 2.10 on; 2.9 ignores the
    /// field silently, which would make a consumer take every subject.
    pub(crate) fn multi_filter(self) -> bool {
        self >= Self(2, 10, 0)
    }
}

impl NatsTransport {
    /// Connects to `url` (for example `nats://127.0.0.1:4222`) with the default
    /// subject prefix `steadfast` and stream `STEADFAST`.
    pub async fn connect(url: &str) -> Result<NatsTransport, TransportError> {
        Self::builder(url).connect().await
    }

    /// A builder for the subject prefix, stream, credentials and limits.
    pub fn builder(url: &str) -> NatsBuilder {
        NatsBuilder::new(url)
    }

    /// The work stream's name.
    pub fn stream_name(&self) -> &str {
        &self.inner.settings.stream
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream_name(&self) -> &str {
        &self.inner.settings.dlq_stream
    }

    /// The subject a message name is published on.
    pub fn subject_for(&self, name: &str) -> String {
        self.inner.settings.subject(name)
    }

    /// The server's version string.
    pub fn server_version(&self) -> String {
        self.inner.client.server_info().version
    }

    /// The name of the server the connection is on at the moment; on a cluster it
    /// changes when the client moves to another node.
    pub fn server_name(&self) -> String {
        self.inner.client.server_info().server_name
    }
}

impl Inner {
    /// Runs `fut` under the request bound, mapping a timeout to [`TransportErrorKind::Timeout`].
    /// The bound on one request: the request timeout, plus slack for the client's own
    /// timer to fire first.
    pub(crate) fn op_limit(&self) -> Duration {
        self.settings.op_timeout + Duration::from_millis(500)
    }

    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        let limit = self.op_limit();
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Timeout,
                format!("{what}: no answer from NATS within {limit:?}"),
            )),
        }
    }

    /// A publish or settle met a passing JetStream state.
    pub(crate) fn jetstream_unavailable(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        if self.jetstream_unavailable.swap(now, Ordering::AcqRel) == 0 {
            tracing::warn!(
                "JetStream is not answering (a leader election or a cluster without quorum); retrying within each operation's deadline"
            );
        }
    }

    /// JetStream answered again.
    pub(crate) fn jetstream_answered(&self) {
        if self.jetstream_unavailable.load(Ordering::Relaxed) != 0
            && self.jetstream_unavailable.swap(0, Ordering::AcqRel) != 0
        {
            tracing::info!("JetStream answers again");
        }
    }

    /// Whether JetStream reported a passing state lately and has not answered since.
    fn jetstream_troubled(&self) -> bool {
        let at = self.jetstream_unavailable.load(Ordering::Acquire);
        at != 0
            && self.started.elapsed().as_millis() < u128::from(at) + UNAVAILABLE_SHOWN.as_millis()
    }

    /// How many times this process deferred `seq` on `consumer`.
    pub(crate) fn deferred(&self, consumer: &Arc<str>, seq: u64) -> u32 {
        let map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(consumer.clone(), seq)).copied().unwrap_or(0)
    }

    pub(crate) fn record_deferral(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: forgetting deferrals only makes a deferred message use an attempt.
        if map.len() >= MAX_DEFERRALS_REMEMBERED {
            map.clear();
        }
        *map.entry((consumer.clone(), seq)).or_insert(0) += 1;
    }

    pub(crate) fn unrecord_deferral(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        let key = (consumer.clone(), seq);
        if let Some(n) = map.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&key);
            }
        }
    }

    pub(crate) fn forget_deferrals(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        if !map.is_empty() {
            map.remove(&(consumer.clone(), seq));
        }
    }

    pub(crate) fn check_open(&self) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::new(
                TransportErrorKind::Closed,
                "the NATS transport was closed",
            ));
        }
        Ok(())
    }
}

/// An async-nats error as a [`TransportError`] of `kind`, with the error's text (which
/// names subjects, never credentials).
pub(crate) fn err(
    kind: TransportErrorKind,
    what: impl Into<String>,
    e: impl std::fmt::Display,
) -> TransportError {
    TransportError::new(kind, format!("{}: {e}", what.into()))
}

impl Transport for NatsTransport {
    fn system(&self) -> &'static str {
        "nats"
    }

    fn destination(&self, _sub: &Subscription) -> String {
        self.stream_name().to_owned()
    }

    fn publish_destination(&self, name: &str) -> String {
        self.subject_for(name)
    }

    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            topology::ensure_group(&self.inner, sub).await.map(|_| ())
        })
    }

    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            consume::subscribe(self.inner.clone(), sub).await
        })
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            publish::publish_one(&self.inner, envelope).await
        })
    }

    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            if let Err(e) = self.inner.check_open() {
                let text = e.to_string();
                return envelopes
                    .iter()
                    .map(|_| {
                        Err(TransportError::new(
                            TransportErrorKind::Closed,
                            text.clone(),
                        ))
                    })
                    .collect();
            }
            publish::publish_batch(&self.inner, envelopes).await
        })
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            dead_letters::read(&self.inner, group, limit).await
        })
    }

    crate::transport::crash::suspect_methods!();

    crate::transport::dead_letter_settling!(
        /// Publishes each selected dead letter to its original subject (every group that
        /// takes the subject gets it again; their idempotency absorbs it) and deletes it from
        /// the dead-letter stream after the PubAck.
    );

    fn dead_letter_count<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            dead_letters::count(&self.inner, group).await
        })
    }

    fn scan_dead_letters<'a>(
        &'a self,
        group: &'a str,
        visit: &'a mut DeadLetterVisitor<'_>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            dead_letters::scan(&self.inner, group, visit).await
        })
    }

    fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::Closed;
        }
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected if !self.inner.jetstream_troubled() => {
                Health::Connected
            }
            _ => Health::Reconnecting,
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.inner.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            let limit = self.inner.settings.op_timeout;
            let _ = tokio::time::timeout(limit, self.inner.client.flush()).await;
            let _ = tokio::time::timeout(limit, self.inner.client.drain()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ServerVersion;

    #[test]
    fn versions() {
        assert!(!ServerVersion::parse("2.9.10").multi_filter());
        assert!(ServerVersion::parse("2.10.0").multi_filter());
        assert!(ServerVersion::parse("v2.11.3-beta").multi_filter());
        assert!(!ServerVersion::parse("garbage").multi_filter());
    }
}
