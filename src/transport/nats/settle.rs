//! Settling a JetStream delivery. An `Ack` is published to the delivery's ack subject
//! (or, with `confirm_acks`, sent as a request whose reply is awaited); Nak, Term and
//! progress are always requests whose reply is awaited. A delivery dropped unsettled is
//! `Nak`ed for prompt redelivery.

use super::{
    Inner,
    publish::{self, DeadLetterCopy},
    suspects, wire,
};
use crate::{
    envelope::{Envelope, header},
    retry::Disposition,
    transport::{Acker, TransportError, TransportErrorKind, backoff::Backoff},
};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::{sync::Arc, time::Duration};

/// Everything needed to settle one delivery.
pub(super) struct AckTarget {
    pub(super) inner: Arc<Inner>,
    /// The `$JS.ACK...` subject of this delivery.
    pub(super) reply: Subject,
    pub(super) consumer: Arc<str>,
    pub(super) group: Arc<str>,
    /// The work-stream subject it came from.
    pub(super) subject: String,
    /// Its stream sequence.
    pub(super) seq: u64,
    /// The headers as they arrived (kept for the dead letter).
    pub(super) headers: Option<HeaderMap>,
    pub(super) ack_wait: Duration,
    /// Set while a suspect runs alone: its crash-ledger entry, restored when the run
    /// ends in this process.
    pub(super) ledger: Option<suspects::Entry>,
}

pub(super) struct NatsAcker {
    target: Option<AckTarget>,
}

impl NatsAcker {
    pub(super) fn new(target: AckTarget) -> Self {
        Self {
            target: Some(target),
        }
    }
}

/// The delay of the `-NAK` sent for a delivery dropped unsettled. Not zero on purpose:
/// nats-server before 2.10.14 (fixed by its PR #5305) loses track of a redelivery it takes up
/// while its only pull requests belong to a subscriber that has gone: it holds that
/// message for `ack_wait` or longer and sends the stream's last message again as a first
/// delivery. A plain `-NAK` is taken up at once, usually before the next pull arrives; a
/// Nak with a delay goes through the server's pending timer (10 ms or more), which gives
/// that pull time.
const DROPPED_NAK_DELAY: Duration = Duration::from_millis(1);

impl Drop for NatsAcker {
    fn drop(&mut self) {
        // Dropped unsettled (the worker abandoned it or stopped before handing it to a
        // handler): give it back now rather than after `ack_wait`.
        let Some(t) = self.target.take() else { return };
        // Going back to the server for a reason that is not a crash.
        t.inner.suspects.explain(&t.consumer, t.seq);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                seq = t.seq,
                "delivery dropped outside a runtime; redelivered after ack_wait"
            );
            return;
        };
        tracing::debug!(seq = t.seq, "delivery dropped unsettled; sending -NAK");
        if let Some(entry) = t.ledger.clone() {
            let inner = t.inner.clone();
            let _guard = rt.enter();
            suspects::restore(inner, entry, false);
        }
        rt.spawn(async move {
            let r = tokio::time::timeout(
                t.inner.settings.op_timeout,
                t.inner
                    .client
                    .publish(t.reply.clone(), nak_body(DROPPED_NAK_DELAY)),
            )
            .await;
            let f = tokio::time::timeout(t.inner.settings.op_timeout, t.inner.client.flush()).await;
            tracing::debug!(seq = t.seq, publish = ?r, flush = ?f, "-NAK for a dropped delivery");
        });
    }
}

/// Sends an ack-kind `body` to the delivery's ack subject and waits for the server's
/// reply, so `Ok` means the server processed it.
///
/// "No responders" means the consumer has no leader at this moment (an election after
/// its node died or stepped down): nobody received the request, so it is sent again,
/// with a growing pause, until the request bound is used up.
async fn ack_request(t: &AckTarget, body: Bytes, what: &str) -> Result<(), TransportError> {
    let inner = &t.inner;
    let mut backoff = Backoff::new(publish::FIRST_RETRY_PAUSE, publish::MAX_RETRY_PAUSE);
    inner
        .bounded(what, async {
            loop {
                let e = match inner.client.request(t.reply.clone(), body.clone()).await {
                    Ok(_) => {
                        inner.jetstream_answered();
                        return Ok(());
                    }
                    Err(e) => e,
                };
                let kind = match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        inner.jetstream_unavailable();
                        tokio::time::sleep(backoff.pause()).await;
                        continue;
                    }
                    async_nats::RequestErrorKind::TimedOut => TransportErrorKind::Timeout,
                    _ => TransportErrorKind::Connection,
                };
                return Err(super::err(
                    kind,
                    format!("{what} of stream sequence {} not confirmed", t.seq),
                    e,
                ));
            }
        })
        .await
}

/// Sends `+ACK` for the delivery. With `confirm_acks` the server's reply is awaited.
/// Otherwise the ack is published (async-nats writes and flushes it at once, as
/// `Message::ack` does) and `Ok` means it was handed to a connected client: when the
/// client is disconnected, or the publish fails, the ack is an error, so the delivery is
/// reported not settled. An ack lost in a connection drop after that is redelivered by
/// the server after `ack_wait` — a duplicate, never a loss.
async fn ack(t: &AckTarget) -> Result<(), TransportError> {
    const BODY: &[u8] = b"+ACK";
    let inner = &t.inner;
    if inner.settings.confirm_acks {
        return ack_request(t, Bytes::from_static(BODY), "ack").await;
    }
    if inner.client.connection_state() != async_nats::connection::State::Connected {
        return Err(TransportError::new(
            TransportErrorKind::Connection,
            format!(
                "ack of stream sequence {} not sent: the NATS client is disconnected",
                t.seq
            ),
        ));
    }
    // The client's command queue is bounded: a publish waits only while it is full.
    inner
        .bounded("ack", async {
            inner
                .client
                .publish(t.reply.clone(), Bytes::from_static(BODY))
                .await
                .map_err(|e| {
                    super::err(
                        TransportErrorKind::Connection,
                        format!("ack of stream sequence {} not sent", t.seq),
                        e,
                    )
                })
        })
        .await
}

fn nak_body(delay: Duration) -> Bytes {
    if delay.is_zero() {
        Bytes::from_static(b"-NAK")
    } else {
        Bytes::from(format!("-NAK {{\"delay\": {}}}", delay.as_nanos()))
    }
}

impl Acker for NatsAcker {
    fn settle(
        mut self: Box<Self>,
        envelope: Envelope,
        disposition: Disposition,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let t = self.target.take();
        Box::pin(async move {
            let Some(t) = t else {
                return Err(TransportError::new(
                    TransportErrorKind::Protocol,
                    "delivery already settled",
                ));
            };
            let seq = t.seq;
            let finished = matches!(disposition, Disposition::Ack | Disposition::DeadLetter(_));
            let returns = matches!(
                disposition,
                Disposition::Retry { .. } | Disposition::Defer { .. }
            );
            let result = settle(&t, envelope, disposition).await;
            tracing::trace!(seq, ?result, "settled");
            if result.is_err() {
                // Not settled: make sure it comes back promptly (the drop explains the
                // return and restores the ledger).
                let _ = NatsAcker::new(t);
                return result;
            }
            // This process's own Nak is not a crash (but a suspect's is left unexplained,
            // so it stays a suspect); a finished message is forgotten.
            if returns && t.ledger.is_none() {
                t.inner.suspects.explain(&t.consumer, t.seq);
            } else if !returns {
                t.inner.suspects.forget(&t.consumer, t.seq);
            }
            if let Some(entry) = t.ledger.clone() {
                suspects::restore(t.inner.clone(), entry, finished);
            }
            result
        })
    }

    fn progress_interval(&self) -> Option<Duration> {
        self.target
            .as_ref()
            .map(|t| (t.ack_wait / 2).max(Duration::from_millis(100)))
    }

    fn progress(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(t) = self.target.as_ref() else {
                return Ok(());
            };
            ack_request(t, Bytes::from_static(b"+WPI"), "progress").await
        })
    }
}

async fn settle(t: &AckTarget, envelope: Envelope, d: Disposition) -> Result<(), TransportError> {
    let inner = &t.inner;
    match d {
        Disposition::Ack => {
            ack(t).await?;
            inner.forget_deferrals(&t.consumer, t.seq);
            Ok(())
        }
        Disposition::Retry { delay } => {
            // The server holds it for `delay`; its delivery count goes up by one, which
            // is the attempt count (see `consume::attempt`).
            ack_request(t, nak_body(delay), "nak").await
        }
        Disposition::Defer { delay } => {
            // Also a Nak, so the delivery count goes up; this process remembers the
            // deferral and subtracts it, so no attempt is used.
            inner.record_deferral(&t.consumer, t.seq);
            let r = ack_request(t, nak_body(delay), "nak").await;
            if r.is_err() {
                inner.unrecord_deferral(&t.consumer, t.seq);
            }
            r
        }
        Disposition::DeadLetter(failure) => {
            let headers = match &t.headers {
                Some(h) => h.clone(),
                None => wire::wire_headers(&envelope, true),
            };
            let mut headers = headers;
            if let Some(id) = crate::transport::dead_letter_id(&envelope) {
                // A message without a usable id gets one, so `--id` can pick its dead letter.
                headers.insert(header::DEAD_LETTER_ID, id.as_str());
            }
            publish::publish_dead_letter(
                inner,
                DeadLetterCopy {
                    group: &t.group,
                    subject: &t.subject,
                    headers,
                    payload: envelope.payload.clone(),
                    failure: &failure,
                    attempts: envelope.attempt,
                    dedup_id: dedup_id(&t.group, t.seq),
                },
            )
            .await?;
            // Crash window: the dead letter has its PubAck, the original is not termed.
            failpoint!("steadfast::nats::dead_letter_confirmed_before_term");
            ack_request(t, Bytes::from_static(b"+TERM"), "term").await?;
            inner.forget_deferrals(&t.consumer, t.seq);
            Ok(())
        }
    }
}

/// The dead letter's `Nats-Msg-Id`: one per group and stored message.
pub(super) fn dedup_id(group: &str, seq: u64) -> String {
    format!("dlq:{group}:{seq}")
}

/// How many deferred deliveries a process remembers before it starts over.
const MAX_DEFERRALS_REMEMBERED: usize = 100_000;

impl Inner {
    /// How many times this process deferred `seq` on `consumer`.
    pub(super) fn deferred(&self, consumer: &Arc<str>, seq: u64) -> u32 {
        let map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(consumer.clone(), seq)).copied().unwrap_or(0)
    }

    pub(super) fn record_deferral(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: forgetting deferrals only makes a deferred message use an attempt.
        if map.len() >= MAX_DEFERRALS_REMEMBERED {
            map.clear();
        }
        *map.entry((consumer.clone(), seq)).or_insert(0) += 1;
    }

    pub(super) fn unrecord_deferral(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        let key = (consumer.clone(), seq);
        if let Some(n) = map.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&key);
            }
        }
    }

    pub(super) fn forget_deferrals(&self, consumer: &Arc<str>, seq: u64) {
        let mut map = self.deferrals.lock().unwrap_or_else(|p| p.into_inner());
        if !map.is_empty() {
            map.remove(&(consumer.clone(), seq));
        }
    }
}
