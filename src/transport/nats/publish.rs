//! Publishing with PubAcks, retried while JetStream passes through an election, and
//! dead-letter publishing.

use super::{
    Inner, err,
    wire::{MSG_ID, get, wire_headers},
};
use crate::{
    envelope::{Envelope, header},
    retry::Failure,
    transport::{TransportError, TransportErrorKind, backoff::Backoff},
};
use async_nats::{HeaderMap, jetstream::context::PublishErrorKind};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// Marks the text of a publish error that reports a passing JetStream state (no stream
/// leader yet, no quorum, JetStream restarting on its node).
const PASSING: &str = "JetStream temporarily unavailable";

/// The first pause between two tries of a publish (or of an ack request, in
/// `settle.rs`) while the stream or consumer has no leader.
pub(super) const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The longest such pause.
pub(super) const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

fn publish_error(
    subject: &str,
    e: &async_nats::jetstream::context::PublishError,
) -> TransportError {
    let kind = match e.kind() {
        // "No responders": no stream takes the subject, or its stream has no leader at
        // this moment (an election); `publish_retrying` tells them apart.
        PublishErrorKind::StreamNotFound => TransportErrorKind::Unroutable,
        PublishErrorKind::TimedOut => TransportErrorKind::Timeout,
        PublishErrorKind::BrokenPipe => TransportErrorKind::Connection,
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::MaxAckPending => {
            TransportErrorKind::Rejected
        }
        _ if is_unavailable(e) => {
            return err(
                TransportErrorKind::Connection,
                format!("publishing to `{subject}`: {PASSING}"),
                e,
            );
        }
        _ => TransportErrorKind::Protocol,
    };
    err(kind, format!("publishing to `{subject}`"), e)
}

/// A JetStream error answer that reports a passing state: 503 (JetStream not available
/// on this node, or a cluster without quorum) and the errors of a stream or consumer
/// whose leader is being elected.
fn is_unavailable(e: &async_nats::jetstream::context::PublishError) -> bool {
    let text = std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default()
        .to_ascii_lowercase();
    text.contains("code 503")
        || text.contains("temporarily unavailable")
        || text.contains("no suitable peers")
        || text.contains("leader")
        || text.contains("quorum")
}

/// Whether a publish failure may pass by itself within the publish's deadline.
fn passing(e: &TransportError) -> bool {
    e.kind() == TransportErrorKind::Unroutable
        || (e.kind() == TransportErrorKind::Connection && e.to_string().contains(PASSING))
}

/// Whether the stream that should capture `subject` is missing for certain (the server
/// answered "stream not found"); `false` while it exists or cannot be told.
async fn stream_missing(inner: &Inner, subject: &str) -> bool {
    let s = &inner.settings;
    let stream = if subject.starts_with(&format!("{}-dlq.", s.prefix)) {
        &s.dlq_stream
    } else {
        &s.stream
    };
    let lookup = inner.js.get_stream(stream);
    match tokio::time::timeout(inner.settings.op_timeout, lookup).await {
        Ok(Err(e)) => matches!(
            e.kind(),
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(j) if j.code() == 404
        ),
        _ => false,
    }
}

/// Publishes one message and awaits its PubAck, trying again while JetStream reports a
/// passing state (a stream without a leader answers nobody during its election, about
/// 2 to 10 s after its leader's node died; a cluster without quorum takes no writes)
/// until `deadline`. The message keeps its `Nats-Msg-Id`, so a try whose PubAck was
/// lost is not stored twice. A subject no stream captures is `Unroutable` at once.
pub(super) async fn publish_retrying(
    inner: &Inner,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
    deadline: Instant,
) -> Result<u64, TransportError> {
    let mut backoff = Backoff::new(FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let attempt = async {
            let ack = inner
                .bounded(
                    "publish",
                    send(inner, subject.to_owned(), headers.clone(), payload.clone()),
                )
                .await?;
            await_ack(inner, subject, ack).await
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let result = match tokio::time::timeout(left.max(Duration::from_millis(1)), attempt).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Timeout,
                format!("publishing to `{subject}`: no PubAck within the deadline"),
            )),
        };
        let e = match result {
            Ok(seq) => {
                inner.jetstream_answered();
                return Ok(seq);
            }
            Err(e) if passing(&e) => e,
            Err(e) => return Err(e),
        };
        if e.kind() == TransportErrorKind::Unroutable && stream_missing(inner, subject).await {
            return Err(TransportError::new(
                TransportErrorKind::Unroutable,
                format!(
                    "no stream captures subject `{subject}` (declare the consumer group first)"
                ),
            ));
        }
        inner.jetstream_unavailable();
        let pause = backoff.pause();
        if Instant::now() + pause >= deadline {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                format!(
                    "publishing to `{subject}`: {PASSING} (no stream leader answered after {tries} tries: a leader election, or a cluster without quorum); try again"
                ),
            ));
        }
        tracing::debug!(subject, tries, error = %e, "JetStream not ready for a publish; trying again");
        tokio::time::sleep(pause).await;
    }
}

/// Sends one message; the returned future resolves with the PubAck.
pub(super) async fn send(
    inner: &Inner,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<async_nats::jetstream::context::PublishAckFuture, TransportError> {
    inner
        .js
        .publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|e| publish_error(&subject, &e))
}

pub(super) async fn await_ack(
    inner: &Inner,
    subject: &str,
    ack: async_nats::jetstream::context::PublishAckFuture,
) -> Result<u64, TransportError> {
    inner
        .bounded("PubAck", async {
            ack.await
                .map(|a| {
                    inner.jetstream_answered();
                    a.sequence
                })
                .map_err(|e| publish_error(subject, &e))
        })
        .await
}

fn check_name(env: &Envelope) -> Result<(), TransportError> {
    super::builder::validate_token("message name", &env.name)
        .map_err(|e| TransportError::new(TransportErrorKind::Rejected, e.to_string()))
}

/// Publishes `env` on `{prefix}.{name}`; `Ok` once the stream's PubAck arrived.
pub(super) async fn publish(inner: &Inner, env: &Envelope) -> Result<(), TransportError> {
    check_name(env)?;
    let subject = inner.settings.subject(&env.name);
    publish_retrying(
        inner,
        &subject,
        wire_headers(env, inner.settings.dedup),
        env.payload.clone(),
        Instant::now() + inner.op_limit(),
    )
    .await
    .map(|_| ())
}

/// A message ready for the wire: subject, headers, payload.
pub(super) type Outgoing = (String, HeaderMap, Bytes);

/// Publishes every envelope on its subject; see [`publish_many`].
pub(super) async fn publish_batch(
    inner: &Inner,
    envs: &[Envelope],
) -> Vec<Result<(), TransportError>> {
    let outgoing = envs
        .iter()
        .map(|env| {
            check_name(env).map(|()| {
                (
                    inner.settings.subject(&env.name),
                    wire_headers(env, inner.settings.dedup),
                    env.payload.clone(),
                )
            })
        })
        .collect();
    publish_many(inner, "publish", outgoing).await
}

/// Sends every message first, then awaits the PubAcks together: one round trip for the
/// batch, and one time bound for it rather than one per message. An `Err` item is passed
/// through in its place.
///
/// Both halves are bounded as a whole. While the connection is down, async-nats queues
/// commands until its channel is full and never answers requests whose bytes were lost
/// with the old socket; bounding each message on its own and awaiting the PubAcks one
/// after another made a batch of `n` take up to `n` × the request timeout to fail after
/// a server restart (seen: publishing stalled for minutes in `tests/nats_faults`).
pub(super) async fn publish_many(
    inner: &Inner,
    what: &str,
    outgoing: Vec<Result<Outgoing, TransportError>>,
) -> Vec<Result<(), TransportError>> {
    let limit = inner.op_limit();
    let started = Instant::now();
    let send_deadline = started + limit;
    let mut pending = Vec::with_capacity(outgoing.len());
    for item in outgoing {
        pending.push(match item {
            Err(e) => Err(e),
            Ok((subject, headers, payload)) => {
                let sent = send(inner, subject.clone(), headers.clone(), payload.clone());
                match tokio::time::timeout_at(send_deadline.into(), sent).await {
                    Ok(r) => r.map(|ack| (subject, headers, payload, ack)),
                    Err(_) => Err(TransportError::new(
                        TransportErrorKind::Timeout,
                        format!(
                            "{what}: the NATS connection took no command within {limit:?} (disconnected?)"
                        ),
                    )),
                }
            }
        });
    }
    // Each PubAck wait starts its own timer when first polled; polling them together
    // lets those timers run side by side.
    // A message that met a passing JetStream state (an election) is tried again on its
    // own within the batch's deadline, which the first round leaves mostly unused then.
    let retry_deadline = started + limit * 2;
    futures::future::join_all(pending.into_iter().map(|p| async move {
        match p {
            Ok((subject, headers, payload, ack)) => match await_ack(inner, &subject, ack).await {
                Err(e) if passing(&e) => {
                    publish_retrying(inner, &subject, headers, payload, retry_deadline)
                        .await
                        .map(|_| ())
                }
                r => r.map(|_| ()),
            },
            Err(e) => Err(e),
        }
    }))
    .await
}

/// What a dead letter is made of.
pub(super) struct DeadLetterCopy<'a> {
    pub(super) group: &'a str,
    /// The work-stream subject it was consumed from.
    pub(super) subject: &'a str,
    /// The original headers as they arrived (or rebuilt from the envelope).
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
    pub(super) failure: &'a Failure,
    pub(super) attempts: u32,
    /// Deduplication id: the same stored message dead-lettered twice by the same group
    /// (a settle retried after its PubAck) is kept once.
    pub(super) dedup_id: String,
}

/// Publishes a dead letter to `{prefix}-dlq.{group}` and awaits its PubAck.
pub(super) async fn publish_dead_letter(
    inner: &Inner,
    copy: DeadLetterCopy<'_>,
) -> Result<(), TransportError> {
    let mut h = copy.headers;
    for (k, v) in copy.failure.headers(copy.attempts) {
        h.insert(k, v.as_str());
    }
    h.insert(header::ORIGINAL_DESTINATION, copy.subject);
    h.insert(header::ORIGINAL_GROUP, copy.group);
    // Keep a producer's own id readable after we replace `Nats-Msg-Id`.
    if let Some(orig) = get(&h, MSG_ID).map(str::to_owned)
        && get(&h, "ce-id").is_none()
    {
        h.insert("ce-id", orig.as_str());
    }
    h.insert(MSG_ID, copy.dedup_id.as_str());
    let subject = inner.settings.dlq_subject(copy.group);
    publish_retrying(
        inner,
        &subject,
        h,
        copy.payload,
        Instant::now() + inner.op_limit(),
    )
    .await
    .map(|_| ())
}
