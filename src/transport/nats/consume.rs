//! Consuming: one pull stream per group consumer (async-nats asks for the next batch
//! before the current one is used up), re-established after errors, merged into one
//! [`DeliveryStream`].

use super::{
    Inner, advisory,
    settle::{AckTarget, NatsAcker},
    suspects::Held,
    topology, wire,
};
use crate::{
    transport::{Delivery, DeliveryStream, Subscription, TransportError, TransportErrorKind},
    transport::{backoff::Backoff, crash},
};
use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use futures::{StreamExt, stream::BoxStream};
use std::{sync::Arc, time::Duration};

/// The idle heartbeat asked of the server on a pull: silence for twice this means the
/// pull has no request the server knows of (see `next_delivery`).
const HEARTBEAT: Duration = Duration::from_secs(2);
const EXPIRES: Duration = Duration::from_secs(30);

/// The pauses before opening a pull again after a failure: from 200 ms up to 5 s (the
/// client reconnects by itself; this only paces the resubscribing).
fn reopen_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
}

pub(super) async fn subscribe(
    inner: Arc<Inner>,
    sub: &Subscription,
) -> Result<DeliveryStream, TransportError> {
    let consumers = topology::ensure_group(&inner, sub).await?;
    let ack_wait = topology::ack_wait(&inner, sub);
    let group: Arc<str> = Arc::from(sub.group.as_str());
    let advisories = advisory::spawn(inner.clone(), group.clone(), &consumers).await?;
    let mut streams: Vec<BoxStream<'static, Result<Delivery, TransportError>>> = Vec::new();
    for c in consumers {
        let state = PullState {
            inner: inner.clone(),
            consumer: Arc::from(c.name.as_str()),
            group: group.clone(),
            sub: sub.clone(),
            ack_wait,
            pull: None,
            failures: 0,
            backoff: reopen_backoff(),
            _advisories: advisories.clone(),
        };
        streams.push(Box::pin(futures::stream::unfold(state, next_delivery)));
    }
    Ok(Box::pin(futures::stream::select_all(streams)))
}

struct PullState {
    inner: Arc<Inner>,
    consumer: Arc<str>,
    group: Arc<str>,
    sub: Subscription,
    ack_wait: Duration,
    pull: Option<pull::Stream>,
    /// Failures since the last message: every fifth declares the consumer again.
    failures: u32,
    /// The pauses between tries to open the pull again, from the first failure on.
    backoff: Backoff,
    /// Keeps the advisory listener alive as long as the stream.
    _advisories: Arc<advisory::Listener>,
}

async fn open(st: &PullState) -> Result<pull::Stream, TransportError> {
    let inner = &st.inner;
    let stream = inner
        .js
        .get_stream_no_info(&inner.settings.stream)
        .await
        .map_err(|e| super::err(TransportErrorKind::Connection, "work stream", e))?;
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&st.consumer).await.map_err(|e| {
            super::err(
                TransportErrorKind::Connection,
                format!("consumer `{}`", st.consumer),
                e,
            )
        })?;
    consumer
        .stream()
        .max_messages_per_batch(st.sub.prefetch.max(1))
        .heartbeat(HEARTBEAT)
        .expires(EXPIRES)
        .messages()
        .await
        .map_err(|e| super::err(TransportErrorKind::Connection, "starting the pull", e))
}

async fn next_delivery(mut st: PullState) -> Option<(Result<Delivery, TransportError>, PullState)> {
    loop {
        if st.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        if st.pull.is_none() {
            if st.failures > 0 {
                tokio::time::sleep(st.backoff.pause()).await;
            }
            let opened = st.inner.bounded("open pull consumer", open(&st)).await;
            match opened {
                Ok(p) => {
                    st.pull = Some(p);
                }
                Err(e) => {
                    st.failures += 1;
                    // The consumer may be gone (a server that lost its store): declare
                    // it again before the next try.
                    if st.failures.is_multiple_of(5) {
                        let _ = topology::ensure_group(&st.inner, &st.sub).await;
                    }
                    return Some((Err(e), st));
                }
            }
        }
        let Some(pull) = st.pull.as_mut() else {
            continue;
        };
        match pull.next().await {
            Some(Ok(msg)) => {
                if st.failures > 0 {
                    st.failures = 0;
                    st.backoff = reopen_backoff();
                }
                match to_delivery(&st, msg) {
                    Some(d) => return Some((Ok(d), st)),
                    None => continue,
                }
            }
            Some(Err(e)) => match e.kind() {
                MessagesErrorKind::MissingHeartbeat => {
                    if st.inner.client.connection_state()
                        == async_nats::connection::State::Connected
                    {
                        // Connected, yet neither messages nor heartbeats: the server holds
                        // no request of this pull while the client counts one outstanding
                        // (seen on nats-server 2.9 and 2.15 with thousands of messages
                        // pending, none ack-pending, no waiting request), and async-nats
                        // would ask again only when that request's expiry has passed, 35 s
                        // on. A new pull asks at once.
                        tracing::debug!(consumer = %st.consumer, "missed pull heartbeats while connected; opening the pull again");
                        st.pull = None;
                    } else {
                        // async-nats re-issues the pull once the connection is back.
                        tracing::debug!(consumer = %st.consumer, "missed pull heartbeats; waiting for the connection");
                    }
                }
                MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders => {
                    tracing::warn!(consumer = %st.consumer, error = %e, "pull consumer lost; re-declaring");
                    st.pull = None;
                    st.failures += 1;
                    let _ = topology::ensure_group(&st.inner, &st.sub).await;
                }
                _ => {
                    tracing::warn!(consumer = %st.consumer, error = %e, "pull error; re-opening the pull");
                    st.pull = None;
                    st.failures += 1;
                }
            },
            None => {
                st.pull = None;
                st.failures += 1;
            }
        }
    }
}

/// Turns a JetStream message into a delivery; `None` for a message that cannot be
/// settled (no reply subject), which the server redelivers.
fn to_delivery(st: &PullState, msg: async_nats::jetstream::Message) -> Option<Delivery> {
    let (seq, delivered) = match msg.info() {
        Ok(i) => (i.stream_sequence, i.delivered.max(1) as u64),
        Err(e) => {
            tracing::warn!(consumer = %st.consumer, error = %e, "JetStream message without metadata; ignored");
            return None;
        }
    };
    let message = msg.message;
    let reply = message.reply.clone()?;
    let prefix = &st.inner.settings.prefix;
    let subject = message.subject.to_string();
    let fallback_name = subject
        .strip_prefix(prefix.as_str())
        .and_then(|s| s.strip_prefix('.'));
    let (mut env, defect) = wire::envelope(
        message.headers.as_ref(),
        fallback_name,
        message.payload.clone(),
    );
    env.attempt = attempt(
        env.attempt,
        delivered,
        st.inner.deferred(&st.consumer, seq),
        st.sub.max_attempts,
    );
    tracing::trace!(consumer = %st.consumer, seq, delivered, attempt = env.attempt, reply = %reply, id = %env.id, "delivery");
    let suspect = crash::is_suspect(
        delivered.saturating_sub(1),
        u64::from(st.inner.suspects.explained(&st.consumer, seq)),
    );
    let target = AckTarget {
        inner: st.inner.clone(),
        reply,
        consumer: st.consumer.clone(),
        group: st.group.clone(),
        subject,
        seq,
        headers: message.headers,
        ack_wait: st.ack_wait,
        ledger: None,
    };
    if suspect {
        // Held back, to run alone when the worker takes it (see `suspects.rs`).
        let held = Held {
            envelope: env,
            defect,
            target,
        };
        return match st.inner.suspects.hold(&st.group, held) {
            Ok(()) => None,
            Err(h) => {
                let h = *h;
                Some(Delivery::new(h.envelope, NatsAcker::new(h.target)).with_defect(h.defect))
            }
        };
    }
    Some(Delivery::new(env, NatsAcker::new(target)).with_defect(defect))
}

/// The framework's attempt for a delivery: the attempt header the message was published
/// with (1, or a forged value the policy's limit makes untrustworthy, then 1), plus one
/// per earlier delivery, less the deliveries this process deferred; at most
/// `max_attempts`, so the last attempt's failure dead-letters.
pub(super) fn attempt(header: u32, delivered: u64, deferred: u32, max_attempts: u32) -> u32 {
    let max = max_attempts.max(1);
    let base = if header > max { 1 } else { header.max(1) };
    let earlier = delivered
        .saturating_sub(1)
        .saturating_sub(u64::from(deferred));
    let a = u64::from(base).saturating_add(earlier);
    a.min(u64::from(max)) as u32
}

#[cfg(test)]
mod tests {
    use super::attempt;

    #[test]
    fn attempts_reconcile_header_and_deliveries() {
        assert_eq!(attempt(1, 1, 0, 3), 1);
        assert_eq!(attempt(1, 2, 0, 3), 2);
        assert_eq!(attempt(1, 3, 1, 3), 2, "a deferral is not an attempt");
        assert_eq!(attempt(999, 1, 0, 3), 1, "forged header not trusted");
        assert_eq!(attempt(999, 2, 0, 3), 2);
        assert_eq!(attempt(1, 50, 0, 3), 3, "capped at the last attempt");
        assert_eq!(attempt(0, 0, 5, 3), 1);
    }
}
