//! The transport contract: subscribe to a consumer group's messages, publish with the
//! broker's confirmation, and settle each delivery with a [`Disposition`].
//!
//! Every transport — [`memory`], RabbitMQ, NATS JetStream — passes the same conformance
//! suite (`steadfast::testing::conformance`). The rules a transport must keep:
//!
//! - [`Transport::publish`] returns `Ok` only once the broker has confirmed the message
//!   (publisher confirm, PubAck); an unroutable message is an error, never a silent drop.
//! - [`Delivery::settle`] returns `Ok` only once the disposition is carried out: for
//!   `Retry` and `DeadLetter` the copy was confirmed *before* the original is acked. A
//!   settle that may not have reached the broker (a dead channel) is an error.
//! - A delivery dropped without being settled goes back to the broker (it is redelivered,
//!   to this worker or the next).
//! - Dropping the [`DeliveryStream`] stops intake (cancels the consumer) but keeps what is
//!   needed to settle deliveries already handed out.

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(any(feature = "amqp", feature = "nats"))]
mod backoff;
mod connect;
pub mod crash;
mod failure_group;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(any(feature = "amqp", feature = "nats"))]
mod settle_dead_letters;

use crate::{
    envelope::{Envelope, Headers, MessageId, header},
    error::{BackendError, ErrorKind},
    retry::Disposition,
};
use futures::{future::BoxFuture, stream::BoxStream};
use std::{
    fmt,
    time::{Duration, SystemTime},
};

/// `steadfast.transport.reconnects` (counter): connections re-established after a loss,
/// labelled `messaging.system`.
pub const RECONNECTS: &str = "steadfast.transport.reconnects";

pub use connect::{BrokerKind, ConnectOptions, DEFAULT_CONNECT_TIMEOUT, connect};
pub use failure_group::normalise_reason;

/// Called with each dead letter a scan reads, oldest first; `false` stops the scan.
pub type DeadLetterVisitor<'a> = dyn FnMut(DeadLetter) -> bool + Send + 'a;

/// Makes the message a replay publishes from a dead letter (see
/// [`Transport::replay_dead_letters_as`]).
pub type DeadLetterRewrite<'a> = dyn Fn(&DeadLetter) -> Envelope + Send + Sync + 'a;

/// Counts one re-established connection (a rare event: the handle is looked up here).
#[cfg_attr(not(any(feature = "amqp", feature = "nats")), allow(dead_code))]
pub(crate) fn count_reconnect(system: &'static str) {
    reconnects(system).increment(1);
}

/// The reconnect counter of `system`, described; a worker registers it at zero when it
/// is built, so the series exists before the first reconnect (and `increase()` sees it).
pub(crate) fn reconnects(system: &'static str) -> metrics::Counter {
    metrics::describe_counter!(
        RECONNECTS,
        metrics::Unit::Count,
        "Connections to the broker re-established after a loss."
    );
    metrics::counter!(RECONNECTS, "messaging.system" => system)
}

/// What a worker subscribes to: its consumer group and the message names it handles,
/// with the settings a transport needs to declare its topology.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Subscription {
    /// The consumer group: the work queue (RabbitMQ) or durable consumer (NATS). Workers
    /// with the same group share its messages.
    pub group: String,
    /// The wire names routed to this group.
    pub names: Vec<String>,
    /// How many unsettled deliveries the broker may hand out at once (the worker's
    /// concurrency).
    pub prefetch: usize,
    /// The retry policy's attempt limit; a broker-side delivery limit is set above it.
    pub max_attempts: u32,
    /// Every delay the retry policy can ask for, ascending (for delay tiers).
    pub retry_delays: Vec<Duration>,
    /// The handler timeout; ack deadlines (NATS `ack_wait`) are set above it.
    pub handler_timeout: Duration,
    /// Payloads larger than this are dead-lettered without being decoded.
    pub max_payload_bytes: usize,
    /// Crashes while running alone that dead-letter a message as a crash loop (see
    /// [`crash`]); the broker's own delivery limit is a backstop above it.
    pub crash_limit: u32,
}

impl Subscription {
    /// A subscription for `group` to `names`, with defaults for the rest.
    pub fn new(
        group: impl Into<String>,
        names: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            group: group.into(),
            names: names.into_iter().map(Into::into).collect(),
            prefetch: 16,
            max_attempts: 5,
            retry_delays: vec![Duration::from_secs(1)],
            handler_timeout: Duration::from_secs(30),
            max_payload_bytes: 1 << 20,
            crash_limit: crash::DEFAULT_CRASH_LIMIT,
        }
    }
}

/// Whether a transport can currently reach its broker (for readiness).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Connected and consuming.
    Connected,
    /// Reconnecting after a failure.
    Reconnecting,
    /// Closed for good.
    Closed,
}

/// A stream of deliveries for one subscription. It survives reconnects; it ends only
/// when the transport is closed.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, TransportError>>;

/// The transport-specific half of a delivery: how to settle it.
///
/// Implemented by each transport; users only meet it when writing their own.
pub trait Acker: Send + Sync + 'static {
    /// Carries out `disposition` for the delivery whose (possibly re-read) envelope is
    /// `envelope`. `Ok` only when it is done: see the module docs.
    fn settle(
        self: Box<Self>,
        envelope: Envelope,
        disposition: Disposition,
    ) -> BoxFuture<'static, Result<(), TransportError>>;

    /// How often a long-running handler must tell the broker it is still working
    /// (NATS `ack_wait`), if ever.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }

    /// Tells the broker the handler is still working on this delivery.
    fn progress(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }
}

/// One message handed to the worker, with the means to settle it.
pub struct Delivery {
    /// The message.
    pub envelope: Envelope,
    /// What is wrong with the delivery's headers, if anything; such deliveries are
    /// dead-lettered without reaching a handler.
    pub defect: Option<String>,
    /// Set on a suspect that the worker runs alone: how often it already crashed its
    /// worker while running alone (see [`crash`]).
    pub crashes: Option<u32>,
    pub(crate) acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("defect", &self.defect)
            .field("crashes", &self.crashes)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(envelope: Envelope, acker: impl Acker) -> Self {
        Self {
            envelope,
            defect: None,
            crashes: None,
            acker: Box::new(acker),
        }
    }

    /// Marks the delivery as a suspect to run alone, which crashed its worker `crashes`
    /// times already while running alone (builder style).
    #[must_use]
    pub fn alone(mut self, crashes: u32) -> Self {
        self.crashes = Some(crashes);
        self
    }

    /// Marks the delivery as malformed (builder style).
    #[must_use]
    pub fn with_defect(mut self, defect: Option<String>) -> Self {
        self.defect = defect;
        self
    }

    /// Carries out `disposition`. `Ok` only once it is durable at the broker.
    pub async fn settle(self, disposition: Disposition) -> Result<(), TransportError> {
        self.acker.settle(self.envelope, disposition).await
    }

    /// See [`Acker::progress_interval`].
    pub fn progress_interval(&self) -> Option<Duration> {
        self.acker.progress_interval()
    }

    /// See [`Acker::progress`].
    pub async fn progress(&self) -> Result<(), TransportError> {
        self.acker.progress().await
    }
}

/// A message broker steadfast can consume from and publish to.
///
/// Object-safe: workers hold an `Arc<dyn Transport>`. See the module docs for the rules.
pub trait Transport: Send + Sync + 'static {
    /// The `messaging.system` name: `"memory"`, `"rabbitmq"`, `"nats"`.
    fn system(&self) -> &'static str;

    /// Declares the topology of `sub` (queues, bindings, streams, consumers) without
    /// consuming. Idempotent; [`subscribe`](Self::subscribe) does it too.
    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Starts consuming `sub`.
    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>>;

    /// The `messaging.destination.name` of what `sub` consumes, for spans: the queue or
    /// stream the worker reads (by default the consumer group's name).
    fn destination(&self, sub: &Subscription) -> String {
        sub.group.clone()
    }

    /// The `messaging.destination.name` a message called `name` is published to, for
    /// spans: the exchange or subject (by default the name itself).
    fn publish_destination(&self, name: &str) -> String {
        name.to_owned()
    }

    /// Publishes `envelope` to its name's destination; returns once the broker confirmed.
    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Publishes several envelopes, confirmations pipelined where the broker allows;
    /// one result per envelope, in order.
    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(envelopes.len());
            for e in envelopes {
                out.push(self.publish(e).await);
            }
            out
        })
    }

    /// Whether suspects of `group` wait to be run alone (see [`crash`]): the worker then
    /// stops starting other messages, and once nothing else runs takes them one by one
    /// with [`take_suspect`](Self::take_suspect). Cheap: called on every turn of the
    /// worker's loop.
    fn suspects_waiting(&self, group: &str) -> bool {
        let _ = group;
        false
    }

    /// The next suspect of `sub`'s group to run alone, marked with
    /// [`Delivery::alone`]; `None` when there is none. Called only while the worker runs
    /// nothing else.
    fn take_suspect<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<Option<Delivery>, TransportError>> {
        let _ = sub;
        Box::pin(async { Ok(None) })
    }

    /// Reads up to `limit` dead letters of `group`, oldest first, without removing them.
    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, TransportError>> {
        let _ = (group, limit);
        Box::pin(async { Err(unsupported("list dead letters")) })
    }

    /// How many dead letters `group` has (its dead-letter queue's depth, or the number
    /// stored for it in the dead-letter stream). An error of kind
    /// [`TransportErrorKind::Config`] when the group is unknown: no dead-letter queue of
    /// that name (RabbitMQ), no consumer of that name and no dead letter for it (NATS).
    fn dead_letter_count<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(async move { Ok(self.dead_letters(group, usize::MAX).await?.len() as u64) })
    }

    /// Reads the dead letters of `group` oldest first, without removing them, handing
    /// each to `visit` until it returns `false`: a scan reads no more than it needs.
    /// An unknown group is an error, as for [`dead_letter_count`](Self::dead_letter_count).
    fn scan_dead_letters<'a>(
        &'a self,
        group: &'a str,
        visit: &'a mut DeadLetterVisitor<'_>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            for d in self.dead_letters(group, usize::MAX).await? {
                if !visit(d) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// [`replay_dead_letters`](Self::replay_dead_letters), publishing `rewrite(dead
    /// letter)` in place of [`DeadLetter::replay_envelope`]: a copy with an audit header,
    /// or an edited message with a new id. The dead letter is removed only after the
    /// broker confirmed what `rewrite` made.
    fn replay_dead_letters_as<'a>(
        &'a self,
        group: &'a str,
        filter: &'a DeadLetterFilter,
        rewrite: &'a DeadLetterRewrite<'_>,
        progress: &'a (dyn Fn(&DeadLetter) + Send + Sync),
    ) -> BoxFuture<'a, Result<DeadLetterReport, TransportError>> {
        let _ = (group, filter, rewrite, progress);
        Box::pin(async { Err(unsupported("replay dead letters")) })
    }

    /// Puts the dead letters of `group` selected by `filter` back on their consumer
    /// group's work queue (RabbitMQ) or original subject (NATS), oldest first: id and
    /// body kept, attempt reset to 1, [`header::REPLAYED_AT`] and
    /// [`header::REPLAY_COUNT`] set. Each dead letter is removed only after the broker
    /// confirmed its republish; the others stay where they were, in their order.
    /// `progress` is called after each one is done. See `docs/dead-letters.md`.
    ///
    /// By default [`replay_dead_letters_as`](Self::replay_dead_letters_as) with
    /// [`DeadLetter::replay_envelope`].
    fn replay_dead_letters<'a>(
        &'a self,
        group: &'a str,
        filter: &'a DeadLetterFilter,
        progress: &'a (dyn Fn(&DeadLetter) + Send + Sync),
    ) -> BoxFuture<'a, Result<DeadLetterReport, TransportError>> {
        Box::pin(async move {
            let rewrite = |d: &DeadLetter| d.replay_envelope();
            self.replay_dead_letters_as(group, filter, &rewrite, progress)
                .await
        })
    }

    /// Deletes the dead letters of `group` selected by `filter`; the others stay where
    /// they were, in their order. `progress` is called after each deletion.
    fn purge_dead_letters<'a>(
        &'a self,
        group: &'a str,
        filter: &'a DeadLetterFilter,
        progress: &'a (dyn Fn(&DeadLetter) + Send + Sync),
    ) -> BoxFuture<'a, Result<DeadLetterReport, TransportError>> {
        let _ = (group, filter, progress);
        Box::pin(async { Err(unsupported("purge dead letters")) })
    }

    /// Whether the broker is reachable now.
    fn health(&self) -> Health {
        Health::Connected
    }

    /// Closes connections after in-flight settles finished.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl fmt::Debug for dyn Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transport({})", self.system())
    }
}

/// What replaying or purging dead letters returns, in [`dead_letter_settling`].
#[cfg(any(feature = "amqp", feature = "nats"))]
type Settling<'a> = BoxFuture<'a, Result<DeadLetterReport, TransportError>>;

/// The progress callback of replaying or purging dead letters.
#[cfg(any(feature = "amqp", feature = "nats"))]
type Progress<'a> = dyn Fn(&DeadLetter) + Send + Sync + 'a;

/// The [`Transport`] methods that replay and purge dead letters, for a broker transport
/// whose `dead_letters::settle_selected(&inner, group, filter, action, progress)` does
/// both; the attributes given (its doc) go on `replay_dead_letters_as`.
#[cfg(any(feature = "amqp", feature = "nats"))]
macro_rules! dead_letter_settling {
    ($(#[$replay_attr:meta])*) => {
        $(#[$replay_attr])*
        fn replay_dead_letters_as<'a>(
            &'a self,
            group: &'a str,
            filter: &'a $crate::transport::DeadLetterFilter,
            rewrite: &'a $crate::transport::DeadLetterRewrite<'_>,
            progress: &'a $crate::transport::Progress<'a>,
        ) -> $crate::transport::Settling<'a> {
            let action = dead_letters::Action::Replay(rewrite);
            Box::pin(dead_letters::settle_selected(&self.inner, group, filter, action, progress))
        }

        fn purge_dead_letters<'a>(
            &'a self,
            group: &'a str,
            filter: &'a $crate::transport::DeadLetterFilter,
            progress: &'a $crate::transport::Progress<'a>,
        ) -> $crate::transport::Settling<'a> {
            let action = dead_letters::Action::Purge;
            Box::pin(dead_letters::settle_selected(&self.inner, group, filter, action, progress))
        }
    };
}
#[cfg(any(feature = "amqp", feature = "nats"))]
use dead_letter_settling;

/// One copy of `e` for each of `n` envelopes of a batch that could not be sent at all.
#[cfg(any(feature = "amqp", feature = "nats"))]
fn batch_failed(n: usize, e: &TransportError) -> Vec<Result<(), TransportError>> {
    let text = e.to_string();
    (0..n)
        .map(|_| Err(TransportError::new(e.kind(), text.clone())))
        .collect()
}

fn unsupported(what: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::Unsupported,
        format!("this transport cannot {what}"),
    )
}

/// Which dead letters an operation applies to. Every condition set must hold; the
/// default selects all.
///
/// ```
/// use steadfast::transport::DeadLetterFilter;
/// let f = DeadLetterFilter::default().name("orders.placed").reason("timeout").limit(100);
/// assert_eq!(f.limit, Some(100));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DeadLetterFilter {
    /// Only these message ids (any of them), when not empty.
    pub ids: Vec<MessageId>,
    /// Only dead letters whose reason contains this text (ASCII case ignored).
    pub reason: Option<String>,
    /// Only messages with this wire name.
    pub name: Option<String>,
    /// Only dead letters that failed at or after this time.
    pub since: Option<SystemTime>,
    /// Only dead letters that failed before this time.
    pub until: Option<SystemTime>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Only dead letters of these failure groups (any of them), when not empty: a
    /// [`DeadLetter::fingerprint`], or the start of one (at least 4 characters).
    pub fingerprints: Vec<String>,
}

impl DeadLetterFilter {
    /// Adds `id` to the selected ids.
    #[must_use]
    pub fn id(mut self, id: MessageId) -> Self {
        self.ids.push(id);
        self
    }

    /// Selects reasons containing `text`.
    #[must_use]
    pub fn reason(mut self, text: impl Into<String>) -> Self {
        self.reason = Some(text.into());
        self
    }

    /// Selects the wire name `name`.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Selects dead letters that failed at or after `t`.
    #[must_use]
    pub fn since(mut self, t: SystemTime) -> Self {
        self.since = Some(t);
        self
    }

    /// Selects dead letters that failed before `t`.
    #[must_use]
    pub fn until(mut self, t: SystemTime) -> Self {
        self.until = Some(t);
        self
    }

    /// Adds the failure group `fingerprint` (see [`DeadLetter::fingerprint`]).
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprints.push(fingerprint.into());
        self
    }

    /// Selects at most `n`.
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Whether `dl` meets every condition but the limit. A dead letter whose failure time
    /// cannot be read does not match a time condition.
    pub fn matches(&self, dl: &DeadLetter) -> bool {
        if !self.ids.is_empty() && !self.ids.contains(&dl.id()) {
            return false;
        }
        if !self.fingerprints.is_empty() {
            let fp = dl.fingerprint();
            if !self
                .fingerprints
                .iter()
                .any(|f| f.len() >= 4 && fp.starts_with(&f.to_ascii_lowercase()))
            {
                return false;
            }
        }
        if let Some(r) = &self.reason
            && !dl
                .reason
                .to_ascii_lowercase()
                .contains(&r.to_ascii_lowercase())
        {
            return false;
        }
        if let Some(n) = &self.name
            && dl.envelope.name != *n
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = dl.failed_at_time() else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) {
                return false;
            }
        }
        true
    }

    /// Whether the limit leaves room after `done` selected ones.
    pub fn wants_more(&self, done: usize) -> bool {
        self.limit.is_none_or(|l| done < l)
    }
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterReport {
    /// Dead letters looked at.
    pub scanned: usize,
    /// Dead letters the filter selected.
    pub selected: usize,
    /// Selected ones replayed (confirmed) or purged, and removed from the dead letters.
    pub done: usize,
    /// Selected ones that failed and stayed dead letters.
    pub failed: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl DeadLetterReport {
    /// Records a failure of one selected dead letter (it stays).
    pub fn fail(&mut self, e: impl fmt::Display) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// A dead-lettered message as read back from a dead-letter queue or stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The original message: id, name, headers and bytes as they arrived.
    pub envelope: Envelope,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The kind of the last error, if the header was readable.
    pub kind: Option<ErrorKind>,
    /// Attempts made.
    pub attempts: u32,
    /// Where it was consumed from.
    pub original_destination: String,
    /// When it was dead-lettered (RFC 3339).
    pub failed_at: String,
    /// The consumer group that dead-lettered it.
    pub original_group: String,
}

/// The value of [`header::DEAD_LETTER_ID`] for a dead letter of `env`: none when the
/// message has an id of its own; the id an earlier dead-lettering gave it (a replayed
/// dead letter keeps it); else a new one.
pub(crate) fn dead_letter_id(env: &Envelope) -> Option<String> {
    if env.id != MessageId::nil() {
        return None;
    }
    let earlier = env
        .headers
        .get(header::DEAD_LETTER_ID)
        .and_then(|v| v.trim().parse::<MessageId>().ok());
    Some(earlier.unwrap_or_default().to_string())
}

impl DeadLetter {
    /// Splits the framework's failure headers off an envelope read from a dead-letter
    /// queue; the remaining headers are the original ones.
    pub fn from_envelope(mut envelope: Envelope) -> Self {
        let h: &mut Headers = &mut envelope.headers;
        let reason = h.remove(header::DEAD_LETTER_REASON).unwrap_or_default();
        let kind = h
            .remove(header::ERROR_KIND)
            .and_then(|k| ErrorKind::parse(&k));
        let attempts = h
            .remove(header::ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let original_destination = h.remove(header::ORIGINAL_DESTINATION).unwrap_or_default();
        let failed_at = h.remove(header::FAILED_AT).unwrap_or_default();
        let original_group = h.remove(header::ORIGINAL_GROUP).unwrap_or_default();
        // A message that came without a usable id was given one when dead-lettered.
        let own_id = h
            .remove(header::DEAD_LETTER_ID)
            .and_then(|id| id.trim().parse::<MessageId>().ok());
        if envelope.id == MessageId::nil()
            && let Some(id) = own_id
        {
            envelope.id = id;
        }
        Self {
            envelope,
            reason,
            kind,
            attempts,
            original_destination,
            failed_at,
            original_group,
        }
    }

    /// The original message id; for a message that had none (or one that is not a
    /// UUID), the id it was given when dead-lettered ([`header::DEAD_LETTER_ID`]).
    ///
    /// ```
    /// use steadfast::{Envelope, MessageId, envelope::header, transport::DeadLetter};
    /// let own = MessageId::new();
    /// let env = Envelope::new("orders.placed", &b"{}"[..])
    ///     .with_id(MessageId::nil())
    ///     .with_header(header::DEAD_LETTER_ID, own.to_string());
    /// assert_eq!(DeadLetter::from_envelope(env).id(), own);
    /// ```
    pub fn id(&self) -> MessageId {
        self.envelope.id
    }

    /// [`failed_at`](Self::failed_at) as a time, when readable.
    pub fn failed_at_time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(self.failed_at.trim()).ok()
    }

    /// The message to republish: id, name, body and the original headers kept, the
    /// attempt reset to 1, [`header::REPLAYED_AT`] set to now and
    /// [`header::REPLAY_COUNT`] raised by one.
    ///
    /// ```
    /// use steadfast::{Envelope, envelope::header, transport::DeadLetter};
    /// let mut env = Envelope::new("orders.placed", &b"{}"[..]);
    /// env.attempt = 5;
    /// env.headers.insert(header::DEAD_LETTER_REASON, "boom");
    /// let dl = DeadLetter::from_envelope(env.clone());
    /// let again = dl.replay_envelope();
    /// assert_eq!((again.id, again.attempt), (env.id, 1));
    /// assert_eq!(again.headers.get(header::REPLAY_COUNT), Some("1"));
    /// assert_eq!(again.headers.get(header::DEAD_LETTER_REASON), None);
    /// ```
    pub fn replay_envelope(&self) -> Envelope {
        let mut env = self.envelope.clone();
        env.attempt = 1;
        let count = env
            .headers
            .get(header::REPLAY_COUNT)
            .and_then(|c| c.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        env.headers.insert(header::REPLAY_COUNT, count.to_string());
        env.headers.insert(
            header::REPLAYED_AT,
            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        );
        env
    }
}

/// What went wrong in a transport.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// The connection or channel failed or is closed; the operation may not have happened.
    Connection,
    /// No queue or stream takes messages of this name.
    Unroutable,
    /// The broker refused the message (nack, reject-publish, limits).
    Rejected,
    /// The broker did not answer in time; the outcome is unknown.
    Timeout,
    /// The configuration or topology is wrong (a clear start-up error).
    Config,
    /// The transport was closed by the user.
    Closed,
    /// The transport cannot do this.
    Unsupported,
    /// Anything else the broker said.
    Protocol,
}

/// An error from a transport: a [`TransportErrorKind`], a message and a source, in the
/// shape every backend error has ([`BackendError`]). Its text never contains credentials.
pub type TransportError = BackendError<TransportErrorKind>;

impl TransportError {
    /// An error of `kind` with a message.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Self::of(kind, message)
    }
}
