//! `send` spans and metrics (OpenTelemetry messaging conventions) for everything a worker
//! or a relay sends: a handler's outgoing messages, retry copies, dead letters, and the
//! outbox relay's batches.

use crate::transport::{TransportError, TransportErrorKind};
use std::{future::Future, time::Instant};
use tracing::Instrument;

/// `messaging.client.sent.messages`: messages sent, by `messaging.system`,
/// `steadfast.send.kind` (`publish`, `retry`, `dead_letter`, `relay`) and, on failure,
/// `error.type`.
pub const SENT: &str = "messaging.client.sent.messages";
/// `messaging.client.operation.duration`: seconds one send operation took (a batch is one
/// operation), labelled like [`SENT`] plus `messaging.operation.name` = `send`.
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";

/// What is being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendKind {
    /// A handler's outgoing messages (`Context::publish`).
    Publish,
    /// A copy put back for a later attempt.
    Retry,
    /// A dead letter.
    DeadLetter,
    /// An outbox relay's batch.
    Relay,
}

impl SendKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Retry => "retry",
            Self::DeadLetter => "dead_letter",
            Self::Relay => "relay",
        }
    }
}

/// A `send {destination}` producer span.
pub(crate) fn span(
    system: &'static str,
    destination: &str,
    kind: SendKind,
    count: usize,
) -> tracing::Span {
    tracing::info_span!(
        "send",
        otel.name = %format_args!("send {destination}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = system,
        messaging.operation.name = "send",
        messaging.operation.type = "send",
        messaging.destination.name = %destination,
        messaging.batch.message_count = count,
        steadfast.send.kind = kind.as_str(),
        error.type = tracing::field::Empty,
    )
}

/// Runs `send` (which sends `count` messages) in `span`; `error_of` names its failure,
/// if any, which is recorded on the span (error status, `error.type`) and in the metrics.
pub(crate) async fn traced<T>(
    span: tracing::Span,
    system: &'static str,
    kind: SendKind,
    count: usize,
    send: impl Future<Output = T>,
    error_of: impl FnOnce(&T) -> Option<&'static str>,
) -> T {
    let started = Instant::now();
    let result = send.instrument(span.clone()).await;
    let error = error_of(&result);
    if let Some(e) = error {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", e);
    }
    record(system, kind, count, error, started);
    result
}

/// The `error.type` of a transport error.
pub(crate) fn error_type(e: &TransportError) -> &'static str {
    match e.kind() {
        TransportErrorKind::Connection => "connection",
        TransportErrorKind::Unroutable => "unroutable",
        TransportErrorKind::Rejected => "rejected",
        TransportErrorKind::Timeout => "timeout",
        TransportErrorKind::Config => "config",
        TransportErrorKind::Closed => "closed",
        TransportErrorKind::Unsupported => "unsupported",
        _ => "protocol",
    }
}

/// The `error.type` of a batch: its first failure's.
pub(crate) fn batch_error(results: &[Result<(), TransportError>]) -> Option<&'static str> {
    results
        .iter()
        .find_map(|r| r.as_ref().err().map(error_type))
}

/// Counts `count` messages of one send operation and its duration.
pub(crate) fn record(
    system: &'static str,
    kind: SendKind,
    count: usize,
    error: Option<&'static str>,
    started: Instant,
) {
    let mut labels = vec![
        ("messaging.system", system),
        ("messaging.operation.name", "send"),
        ("steadfast.send.kind", kind.as_str()),
    ];
    if let Some(e) = error {
        labels.push(("error.type", e));
    }
    metrics::counter!(SENT, &labels).increment(count as u64);
    metrics::histogram!(OPERATION_DURATION, &labels).record(started.elapsed().as_secs_f64());
}

/// Describes the metrics (once per recorder; repeated calls are harmless).
pub(crate) fn describe() {
    metrics::describe_counter!(SENT, metrics::Unit::Count, "Messages sent to the broker.");
    metrics::describe_histogram!(
        OPERATION_DURATION,
        metrics::Unit::Seconds,
        "Duration of one send operation (a batch counts once)."
    );
}
