//! Publishing with PubAcks, dead-letter publishing and reading dead letters back.

use super::{Inner, err};
use crate::{
    envelope::{Envelope, header},
    retry::Failure,
    transport::{TransportError, TransportErrorKind},
};
use async_nats::{HeaderMap, jetstream::context::PublishErrorKind};
use bytes::Bytes;
use std::{borrow::Cow, time::Instant};

/// The header JetStream deduplicates on.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

/// The wire headers of `env`: CloudEvents `ce-*`, the attempt, the others, and
/// `Nats-Msg-Id` = the envelope id.
pub(crate) fn wire_headers(env: &Envelope, dedup: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    env.write_wire("ce-", |k, v| h.insert(k.as_ref(), v.as_ref()));
    if dedup {
        h.insert(MSG_ID, env.id.to_string().as_str());
    }
    h
}

fn publish_error(
    subject: &str,
    e: &async_nats::jetstream::context::PublishError,
) -> TransportError {
    let kind = match e.kind() {
        PublishErrorKind::StreamNotFound => TransportErrorKind::Unroutable,
        PublishErrorKind::TimedOut => TransportErrorKind::Timeout,
        PublishErrorKind::BrokenPipe => TransportErrorKind::Connection,
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::MaxAckPending => {
            TransportErrorKind::Rejected
        }
        _ => TransportErrorKind::Protocol,
    };
    let text = if kind == TransportErrorKind::Unroutable {
        format!("no stream captures subject `{subject}` (declare the consumer group first)")
    } else {
        format!("publishing to `{subject}`")
    };
    err(kind, text, e)
}

/// Sends one message; the returned future resolves with the PubAck.
pub(crate) async fn send(
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

pub(crate) async fn await_ack(
    inner: &Inner,
    subject: &str,
    ack: async_nats::jetstream::context::PublishAckFuture,
) -> Result<u64, TransportError> {
    inner
        .bounded("PubAck", async {
            ack.await
                .map(|a| a.sequence)
                .map_err(|e| publish_error(subject, &e))
        })
        .await
}

fn check_name(env: &Envelope) -> Result<(), TransportError> {
    super::config::validate_token("message name", &env.name)
        .map_err(|e| TransportError::new(TransportErrorKind::Rejected, e.to_string()))
}

/// Publishes `env` on `{prefix}.{name}`; `Ok` once the stream's PubAck arrived.
pub(crate) async fn publish_one(inner: &Inner, env: &Envelope) -> Result<(), TransportError> {
    check_name(env)?;
    let subject = inner.settings.subject(&env.name);
    let ack = inner
        .bounded(
            "publish",
            send(
                inner,
                subject.clone(),
                wire_headers(env, inner.settings.dedup),
                env.payload.clone(),
            ),
        )
        .await?;
    await_ack(inner, &subject, ack).await.map(|_| ())
}

/// A message ready for the wire: subject, headers, payload.
pub(crate) type Outgoing = (String, HeaderMap, Bytes);

/// Publishes every envelope on its subject; see [`publish_many`].
pub(crate) async fn publish_batch(
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
pub(crate) async fn publish_many(
    inner: &Inner,
    what: &str,
    outgoing: Vec<Result<Outgoing, TransportError>>,
) -> Vec<Result<(), TransportError>> {
    let limit = inner.op_limit();
    let send_deadline = Instant::now() + limit;
    let mut pending = Vec::with_capacity(outgoing.len());
    for item in outgoing {
        pending.push(match item {
            Err(e) => Err(e),
            Ok((subject, headers, payload)) => {
                let sent = send(inner, subject.clone(), headers, payload);
                match tokio::time::timeout_at(send_deadline.into(), sent).await {
                    Ok(r) => r.map(|ack| (subject, ack)),
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
    futures::future::join_all(pending.into_iter().map(|p| async move {
        match p {
            Ok((subject, ack)) => await_ack(inner, &subject, ack).await.map(|_| ()),
            Err(e) => Err(e),
        }
    }))
    .await
}

/// What a dead letter is made of.
pub(crate) struct DeadLetterCopy<'a> {
    pub(crate) group: &'a str,
    /// The work-stream subject it was consumed from.
    pub(crate) subject: &'a str,
    /// The original headers as they arrived (or rebuilt from the envelope).
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
    pub(crate) failure: &'a Failure,
    pub(crate) attempts: u32,
    /// Deduplication id: the same stored message dead-lettered twice by the same group
    /// (a settle retried after its PubAck) is kept once.
    pub(crate) dedup_id: String,
}

/// Publishes a dead letter to `{prefix}-dlq.{group}` and awaits its PubAck.
pub(crate) async fn publish_dead_letter(
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
    let ack = inner
        .bounded(
            "dead-letter publish",
            send(inner, subject.clone(), h, copy.payload),
        )
        .await?;
    await_ack(inner, &subject, ack).await.map(|_| ())
}

/// A header by name, ignoring ASCII case.
pub(crate) fn get<'a>(h: &'a HeaderMap, key: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(key))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str())
}

/// Every header value as `(name, value)` pairs for [`Envelope::read_wire`].
pub(crate) fn pairs(h: &HeaderMap) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    h.iter().flat_map(|(k, vs)| {
        vs.iter()
            .map(move |v| (AsRef::<str>::as_ref(k), Cow::Borrowed(v.as_str())))
    })
}
